"""Sampling statistics end to end through `generate`, plus the pure top-k / top-p functions.

A fixed tiny model with a 16-token vocabulary; thousands of copies of one prompt, two new tokens
each (the first drawn after prefill, the second inside the decode loop). Expected frequencies come
from `forward` and numpy formulas written here: softmax(logits / T), then HF's top-k (keep the k
largest) and top-p (drop tokens whose ascending cumulative probability is <= 1 - p).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from phi_reason.engine.sampler import generate
from phi_reason.engine.sampling import SamplingParams, filtered_logits, top_p_keep
from phi_reason.model.config import ModelConfig
from phi_reason.model.decoder import forward
from phi_reason.model.params import init_params

CFG = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  original_max_position_embeddings=64, initializer_range=0.5)
PROMPT = [3, 1, 4, 1, 5]
DRAWS = 4096
ALPHA = 1e-3  # chi-square tests fail by chance once in a thousand runs; the seed is fixed anyway


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(2))


@pytest.fixture(scope="module")
def next_logits(params):
    """Logits after PROMPT and after PROMPT + [t] for every t: (first [V], second [V, V])."""
    seqs = np.array([PROMPT + [t] for t in range(CFG.vocab_size)], np.int32)
    logits = np.asarray(forward(params, jnp.asarray(seqs), CFG), np.float64)
    return logits[0, len(PROMPT) - 1], logits[:, len(PROMPT)]


def warp(logits, temperature=1.0, top_k=0, top_p=1.0):
    """HF's warpers in numpy: probabilities after temperature, top-k and top-p."""
    x = np.asarray(logits, np.float64) / temperature
    if top_k:
        kth = np.sort(x)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(x)  # ascending
        p = np.exp(x[order] - x.max())
        cum = np.cumsum(p / p.sum())
        remove = cum <= 1 - top_p
        remove[-1] = False
        x[order[remove]] = -np.inf
    p = np.exp(x - x.max())
    return p / p.sum()


def draws(params, **sampling):
    out = generate(params, CFG, [PROMPT] * DRAWS, 2, stop_tokens=(), seed=17, num_slots=1024,
                   **sampling)
    toks = np.array(out.tokens)
    assert toks.shape == (DRAWS, 2)
    return toks


def chi_square_p(counts, expected_probs_sum):
    """Pearson chi-square; cells expecting fewer than 5 draws are pooled into one."""
    keep = expected_probs_sum > 0
    assert counts[~keep].sum() == 0, "a token with zero probability was drawn"
    expected = expected_probs_sum / expected_probs_sum.sum() * counts.sum()
    big = keep & (expected >= 5)
    small = keep & ~big
    obs = list(counts[big]) + ([counts[small].sum()] if small.any() else [])
    exp = list(expected[big]) + ([expected[small].sum()] if small.any() else [])
    assert len(obs) >= 3, "too few cells for a meaningful test"
    return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("sampling", [
    dict(temperature=1.0),
    dict(temperature=1.5, top_k=4),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=2.0, top_k=6, top_p=0.7),
], ids=["t1", "topk", "topp", "topk+topp"])
def test_frequencies_match_warped_softmax(params, next_logits, sampling):
    first_logits, second_logits = next_logits
    toks = draws(params, **sampling)
    v = CFG.vocab_size
    p1 = warp(first_logits, **sampling)
    counts1 = np.bincount(toks[:, 0], minlength=v)
    assert np.all(counts1[p1 == 0] == 0), "excluded token emitted after prefill"
    assert chi_square_p(counts1, p1) > ALPHA
    # Second token (decode loop): each draw follows the distribution given its own first token.
    cond = np.stack([warp(second_logits[t], **sampling) for t in range(v)])
    allowed = cond[toks[:, 0], toks[:, 1]] > 0
    assert allowed.all(), "excluded token emitted in the decode loop"
    expected2 = cond[toks[:, 0]].sum(0)
    assert chi_square_p(np.bincount(toks[:, 1], minlength=v), expected2) > ALPHA
    if sampling.get("top_k") or sampling.get("top_p", 1.0) < 1.0:
        assert (p1 == 0).any(), "the filter excluded nothing: the test would be vacuous"


def test_top_p_keep_matches_hf_rule():
    rng = np.random.default_rng(0)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        logits = rng.normal(size=(8, 50)) * 2
        desc = -np.sort(-logits, axis=-1)
        keep = np.asarray(top_p_keep(jnp.asarray(desc, jnp.float32), top_p))
        for row, k in zip(logits, keep):
            ref = warp(row, top_p=top_p) > 0
            assert k.sum() == ref.sum()


def test_filtered_logits_candidates():
    logits = jnp.asarray([0.1, 3.0, -1.0, 2.0, 2.5, -5.0])
    vals, ids = filtered_logits(logits, SamplingParams(1.0, 1.0, 3))
    assert sorted(np.asarray(ids).tolist()) == [1, 3, 4]
    vals, ids = filtered_logits(logits, SamplingParams(0.5, 1.0, 0))
    assert ids is None
    np.testing.assert_allclose(vals, np.asarray(logits) / 0.5, rtol=1e-6)
