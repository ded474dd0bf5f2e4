"""The trainer end to end on the tiny model: loss falls on a synthetic task; SIGKILL mid-run and
resume (through a SIGTERM-saved checkpoint) reproduce the uninterrupted per-step losses bit for
bit; a NaN stops the run naming the step and the last checkpoint restores."""
import json
import os
import pathlib
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from phi_reason.config import load_run_config
from phi_reason.jobs import build, dpo
from phi_reason.jobs.trainer import BatchSteps, Trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_SFT = str(ROOT / "configs" / "tiny_sft.yaml")


@pytest.fixture(scope="module")
def addition_file(tmp_path_factory):
    """Chat records of two-digit addition with a short worked solution."""
    path = tmp_path_factory.mktemp("data") / "add.jsonl"
    r = random.Random(0)
    with open(path, "w") as f:
        for _ in range(300):
            a, b = r.randint(10, 99), r.randint(10, 99)
            msg = [{"role": "user", "content": f"{a}+{b}="},
                   {"role": "assistant", "content": f"<think>{a}+{b}</think> \\boxed{{{a + b}}}"}]
            f.write(json.dumps({"messages": msg}) + "\n")
    return str(path)


def overrides(data_file, out, **kw):
    base = {"data.train_files": f"[{data_file}]", "data.seq_len": 96, "train.batch_size": 4,
            "train.steps": 30, "train.lr": 3e-3, "output.save_every": 5, "output.keep": 10,
            "output.dir": str(out),
            "output.progress": "false", "output.tensorboard": "false"}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def history(out):
    recs = [json.loads(x) for x in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in recs]


# Every subprocess below runs the same config, so they share one compiled step through the
# persistent compilation cache. The harness casts loss_mask to float32 (so a NaN can be
# injected) and, on request, preempts itself from a step hook (a real signal, delivered mid-run)
# or poisons one batch.
HARNESS = r"""
import os, signal, sys
import jax
import numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from phi_reason import cli
from phi_reason.jobs import build, sft
config, overrides, resume, at, action = (sys.argv[1], sys.argv[2].split("|"), sys.argv[3] == "1",
                                         int(sys.argv[4]), sys.argv[5])
build_data = build.build_data

class Batches:
    def __init__(self, inner):
        self.inner, self.n = inner, 0
    def __next__(self):
        batch = next(self.inner)
        self.n += 1
        batch = dict(batch, loss_mask=batch["loss_mask"].astype(np.float32))
        if action == "nan" and self.n == at:
            batch["loss_mask"][0, 10] = np.nan
        return batch
    def get_state(self):  # the pipeline's own state: checkpoints stay plain pipeline states
        return self.inner.get_state()
    def set_state(self, state):
        self.inner.set_state(state)

build.build_data = lambda run, kind: (Batches(build_data(run, kind)[0]), None)
def preempt(trainer, step):
    if step == at and action.startswith("SIG"):
        os.kill(os.getpid(), getattr(signal, action))
sys.exit(cli.report_errors(sft.run_sft, config, overrides, resume=resume, hooks=[preempt]))
"""


def launch(over, cache, resume=False, at=0, action="none"):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen([sys.executable, "-c", HARNESS, TINY_SFT, "|".join(over),
                             "1" if resume else "0", str(at), action],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc, timeout=600):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.fixture(scope="module")
def runs(addition_file, tmp_path_factory):
    """An uninterrupted run and a preempted one (SIGKILL after step 13, resume, SIGTERM after
    step 17, resume to the end), side by side."""
    tmp = tmp_path_factory.mktemp("runs")
    cache = tmp / "xla_cache"
    ref_dir, run_dir = tmp / "uninterrupted", tmp / "preempted"
    ref = launch(overrides(addition_file, ref_dir, **{"output.tensorboard": "true"}), cache)
    killed = launch(overrides(addition_file, run_dir), cache, at=13, action="SIGKILL")
    result = {"ref": finish(ref), "killed": finish(killed), "cache": cache, "tmp": tmp,
              "ref_dir": ref_dir, "run_dir": run_dir}
    result["sigterm"] = finish(launch(overrides(addition_file, run_dir), cache, resume=True,
                                      at=17, action="SIGTERM"))
    result["ckpts_after_sigterm"] = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()
                                           if p.name.isdigit())
    result["final_after_sigterm"] = (run_dir / "final").exists()
    result["resumed"] = finish(launch(overrides(addition_file, run_dir), cache, resume=True))
    return result


def test_sft_loss_falls_on_synthetic_task(runs):
    rc, err = runs["ref"]
    assert rc == 0, err
    out = runs["ref_dir"]
    hist = history(out)
    assert [h[0] for h in hist] == list(range(1, 31))
    first, last = hist[0][1], np.mean([h[1] for h in hist[-5:]])
    assert first > 5.0  # ~ln(512) at random init
    assert last < 0.45 * first, (first, last)
    assert (out / "checkpoints" / "30").is_dir()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert load_run_config(str(out / "config.yaml")).train.steps == 30
    # the exported weights load as a pretrained model
    from phi_reason.checkpoint import load_pretrained
    cfg, params = load_pretrained(str(out / "final"))
    assert cfg.num_hidden_layers == 2 and np.isfinite(np.asarray(params["embed"])).all()


