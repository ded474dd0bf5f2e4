"""RL numerics that must agree with what the sampler did: log-probs at the sampling temperature,
the sampler/trainer mismatch logged every step, truncated importance sampling, and the config
checks of the options behind them. Tiny random model, a stand-in grader (no worker processes)."""
import dataclasses
import time

import jax
import numpy as np
import pytest

from phi_reason.config import RunConfigError
from phi_reason.data.chat import render_prompt, stop_ids
from phi_reason.data.tokenizer import CharTokenizer
from phi_reason.jobs.rl_config import load_rl_config
from phi_reason.jobs.rl_loop import RLLoop
from phi_reason.jobs.rl_pending import training_rows
from phi_reason.model.config import ModelConfig
from phi_reason.model.params import init_params
from phi_reason.train.policy import logprob_mismatch
from phi_reason.train.rollouts import Prompt

FMT = "plain"


class _Verdict:
    def __init__(self, correct):
        self.correct = correct

    def result(self):
        return self


class SubstringGrader:
    """Grader stand-in: correct when the gold answer appears in the prediction."""

    def submit(self, prediction, gold, mode):
        return _Verdict(gold in prediction)


@pytest.fixture(scope="module")
def task():
    tok = CharTokenizer()
    cfg = ModelConfig.preset("tiny")
    params = jax.device_get(init_params(cfg, jax.random.key(1)))
    prompts = [Prompt(render_prompt(f"Q:{n:02d}", tok, FMT), f"{n:02d}", f"p{n}", f"Q:{n:02d}")
               for n in range(40)]
    return dict(tok=tok, cfg=cfg, params=params, prompts=prompts)


def _loop(task, *extra):
    run = load_rl_config(None, [
        "rl.steps=2", "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=12",
        "rl.pad_multiple=32", "train.batch_size=16", "train.lr=1e-3", "train.schedule=constant",
        "rl.num_slots=16", "data.chat_format=plain", *extra])
    params = jax.tree_util.tree_map(np.array, task["params"])
    return RLLoop(run, task["cfg"], params, task["tok"], task["prompts"],
                  stop_ids(FMT, task["tok"]), SubstringGrader())


def _flat(rows):
    return np.concatenate([np.asarray(r, np.float64) for r in rows])


def test_old_logprobs_are_the_samplers_tempered_logprobs(task):
    """Sampled at T = 0.6 (folded into final_norm), the recomputed old log-probs are those of
    softmax(logits / 0.6): the sampler's own log-probs, up to the KV-cache path's rounding. The
    old behaviour (logprob_temperature = one) computes them at T = 1, far from the sampler's."""
    loop = _loop(task)
    groups = loop.rollout_round(task["prompts"][:4], 0.6, seed=3)
    sampler = _flat([r for g in groups for r in g.logprobs])
    old = _flat([r for g in groups for r in g.old_logprobs])
    assert sampler.size > 20 and all(g.temperature == 0.6 for g in groups)
    np.testing.assert_allclose(old, sampler, atol=1e-4)
    m = logprob_mismatch([r for g in groups for r in g.logprobs],
                         [r for g in groups for r in g.old_logprobs])
    assert m["mismatch/abs_logp_diff_mean"] < 1e-5 and m["mismatch/k3_kl"] < 1e-8

    at_one = _loop(task, "rl.logprob_temperature=one").rollout_round(task["prompts"][:4], 0.6,
                                                                     seed=3)
    old_one = _flat([r for g in at_one for r in g.old_logprobs])
    np.testing.assert_allclose(_flat([r for g in at_one for r in g.logprobs]), sampler)
    assert np.abs(old_one - sampler).mean() > 1e-2  # T = 1 is another distribution
    assert all(g.temperature == 1.0 for g in at_one)


