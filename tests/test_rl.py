"""End-to-end RL on a tiny model: RL beats the same steps without updates; checkpoint/resume.

Task (verifiable, learnable by a 2-layer model in seconds): "Q:NN" -> "<think></think>\\boxed{NN}"
(copy the two digits). The SFT demonstrations are biased: 60% of them give NN with the last digit
bumped by one, so after SFT the policy copies correctly only ~40% of the time and greedy decoding
usually picks the wrong digit. A verifier-driven RL run has to move that mass to the correct
answer; held-out numbers (never in SFT or RL prompts) show it generalises.
"""
import json
import os
import signal

import jax
import numpy as np
import pytest

from phi_reason.config import TrainSection
from phi_reason.data.chat import render_conversation, render_prompt, stop_ids
from phi_reason.data.tokenizer import CharTokenizer
from phi_reason.eval.pool import GraderPool
from phi_reason.jobs.rl import train_rl
from phi_reason.jobs.rl_config import load_rl_config
from phi_reason.jobs.rl_loop import RLLoop, evaluate_policy
from phi_reason.model.config import ModelConfig
from phi_reason.model.params import init_params
from phi_reason.train.advantages import nonzero_variance_groups
from phi_reason.train.optim import make_optimizer
from phi_reason.train.rollouts import Prompt
from phi_reason.train.state import TrainState
from phi_reason.train.steps import make_sft_step

FMT = "plain"
SEQ = 24


def _question(n):
    return f"Q:{n:02d}"


def _completion(n, biased):
    shown = n - n % 10 + (n % 10 + 1) % 10 if biased else n
    return f"<think></think>\\boxed{{{shown:02d}}}"


@pytest.fixture(scope="module")
def task():
    """A tiny model after 300 SFT steps on the biased demonstrations (deterministic)."""
    tok = CharTokenizer()
    cfg = ModelConfig.preset("tiny")
    rng = np.random.default_rng(0)
    order = rng.permutation(100)
    train_nums, held_nums = order[:70], order[70:]
    rows, masks = [], []
    for _ in range(300 * 32):
        n = int(rng.choice(train_nums))
        ids, mask = render_conversation(
            [{"role": "user", "content": _question(n)},
             {"role": "assistant", "content": _completion(n, rng.random() < 0.6)}], tok, FMT)
        rows.append(ids + [tok.pad_id] * (SEQ - len(ids)))
        masks.append(list(mask) + [0] * (SEQ - len(mask)))
    rows, masks = np.array(rows, np.int32), np.array(masks, np.int32)
    lengths = (rows != tok.pad_id).sum(1)
    segs = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
    pos = np.broadcast_to(np.arange(SEQ, dtype=np.int32), rows.shape)
    tc = TrainSection(steps=300, batch_size=32, lr=3e-3, schedule="constant", warmup_steps=10)
    state = TrainState.create(init_params(cfg, jax.random.key(0)), make_optimizer(tc, cfg)[0])
    step = make_sft_step(cfg, tc)
    for s in range(300):
        sl = slice(32 * s, 32 * s + 32)
        state, _ = step(state, {"tokens": rows[sl], "positions": pos[sl], "segment_ids": segs[sl],
                                "loss_mask": masks[sl]})

    def prompts(nums, tag):
        return [Prompt(render_prompt(_question(int(n)), tok, FMT), f"{int(n):02d}", f"{tag}{n}",
                       _question(int(n))) for n in nums]

    pool = GraderPool(workers=2, timeout=5.0)
    yield dict(tok=tok, cfg=cfg, params=jax.device_get(state.params), pool=pool,
               train=prompts(train_nums, "t"), held=prompts(held_nums, "h"))
    pool.close()


def _config(tmp_path, name, *extra):
    return load_rl_config(None, [
        "rl.steps=16", "rl.prompts_per_step=8", "rl.group_size=8", "rl.max_new_tokens=16",
        "rl.pad_multiple=32", "train.batch_size=64", "train.lr=1e-3", "train.schedule=constant",
        "train.steps=32", "rl.num_slots=64",  # one compilation shared by every run below
        "output.tensorboard=false", "output.progress=false", "output.save_every=100",
        "data.chat_format=plain", f"output.dir={tmp_path / name}", *extra])


def _held_out_accuracy(task, params):
    return evaluate_policy(params, task["cfg"], task["tok"], task["held"],
                           stop_ids(FMT, task["tok"]), task["pool"], max_new_tokens=16,
                           num_slots=64)["eval/accuracy"]


def _copy(params):
    return jax.tree_util.tree_map(np.array, params)