@pytest.mark.slow
def test_preemption_resume_is_bitwise_identical(runs):
    rc, err = runs["killed"]
    assert rc == -9, err  # killed by SIGKILL after step 13 (checkpoint 10 possibly in flight)
    rc, err = runs["sigterm"]
    assert rc == 0, err  # SIGTERM: saved and exited cleanly
    assert "resumed from" in err and "SIGTERM: saved checkpoint at step 17" in err
    assert runs["ckpts_after_sigterm"][-1] == 17 and not runs["final_after_sigterm"]
    rc, err = runs["resumed"]
    assert rc == 0, err
    assert "at step 17" in err
    want, got = history(runs["ref_dir"]), history(runs["run_dir"])
    assert [g[0] for g in got] == list(range(1, 31))
    assert got == want  # bitwise: loss, grad norm and lr of every step


def test_nonfinite_loss_stops_naming_the_step_and_checkpoint_restores(runs, addition_file):
    out = runs["tmp"] / "nan"
    rc, err = finish(launch(overrides(addition_file, out), runs["cache"], at=12, action="nan"))
    assert rc == 1, err
    assert "non-finite loss or gradient at step 12" in err
    assert "last checkpoint is step 10" in err
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 10] and not (out / "final").exists()
    # the last checkpoint restores: step 10's state, bit-identical to the uninterrupted run's
    run = load_run_config(TINY_SFT, overrides(addition_file, out))
    cfg, params = build.build_model(run)
    tc = run.train
    data, _ = build.build_data(run, "sft")
    trainer = Trainer(run, cfg,
                      BatchSteps(build.new_train_state(cfg, tc, params, None), None, data), 30)
    assert trainer.restore() == 10 and int(trainer.state.step) == 10
    got = jax.tree_util.tree_map(np.asarray, trainer.state.params)
    ref_run = load_run_config(TINY_SFT, overrides(addition_file, runs["ref_dir"]))
    ref = Trainer(ref_run, cfg, BatchSteps(build.new_train_state(cfg, tc, params, None), None,
                                           build.build_data(ref_run, "sft")[0]), 30)
    assert ref.restore(10) == 10
    want = jax.tree_util.tree_map(np.asarray, ref.state.params)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
    # the data position restored too: the next batch is the uninterrupted run's 11th
    fresh, _ = build.build_data(run, "sft")
    for _ in range(10):
        next(fresh)
    np.testing.assert_array_equal(next(trainer.source.data)["tokens"], next(fresh)["tokens"])


def test_dpo_run_learns_preferences_with_precomputed_reference(tmp_path):
    """Chosen adds (as the prompt asks), rejected subtracts: a preference a tiny model can pick up
    from the prompt in a few steps (it could not learn to tell right from wrong sums)."""
    path = tmp_path / "pairs.jsonl"
    r = random.Random(1)
    with open(path, "w") as f:
        for _ in range(200):
            a, b = r.randint(10, 99), r.randint(10, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=",
                                "chosen": f"<think>{a}+{b}</think> \\boxed{{{a + b}}}",
                                "rejected": f"<think>{a}-{b}</think> \\boxed{{{a - b}}}"}) + "\n")
    out = tmp_path / "dpo"
    rc = dpo.run_dpo(str(ROOT / "configs" / "tiny_dpo.yaml"), [
        f"data.train_files=[{path}]", "data.seq_len=48", "train.batch_size=8", "train.steps=16",
        "train.lr=3e-3", f"output.dir={out}", "output.progress=false", "output.save_every=8"])
    assert rc == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 16
    # step 1: policy == reference, so h = 0 and the sigmoid loss is exactly log 2
    np.testing.assert_allclose(recs[0]["loss"], np.log(2), rtol=1e-5)
    # Policy sums (forward+grad program) and precomputed reference sums (forward-only program)
    # are the same float32 values from two XLA programs, so they may differ in the last bits
    # (AVX-512: one sum 1 ulp off, margin -9.5e-8). With each sum S within 4 ulp <= 4 eps |S|
    # (S < 0): |margin| <= beta * 4 eps (|logps/chosen| + |logps/rejected|), ~1e-5 here; a
    # misaligned reference would give O(beta).
    bound = 0.1 * 4 * np.finfo(np.float32).eps * (  # beta = 0.1 (configs/tiny_dpo.yaml)
        abs(recs[0]["logps/chosen"]) + abs(recs[0]["logps/rejected"]))
    assert abs(recs[0]["rewards/margin"]) <= bound, (recs[0]["rewards/margin"], bound)
    late = recs[-4:]
    assert np.mean([x["loss"] for x in late]) < 0.5
    assert np.mean([x["rewards/accuracy"] for x in late]) > 0.8
    assert np.mean([x["rewards/margin"] for x in late]) > 0
    with np.load(out / "reference_logps.npz") as z:  # the one-pass reference, [steps, batch]
        assert z["chosen"].shape == (16, 8) and np.all(z["chosen"] < 0)
