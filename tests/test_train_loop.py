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
from phi_reason.train import loop
from phi_reason.train.steps import make_sft_step

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
            "output.dir": str(out), "output.progress": "false", "output.tensorboard": "false"}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def losses(out):
    recs = [json.loads(x) for x in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in recs]


def test_sft_loss_falls_on_synthetic_task(addition_file, tmp_path):
    out = tmp_path / "run"
    rc = loop.run_sft(TINY_SFT, overrides(addition_file, out, **{
        "train.steps": 40, "train.lr": 3e-3, "output.save_every": 100,
        "output.tensorboard": "true"}))
    assert rc == 0
    hist = losses(out)
    assert [h[0] for h in hist] == list(range(1, 41))
    first, last = hist[0][1], np.mean([h[1] for h in hist[-5:]])
    assert first > 5.0  # ~ln(512) at random init
    assert last < 0.4 * first, (first, last)
    assert (out / "checkpoints" / "40").is_dir() and (out / "final").is_dir()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert load_run_config(str(out / "config.yaml")).train.steps == 40
    # the exported weights load as a pretrained model
    from phi_reason.checkpoint import load_pretrained
    cfg, params = load_pretrained(str(out / "final"))
    assert cfg.num_hidden_layers == 2 and np.isfinite(np.asarray(params["embed"])).all()


HARNESS = r"""
import os, signal, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from phi_reason.train.loop import run_sft
config, overrides, resume, at, sig = sys.argv[1], sys.argv[2].split("|"), sys.argv[3] == "1", \
    int(sys.argv[4]), sys.argv[5]
def preempt(trainer, step):
    if step == at:
        os.kill(os.getpid(), getattr(signal, sig))
sys.exit(run_sft(config, overrides, resume=resume, hooks=[preempt] if at else []))
"""


def launch(over, resume=False, at=0, sig="SIGKILL", cache=None):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen([sys.executable, "-c", HARNESS, TINY_SFT, "|".join(over),
                             "1" if resume else "0", str(at), sig],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.mark.slow
def test_preemption_resume_is_bitwise_identical(addition_file, tmp_path):
    cache = tmp_path / "xla_cache"
    kw = {"train.steps": 12, "output.save_every": 3}
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "preempted"
    ref = launch(overrides(addition_file, ref_dir, **kw), cache=cache)
    # SIGKILL right after step 8 is dispatched (checkpoint 6 may still be in flight)
    killed = launch(overrides(addition_file, run_dir, **kw), at=8, sig="SIGKILL", cache=cache)
    rc_ref, err_ref = finish(ref)
    rc, err = finish(killed)
    assert rc_ref == 0, err_ref
    assert rc == -9, err
    # resume; SIGTERM after step 10: the run saves step 10 and exits 0
    rc, err = finish(launch(overrides(addition_file, run_dir, **kw), resume=True, at=10,
                            sig="SIGTERM", cache=cache))
    assert rc == 0, err
    assert "resumed" in err and "SIGTERM: saved checkpoint at step 10" in err
    assert (run_dir / "checkpoints" / "10").is_dir()
    assert not (run_dir / "final").exists()  # a preempted run does not export
    rc, err = finish(launch(overrides(addition_file, run_dir, **kw), resume=True, cache=cache))
    assert rc == 0, err
    assert "resumed from" in err and "at step 10" in err
    want, got = losses(ref_dir), losses(run_dir)
    assert [g[0] for g in got] == list(range(1, 13))
    assert got == want  # bitwise: loss, grad norm and lr of every step


def test_nonfinite_loss_stops_naming_the_step_and_checkpoint_restores(addition_file, tmp_path,
                                                                      capsys):
    out = tmp_path / "nan"
    run = load_run_config(TINY_SFT, overrides(addition_file, out, **{
        "train.steps": 8, "output.save_every": 3}))

    class Poisoned:
        """The pipeline, with a NaN in the 5th batch's loss mask."""

        def __init__(self, inner):
            self.inner, self.n = inner, 0

        def __next__(self):
            batch = next(self.inner)
            self.n += 1
            if self.n == 5:
                batch = dict(batch, loss_mask=batch["loss_mask"].astype(np.float32))
                batch["loss_mask"][0, 10] = np.nan
            else:
                batch = dict(batch, loss_mask=batch["loss_mask"].astype(np.float32))
            return batch

        def get_state(self):
            return {"inner": self.inner.get_state(), "n": self.n}

        def set_state(self, s):
            self.inner.set_state(s["inner"])
            self.n = s["n"]

    built = {}

    def factory():
        mesh, cfg, params, data, total, tc = loop._setup(run, "sft")
        state = loop._new_state(cfg, tc, params, mesh)
        built["make"] = lambda: (loop._new_state(cfg, tc, loop.build_model(run)[1], None),
                                 Poisoned(loop.build_data(run, "sft")[0]))
        built["trainer"] = loop.Trainer(run, cfg, state, make_sft_step(cfg, tc), Poisoned(data),
                                        total)
        return built["trainer"], cfg

    assert loop._run(factory, resume=False) == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 5" in err
    assert "last checkpoint is step 3" in err
    trainer = built["trainer"]
    assert trainer.manager.all_steps() == [3]  # nothing was saved after the bad step
    # a fresh trainer restores step 3: finite params equal to what step 3 had, data position 3
    state, data = built["make"]()
    t2 = loop.Trainer(run, trainer.cfg, state, trainer.step_fn, data, 8)
    assert t2.restore() == 3
    assert int(t2.state.step) == 3 and data.n == 3
    leaves = jax.tree_util.tree_leaves(t2.state.params)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert not np.allclose(np.asarray(t2.state.params["embed"]),
                           np.asarray(built["make"]()[0].params["embed"]))  # trained, not init


def test_dpo_run_learns_preferences_with_precomputed_reference(tmp_path):
    path = tmp_path / "pairs.jsonl"
    r = random.Random(1)
    with open(path, "w") as f:
        for _ in range(200):
            a, b = r.randint(10, 99), r.randint(10, 99)
            wrong = a + b + r.choice([-11, -10, -1, 1, 10, 11])
            f.write(json.dumps({"prompt": f"{a}+{b}=",
                                "chosen": f"<think>{a}+{b}</think> \\boxed{{{a + b}}}",
                                "rejected": f"<think>{a}+{b}</think> \\boxed{{{wrong}}}"}) + "\n")
    out = tmp_path / "dpo"
    rc = loop.run_dpo(str(ROOT / "configs" / "tiny_dpo.yaml"), [
        f"data.train_files=[{path}]", "data.seq_len=48", "train.batch_size=8", "train.steps=16",
        "train.lr=3e-3", f"output.dir={out}", "output.progress=false", "output.save_every=8"])
    assert rc == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 16
    # step 1: policy == reference, so h = 0 and the sigmoid loss is exactly log 2
    np.testing.assert_allclose(recs[0]["loss"], np.log(2), rtol=1e-5)
    assert recs[0]["rewards/margin"] == 0.0
    late = recs[-4:]
    assert np.mean([x["loss"] for x in late]) < 0.6
    assert np.mean([x["rewards/accuracy"] for x in late]) > 0.7
    assert np.mean([x["rewards/margin"] for x in late]) > 0
    with np.load(out / "reference_logps.npz") as z:  # the one-pass reference, [steps, batch]
        assert z["chosen"].shape == (16, 8) and np.all(z["chosen"] < 0)