@pytest.mark.slow
def test_rl_raises_held_out_accuracy(task, tmp_path):
    before = _held_out_accuracy(task, task["params"])
    runs = {}
    for name, lr in (("rl", "1e-3"), ("no_update", "0.0")):
        run = _config(tmp_path, name, f"train.lr={lr}")
        runs[name] = train_rl(run, model=(task["cfg"], _copy(task["params"])),
                              tokenizer=task["tok"], prompts=task["train"])
    after = {k: _held_out_accuracy(task, r.params) for k, r in runs.items()}
    print(f"held-out greedy accuracy: before {before:.3f}, after {after}")
    # Same steps, same seeds, no updates: the policy and its held-out accuracy are unchanged.
    assert after["no_update"] == before
    assert after["rl"] >= before + 0.25, (before, after)
    hist = runs["rl"].history
    assert len(hist) == 16
    first = np.mean([h["rollout/accuracy"] for h in hist[:4]])
    last = np.mean([h["rollout/accuracy"] for h in hist[-4:]])
    assert last > first + 0.1, (first, last)
    for key in ("rollout/reward_mean", "rollout/reward_std", "rollout/length_correct",
                "rollout/length_incorrect", "rollout/truncation_rate", "rollout/groups_kept",
                "train/entropy", "train/clip_fraction", "time/rollout_s", "time/update_s"):
        assert key in hist[0], key
    records = [json.loads(line)
               for line in (runs["rl"].out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17))
    assert (runs["rl"].out / "final").is_dir()


def test_dynamic_sampling_in_loop_keeps_only_informative_groups(task, tmp_path):
    run = _config(tmp_path, "ds", "rl.dynamic_sampling=true", "rl.oversample=1.5")
    loop = RLLoop(run, task["cfg"], _copy(task["params"]), task["tok"], task["train"],
                  stop_ids(FMT, task["tok"]), task["pool"])
    kept, sampled = loop.collect(temperature=1.0)
    assert 0 < len(kept) <= 8 and len(sampled) >= len(kept)
    assert nonzero_variance_groups(np.stack([g.rewards for g in kept])).all()
    dropped = [g for g in sampled if all(g is not k for k in kept)]
    # Everything not kept was either uninformative or surplus beyond the batch.
    assert len(kept) == 8 or all(np.ptp(g.rewards) == 0 for g in dropped)


RESUME_RUN = ("rl.steps=4", "rl.mu=2", "rl.temperature.start=1.0", "rl.temperature.end=0.5",
              "rl.temperature.anneal_steps=4", "rl.prompt_filter=true",
              "rl.filter_all_wrong=false", "rl.max_sampling_rounds=2")


def _run(task, root, name, *extra, resume=False, hooks=()):
    return train_rl(_config(root, name, *RESUME_RUN, *extra),
                    model=(task["cfg"], _copy(task["params"])), tokenizer=task["tok"],
                    prompts=task["train"], resume=resume, hooks=hooks)


@pytest.fixture(scope="module")
def uninterrupted(task, tmp_path_factory):
    return _run(task, tmp_path_factory.mktemp("rl"), "full", "output.save_every=1")


def _records(result):
    lines = (result.out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in lines]


