"""Rollout scoring and the policy-gradient batch layout."""
import numpy as np
import pytest

from phi_reason.train.rewards import BINARY_REWARDS, make_reward_fn
from phi_reason.train.rollouts import Prompt, build_pg_batch, pad_length, score_groups


def test_score_groups_prompt_major():
    prompts = [Prompt([1, 2], "3", "a"), Prompt([4], "5", "b")]
    tokens = [[7, 9], [8], [7, 7, 9], [6, 9]]
    logprobs = [[-0.1, -0.2], [-0.3], [-0.1, -0.1, -0.1], [-1.0, -2.0]]
    finish = ["stop", "length", "stop", "stop"]
    texts = ["x", "y", "z", "w"]
    correct = [True, True, False, True]
    groups = score_groups(prompts, tokens, logprobs, finish, texts, correct, 2,
                          make_reward_fn(BINARY_REWARDS))
    assert [g.prompt.uid for g in groups] == ["a", "b"]
    # Row 1 is correct but truncated: binary reward counts it as wrong.
    np.testing.assert_array_equal(groups[0].rewards, [1.0, -1.0])
    np.testing.assert_array_equal(groups[1].rewards, [-1.0, 1.0])
    np.testing.assert_array_equal(groups[0].finished, [True, False])
    np.testing.assert_array_equal(groups[1].lengths, [3, 2])
    with pytest.raises(ValueError, match="texts: expected 4 rows"):
        score_groups(prompts, tokens, logprobs, finish, texts[:3], correct, 2,
                     make_reward_fn(BINARY_REWARDS))


def test_build_pg_batch_layout():
    batch = build_pg_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], [0.5, -1.0], length=8,
                           old_logprobs=[[-0.5, -0.6], [-0.7, -0.8, -0.9]], pad_id=0)
    np.testing.assert_array_equal(batch["tokens"], [[1, 2, 3, 5, 6, 0, 0, 0],
                                                    [4, 7, 8, 9, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(batch["segment_ids"][1], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 0, 1, 1, 0, 0, 0],
                                                       [0, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_allclose(batch["old_logprobs"][0], [0, 0, 0, -0.5, -0.6, 0, 0, 0])
    np.testing.assert_allclose(batch["old_logprobs"][1], [0, -0.7, -0.8, -0.9, 0, 0, 0, 0])
    np.testing.assert_allclose(batch["advantages"], [0.5, -1.0])
    assert batch["tokens"].dtype == np.int32 and batch["advantages"].dtype == np.float32
    with pytest.raises(ValueError, match="row 0"):
        build_pg_batch([[1, 2, 3]], [[5, 6]], [0.0], length=4)
    with pytest.raises(ValueError, match="log-probs for 2 tokens"):
        build_pg_batch([[1]], [[5, 6]], [0.0], length=4, old_logprobs=[[-1.0]])


def test_pad_length():
    assert pad_length(33, 32) == 64 and pad_length(64, 32) == 64
    assert pad_length(33, 32, cap=40) == 40 and pad_length(50, 32, cap=40) == 50


def test_rl_configs_carry_the_paper_values():
    import pathlib

    from phi_reason.jobs.rl_config import load_rl_config

    root = pathlib.Path(__file__).parents[1] / "configs"
    plus = load_rl_config(str(root / "phi4_reasoning_plus_grpo.yaml"))
    assert (plus.rl.prompts_per_step, plus.rl.group_size, plus.rl.steps) == (64, 8, 90)
    assert plus.train.lr == 5e-8 and plus.train.pg.beta == 0.001
    assert plus.train.pg.entropy_coef == 0.001 and plus.rl.max_new_tokens == 31744
    assert [(s.name, s.weight) for s in plus.reward_specs()] == [
        ("phi4_plus_length", pytest.approx(8 / 13)), ("repetition", pytest.approx(1 / 13))]
    mini = load_rl_config(str(root / "phi4_mini_reasoning_rl.yaml"))
    assert [s.name for s in mini.reward_specs()] == ["binary"] and mini.train.lr == 5e-7
    assert mini.rl.max_prompt_tokens + mini.rl.max_new_tokens == 25600
    t = mini.rl.temperature.build()
    assert t(0) == 1.0 and t(mini.rl.temperature.anneal_steps) == pytest.approx(0.6)
    assert t(10_000) == pytest.approx(0.6) and mini.rl.prompt_filter and mini.rl.dynamic_sampling
    load_rl_config(str(root / "tiny_rl.yaml"))


def test_rl_config_errors():
    from phi_reason.config import RunConfigError
    from phi_reason.jobs.rl_config import load_rl_config

    with pytest.raises(RunConfigError, match="did you mean 'rl.group_size'"):
        load_rl_config(None, ["rl.group_sise=4"])
    with pytest.raises(RunConfigError, match="must divide"):
        load_rl_config(None, ["rl.prompts_per_step=3", "rl.group_size=3", "train.batch_size=4"])
    with pytest.raises(RunConfigError, match="only exact with mu = 1"):
        load_rl_config(None, ["rl.old_logprobs=sampler", "rl.mu=2", "train.batch_size=64"])
    with pytest.raises(RunConfigError, match="unknown reward"):
        load_rl_config(None, ["rl.rewards=[{name: nope}]"])


def test_fold_temperature_divides_logits():
    from phi_reason.model.config import ModelConfig
    from phi_reason.model.decoder import logits_from_hidden
    from phi_reason.train.policy import fold_temperature

    # final_norm enters the logits only here (final RMSNorm, then the LM head); the weights that
    # logits_from_hidden reads are built directly (init_params is far slower than this check).
    rng = np.random.default_rng(0)
    for tied in (True, False):
        cfg = ModelConfig.preset("tiny").replace(tie_word_embeddings=tied)
        hid, vocab = cfg.hidden_size, cfg.vocab_size
        params = {"final_norm": rng.normal(1.0, 0.1, hid).astype(np.float32),
                  "embed": rng.normal(size=(vocab, hid)).astype(np.float32)}
        if not tied:
            params["lm_head"] = rng.normal(size=(vocab, hid)).astype(np.float32)
        h = rng.normal(size=(2, 3, hid)).astype(np.float32)
        base = np.asarray(logits_from_hidden(params, h, cfg))
        folded_params = fold_temperature(params, 0.6)
        folded = np.asarray(logits_from_hidden(folded_params, h, cfg))
        np.testing.assert_allclose(folded, base / 0.6, rtol=1e-5, atol=1e-5)
        assert all(folded_params[k] is params[k] for k in params if k != "final_norm")
