"""Chunked LM-head statistics (`train.logits_chunk`): the same numbers and gradients as the full
[B, T, V] logits, for every step kind. (The memory it saves, measured by XLA, is checked with the
planner in tests/test_plan.py.)"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_steps import CFG, B, dpo_batch, fresh_state, leaves_close, rows, train_cfg

from phi_reason.model.params import init_params
from phi_reason.train.losses import token_stats
from phi_reason.train.steps import make_pg_step, make_sft_step
from phi_reason.train.token_stats import model_token_stats


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.PRNGKey(3))
    batch = {k: jnp.asarray(v) for k, v in rows(np.random.default_rng(0)).items()}
    return params, batch


def test_chunked_stats_equal_full_logits(model):
    params, batch = model
    # the independent reference: the model's full logits through the plain formula
    from phi_reason.model.decoder import forward
    logits = forward(params, batch["tokens"], CFG, batch["positions"], batch["segment_ids"])
    ref = token_stats(logits, batch["tokens"], entropy=True)
    stats = jax.jit(lambda p, b, chunk: model_token_stats(p, CFG, b, chunk=chunk, entropy=True),
                    static_argnums=2)
    full = stats(params, batch, 0)
    for name, a, r in zip(ref._fields, full, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-6, atol=1e-6,
                                   err_msg=name)
    for chunk in (1, 5, 23, 64):  # 23 = T - 1 exactly; 64 > T
        got = stats(params, batch, chunk)
        for name, g, r in zip(ref._fields, got, ref):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name}, chunk {chunk}")
        assert np.all(np.asarray(got.logp)[:, 0] == 0)  # position 0 is never a target


def test_chunked_gradient_equals_full(model):
    params, batch = model
    mask = jnp.asarray(batch["loss_mask"])

    def loss(p, chunk):
        s = model_token_stats(p, CFG, batch, chunk=chunk, entropy=True)
        return jnp.sum(s.logp * mask) + 0.1 * jnp.sum(s.entropy * mask)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_full, g_chunk = grad(params, 0), grad(params, 7)
    leaves_close(g_chunk, g_full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["sft", "pg"])
def test_steps_with_logits_chunk_match_full(kind):
    rng = np.random.default_rng(11)
    if kind == "sft":
        make, batch, extra = make_sft_step, rows(rng), {}
    else:
        make, extra = make_pg_step, {"pg.loss_type": "grpo"}
        batch = dict(rows(rng), advantages=rng.normal(size=B).astype(np.float32))
    tc = train_cfg(**extra)
    tc_chunk = dataclasses.replace(tc, logits_chunk=6)
    s_full, m_full = make(CFG, tc)(fresh_state(tc), batch)
    s_chunk, m_chunk = make(CFG, tc_chunk)(fresh_state(tc_chunk), batch)
    np.testing.assert_allclose(float(m_chunk["loss"]), float(m_full["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_chunk["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-4)
    leaves_close(s_chunk.params, s_full.params, rtol=1e-4, atol=1e-6)


def test_dpo_pair_logps_with_logits_chunk_match_full(model):
    """The DPO step's sequence sums (policy and reference) go through `_pair_logps`."""
    from phi_reason.train.steps import _pair_logps

    params, _ = model
    batch = {k: jnp.asarray(v) for k, v in dpo_batch(np.random.default_rng(12)).items()}
    pair = jax.jit(lambda p, b, chunk: _pair_logps(p, CFG, b, chunk=chunk), static_argnums=2)
    for got, want in zip(pair(params, batch, 6), pair(params, batch, 0)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