def _assert_same_run(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _records(a) == _records(b)


def test_rl_checkpoint_resume_matches_uninterrupted(task, uninterrupted, tmp_path):
    def preempt(trainer, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    part = _run(task, tmp_path, "resumed", "output.save_every=1", hooks=[preempt])
    assert part.steps == 2 and not (part.out / "final").exists()
    resumed = _run(task, tmp_path, "resumed", "output.save_every=1", resume=True)
    assert resumed.steps == 4
    # Same prompts drawn, same temperatures (annealing 1.0 -> 0.5 continues where it stopped),
    # same rewards and losses: the resumed log equals the uninterrupted one.
    assert [r["rl/temperature"] for r in _records(uninterrupted)] == pytest.approx(
        [1.0, 0.875, 0.75, 0.625])
    _assert_same_run(uninterrupted, resumed)
    with pytest.raises(Exception, match="already holds checkpoints"):
        _run(task, uninterrupted.out.parent, "full")


@pytest.mark.parametrize("where", ["rollout", "update"])
def test_rl_stopped_inside_a_step_resumes_exactly(task, uninterrupted, tmp_path, monkeypatch,
                                                  where):
    """SIGTERM in the middle of step 3's decoding (rows of <= 16 tokens in chunks of 4: the
    second chunk) or between its two minibatch updates: the run saves and exits at the next safe
    point, without finishing the step; --resume ends where the uninterrupted run ends, bitwise.
    The interrupted run only checkpoints when stopped (save_every 100)."""
    from phi_reason.engine import paged_sampler

    calls = {"decode": 0, "update": 0}
    decode = paged_sampler.decode_chunk

    def decode_then_signal(*args, **kw):
        calls["decode"] += 1
        if calls["decode"] == calls.get("signal_at_decode"):
            os.kill(os.getpid(), signal.SIGTERM)
        return decode(*args, **kw)

    def arm(trainer, step):  # after step 2: signal during step 3
        if step != 2:
            return
        if where == "rollout":
            calls["signal_at_decode"] = calls["decode"] + 2
            return
        loop = trainer.source.loop
        pg_step = loop.pg_step

        def update_then_signal(state, batch):
            out = pg_step(state, batch)
            calls["update"] += 1
            if calls["update"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        loop.pg_step = update_then_signal

    monkeypatch.setattr(paged_sampler, "decode_chunk", decode_then_signal)
    part = _run(task, tmp_path, "stopped", "rl.safe_point_tokens=4", hooks=[arm])
    assert part.steps == 2 and not (part.out / "final").exists()
    assert [r["step"] for r in _records(part)] == [1, 2]  # step 3 was never completed
    (saved,) = [p.name for p in (part.out / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == ("2" if where == "rollout" else "3")  # update: partial step 3
    if where == "update":
        assert calls["update"] == 1  # the second minibatch never ran
    monkeypatch.setattr(paged_sampler, "decode_chunk", decode)
    resumed = _run(task, tmp_path, "stopped", "rl.safe_point_tokens=4", resume=True)
    assert resumed.steps == 4 and (resumed.out / "final").is_dir()
    _assert_same_run(uninterrupted, resumed)


def test_rollout_dpo_pairs_are_correct_vs_incorrect(task, tmp_path):
    from phi_reason.config import load_run_config
    from phi_reason.data.sources import load_records
    from phi_reason.jobs.rollout_dpo import RolloutDPOConfig, rollout_dpo

    out = tmp_path / "pairs.jsonl"
    run = load_run_config(None, [
        "rollout.samples_per_prompt=8", "rollout.pairs_per_prompt=2", "rollout.temperature=1.0",
        "rollout.top_p=1.0", "rollout.max_new_tokens=16", "rollout.prompts_per_chunk=16",
        f"rollout.output={out}", "data.chat_format=plain", f"output.dir={tmp_path}"],
        schema=RolloutDPOConfig)
    prompts = task["train"][:32]
    stats = rollout_dpo(run, model=(task["cfg"], _copy(task["params"])), tokenizer=task["tok"],
                        prompts=prompts)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats["pairs"] == len(lines) > 0
    assert not out.with_name(out.name + ".partial").exists()
    by_uid = {p.uid: p for p in prompts}
    # Regrade every pair independently: chosen correct, rejected incorrect, for its own prompt.
    verdicts = task["pool"].grade_many(
        [(x[k], by_uid[x["uid"]].answer) for x in lines for k in ("chosen", "rejected")], "reward")
    assert [v.correct for v in verdicts] == [True, False] * len(lines)
    for x in lines:
        assert x["prompt"] == [{"role": "user", "content": by_uid[x["uid"]].text}]
        assert x["answer"] == by_uid[x["uid"]].answer
    assert max(sum(x["uid"] == u for x in lines) for u in by_uid) <= 2
    # The file is what `phi-reason dpo` reads.
    assert len(load_records(str(out), "dpo")) == len(lines)
    with pytest.raises(Exception, match="already exists"):
        rollout_dpo(run, model=(task["cfg"], task["params"]), tokenizer=task["tok"],
                    prompts=prompts)


def test_kl_to_frozen_reference_when_beta_positive(task, tmp_path):
    run = _config(tmp_path, "kl", "train.pg.beta=0.05", "rl.mu=2", "rl.steps=1")
    loop = RLLoop(run, task["cfg"], _copy(task["params"]), task["tok"], task["train"],
                  stop_ids(FMT, task["tok"]), task["pool"])
    metrics = loop.step()
    # Two passes over the rollouts: the first starts at the reference (KL exactly 0), the second
    # has moved away from it, so the mean KL over the updates is positive. Its size depends on
    # the sampled rollouts (0.01-0.4 over rl.seed 0-2 here), so no upper bound is asserted.
    assert 0.0 < metrics["train/kl"] and np.isfinite(metrics["train/kl"])
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
        jax.tree_util.tree_leaves(loop.state.params), jax.tree_util.tree_leaves(task["params"]))]
    assert max(moved) > 0
    for a, b in zip(jax.tree_util.tree_leaves(loop.ref_params),
                    jax.tree_util.tree_leaves(task["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