def test_step_logs_mismatch_and_tis_without_recompiling(task):
    """Three RL steps with the temperature annealed 0.7 -> 0.5 and TIS on: each step logs the
    sampler/trainer mismatch (tiny here: the same float32 numbers by two programs) and the TIS
    weights (~1), and a new temperature compiles neither the log-prob pass nor the update step.
    (The first update takes the initial host params, the later ones device arrays: one compile
    each, whatever the temperature, so the count is taken after step 2.)"""
    loop = _loop(task, "rl.steps=3", "rl.temperature.start=0.7", "rl.temperature.end=0.5",
                 "rl.temperature.anneal_steps=2", "train.pg.tis=true", "train.pg.beta=0.01")
    history = [loop.step(), loop.step()]
    compiled = loop.logprob_fn._cache_size(), loop.pg_step._cache_size()
    history.append(loop.step())
    assert [h["rl/temperature"] for h in history] == pytest.approx([0.7, 0.6, 0.5])
    for h in history:
        assert 0 <= h["mismatch/abs_logp_diff_mean"] < 1e-4
        assert 0 <= h["mismatch/k3_kl"] < 1e-6
        assert h["mismatch/ratio_min"] <= 1.0 <= h["mismatch/ratio_max"] < 1.001
        assert h["train/tis/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert h["train/tis/clip_fraction"] == 0.0
        # policy == reference at the first update, both at the sampling temperature: KL ~ 0
        assert h["train/ratio/max"] < 1.05
    assert history[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)
    # the third step's new temperature compiled nothing new
    assert (loop.logprob_fn._cache_size(), loop.pg_step._cache_size()) == compiled


def test_minibatches_carry_per_row_temperature_and_sampler_logprobs(task):
    loop = _loop(task, "train.pg.tis=true")
    groups = loop.rollout_round(task["prompts"][:4], 0.8, seed=5)
    for g in groups:
        g.advantages = np.zeros(len(g.tokens))
    (batch,) = loop.minibatches(training_rows(groups), np.random.default_rng(0))
    assert batch["temperature"].shape == (16,) and batch["temperature"].dtype == np.float32
    np.testing.assert_array_equal(batch["temperature"], np.float32(0.8))
    assert batch["sampler_logprobs"].shape == batch["old_logprobs"].shape
    # the sampler's log-probs sit on the completion tokens, like the old ones
    np.testing.assert_array_equal(batch["sampler_logprobs"] != 0, batch["old_logprobs"] != 0)


def test_logprob_mismatch_matches_numpy():
    rng = np.random.default_rng(0)
    sampler = [rng.normal(size=n) - 2 for n in (3, 0, 5)]
    trainer = [s + rng.normal(size=s.shape) * 0.1 for s in sampler]
    d = np.concatenate([t - s for s, t in zip(sampler, trainer)])
    m = logprob_mismatch(sampler, trainer)
    np.testing.assert_allclose(m["mismatch/abs_logp_diff_mean"], np.mean(np.abs(d)))
    np.testing.assert_allclose(m["mismatch/k3_kl"], np.mean(np.exp(d) - 1 - d))
    np.testing.assert_allclose(m["mismatch/ratio_max"], np.exp(d).max())
    np.testing.assert_allclose(m["mismatch/ratio_min"], np.exp(d).min())
    assert np.isnan(logprob_mismatch([[]], [[]])["mismatch/k3_kl"])
    with pytest.raises(ValueError, match="shape"):
        logprob_mismatch([[1.0]], [[1.0, 2.0]])


def test_fidelity_config_options_checked_at_load():
    cfg = load_rl_config(None)
    assert cfg.rl.logprob_temperature == "sampling"
    assert cfg.train.pg.loss_agg is None and cfg.train.pg.tis is False
    assert cfg.train.pg.tis_cap == 2.0
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-mean-token-sum-norm"):
        assert load_rl_config(None, [f"train.pg.loss_agg={agg}"]).train.pg.loss_agg == agg
    with pytest.raises(RunConfigError, match="train.pg.loss_agg: unknown 'token_mean'; "
                                             "registered: token-mean"):
        load_rl_config(None, ["train.pg.loss_agg=token_mean"])
    with pytest.raises(RunConfigError, match="rl.logprob_temperature"):
        load_rl_config(None, ["rl.logprob_temperature=sampled"])
    with pytest.raises(RunConfigError, match="tis_cap: must be positive"):
        load_rl_config(None, ["train.pg.tis=true", "train.pg.tis_cap=0"])
    with pytest.raises(RunConfigError, match="use rl.old_logprobs=recompute"):
        load_rl_config(None, ["train.pg.tis=true", "rl.old_logprobs=sampler",
                              "train.batch_size=64"])
    annealed = ["rl.temperature.start=1.0", "rl.temperature.end=0.6",
                "rl.temperature.anneal_steps=5"]
    with pytest.raises(RunConfigError, match="not at the trainer's temperature"):
        load_rl_config(None, ["train.pg.tis=true", "rl.fold_temperature=false", *annealed])
    # the sampler's old log-probs are exact at any temperature once both sides are tempered
    ok = load_rl_config(None, ["rl.old_logprobs=sampler", "train.batch_size=64", *annealed])
    assert ok.sampler_logprobs_match()
    assert not dataclasses.replace(ok, rl=dataclasses.replace(
        ok.rl, logprob_temperature="one")).sampler_logprobs_match()
    with pytest.raises(RunConfigError, match="only exact with mu = 1"):
        load_rl_config(None, ["rl.old_logprobs=sampler", "train.batch_size=64",
                              "rl.logprob_temperature=one", *annealed])
    # 1.0 -> 0.0 passes through tempered steps: not "temperature 1 everywhere"
    with pytest.raises(RunConfigError, match="only exact with mu = 1"):
        load_rl_config(None, ["rl.old_logprobs=sampler", "train.batch_size=64",
                              "rl.logprob_temperature=one", "rl.temperature.end=0.0",
                              "rl.temperature.anneal_steps=5"])
    assert load_rl_config(None, ["rl.old_logprobs=sampler", "train.batch_size=64",
                                 "rl.logprob_temperature=one"]).sampler_logprobs_match()


class SlowGrader(SubstringGrader):
    """Each verdict takes 20 ms to come back: the step's wait for the grader."""

    def submit(self, prediction, gold, mode):
        verdict = super().submit(prediction, gold, mode)

        class Slow:
            def result(self_):
                time.sleep(0.02)
                return verdict
        return Slow()


def test_step_time_breakdown_and_tokens(task):
    """Per-step phases (sampling, log-prob passes, the wait for the grader, updates) within the
    step's wall time; tokens generated = the sampled completions' lengths; RL tokens/s as NeMo-RL
    defines it: all prompt + completion tokens of the step / step time / devices."""
    loop = _loop(task, "train.pg.beta=0.01")
    loop.grader = SlowGrader()
    m = loop.step()
    phases = [m[f"time/{p}_s"] for p in ("sample", "logprob", "grade_wait", "update")]
    assert all(p > 0 for p in phases) and sum(phases) <= m["time/step_s"]
    assert m["time/grade_wait_s"] >= 16 * 0.02  # 4 prompts x 4 samples, graded one by one
    rows = m["rollout/groups_sampled"] * 4
    assert m["tokens/generated"] == pytest.approx(m["rollout/length_mean"] * rows)
    assert len({len(p.ids) for p in task["prompts"]}) == 1  # "Q:NN": every prompt one length
    prompt_tokens = rows * len(task["prompts"][0].ids)
    total = (m["tokens/generated"] + prompt_tokens) / m["time/step_s"]
    assert m["time/tokens_per_s_per_device"] == pytest.approx(total, rel=1e-6)
    assert m["tokens/trained"] > m["tokens/generated"]  # prompts and completions, every update
