"""Chunked LM-head statistics (`train.logits_chunk`): the same numbers and gradients as the full
[B, T, V] logits, for every step kind, with a fraction of the memory."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_reason.model.config import ModelConfig
from phi_reason.model.decoder import hidden_states
from phi_reason.model.params import init_params
from phi_reason.train.losses import token_stats
from phi_reason.train.steps import make_dpo_step, make_pg_step, make_sft_step
from phi_reason.train.token_stats import chunked_token_stats, model_token_stats
from test_train_steps import B, CFG, dpo_batch, fresh_state, leaves_close, rows, train_cfg


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.PRNGKey(3))
    batch = {k: jnp.asarray(v) for k, v in rows(np.random.default_rng(0)).items()}
    return params, batch


@pytest.mark.parametrize("chunk", [1, 5, 23, 64])  # 23 = T - 1 exactly; 64 > T
def test_chunked_stats_equal_full_logits(model, chunk):
    params, batch = model
    full = model_token_stats(params, CFG, batch, entropy=True)
    # the independent reference: the model's full logits through the plain formula
    from phi_reason.model.decoder import forward
    logits = forward(params, batch["tokens"], CFG, batch["positions"], batch["segment_ids"])
    ref = token_stats(logits, batch["tokens"], entropy=True)
    got = model_token_stats(params, CFG, batch, chunk=chunk, entropy=True)
    for name, a, r, g in zip(ref._fields, full, ref, got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r), err_msg=name)
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    assert np.all(np.asarray(got.logp)[:, 0] == 0)  # position 0 is never a target


def test_chunked_gradient_equals_full(model):
    params, batch = model
    mask = jnp.asarray(batch["loss_mask"])

    def loss(p, chunk):
        s = model_token_stats(p, CFG, batch, chunk=chunk, entropy=True)
        return jnp.sum(s.logp * mask) + 0.1 * jnp.sum(s.entropy * mask)

    g_full = jax.grad(loss)(params, 0)
    g_chunk = jax.grad(loss)(params, 7)
    leaves_close(g_chunk, g_full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["sft", "pg", "dpo"])
def test_steps_with_logits_chunk_match_full(kind):
    rng = np.random.default_rng(11)
    if kind == "sft":
        make, batch, extra = make_sft_step, rows(rng), {}
    elif kind == "pg":
        make, extra = make_pg_step, {"pg.loss_type": "grpo"}
        batch = dict(rows(rng), advantages=rng.normal(size=B).astype(np.float32))
    else:
        make, batch, extra = make_dpo_step, dpo_batch(rng), {"dpo.beta": 0.5}
    tc = train_cfg(**extra)
    tc_chunk = dataclasses.replace(tc, logits_chunk=6)
    ref = kind == "dpo"
    s_full, m_full = make(CFG, tc)(fresh_state(tc, ref=ref), batch)
    s_chunk, m_chunk = make(CFG, tc_chunk)(fresh_state(tc_chunk, ref=ref), batch)
    np.testing.assert_allclose(float(m_chunk["loss"]), float(m_full["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_chunk["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-4)
    leaves_close(s_chunk.params, s_full.params, rtol=1e-4, atol=1e-6)


def test_chunking_removes_the_logits_from_memory():
    """XLA's own buffer assignment: the chunked gradient needs less temporary memory than the
    full one by most of the [B, T, V] float32 logits (which autodiff otherwise keeps)."""
    cfg = ModelConfig.preset("tiny").replace(vocab_size=8192)
    params = init_params(cfg, jax.random.PRNGKey(0))
    b, t = 2, 256
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, cfg.vocab_size)
    seg = jnp.ones((b, t), jnp.int32)

    def temp_bytes(chunk):
        def loss(p):
            h = hidden_states(p, tokens, cfg, segment_ids=seg)
            if chunk:
                return jnp.sum(chunked_token_stats(p, h, tokens, cfg, chunk).logp)
            from phi_reason.model.decoder import logits_from_hidden
            return jnp.sum(token_stats(logits_from_hidden(p, h, cfg), tokens).logp)
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * cfg.vocab_size * 4
    full, chunked = temp_bytes(0), temp_bytes(32)
    assert full > logits_bytes  # the full path holds at least one [B, T, V] float32 array
    assert full - chunked > 0.75 * logits_bytes, (full, chunked, logits_bytes)
