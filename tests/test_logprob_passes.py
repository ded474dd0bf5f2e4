"""The log-prob passes without a gradient (RL old-policy / reference log-probs, the DPO reference
precompute): micro-batched and chunked they give the numbers of the full [B, T, V] logits, and
XLA's buffers for them hold no [B, T, V] array. The frozen reference: compute dtype, sharded as
the policy, the same log-probs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_steps import CFG, B, dpo_batch, rows

from phi_reason.model.decoder import forward
from phi_reason.model.params import abstract_params, init_params
from phi_reason.model.sharded import param_shardings, sharded_init
from phi_reason.sharding.mesh import make_mesh
from phi_reason.train.policy import frozen_reference, make_token_logprob_fn
from phi_reason.train.steps import make_reference_logps_fn


def np_logprobs(params, batch, cfg=CFG, temperature=None):
    """The independent reference: the model's full logits, divided by T, log-softmax in float64,
    the picked target's value aligned to its token (position 0: 0)."""
    logits = np.asarray(forward(params, batch["tokens"], cfg, batch["positions"],
                                batch["segment_ids"]), np.float64)
    if temperature is not None:
        logits = logits / np.asarray(temperature, np.float64)[:, None, None]
    logits = logits[:, :-1]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    tokens = np.asarray(batch["tokens"])
    picked = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    return np.pad(picked - lse, ((0, 0), (1, 0)))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(5))


@pytest.mark.parametrize("chunk, micro", [(0, 1), (5, 1), (0, 2), (7, 4)])
def test_token_logprobs_chunked_and_micro_batched_equal_full(params, chunk, micro):
    batch = rows(np.random.default_rng(1))
    batch = {k: batch[k] for k in ("tokens", "positions", "segment_ids")}
    batch["temperature"] = np.asarray([1.0, 0.6, 1.3, 0.9], np.float32)[:B]
    got = np.asarray(make_token_logprob_fn(CFG, None, chunk, micro)(params, batch))
    want = np_logprobs(params, batch, temperature=batch["temperature"])
    valid = np.asarray(batch["segment_ids"]) != 0
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk, micro", [(0, 1), (6, 2)])
def test_dpo_reference_pass_chunked_and_micro_batched_equal_full(params, chunk, micro):
    from phi_reason.train.losses import target_mask

    batch = dpo_batch(np.random.default_rng(2))
    c, r = make_reference_logps_fn(CFG, None, chunk, micro)(params, batch)
    for side, got in (("chosen_", c), ("rejected_", r)):
        sb = {k: batch[side + k] for k in ("tokens", "positions", "segment_ids", "loss_mask")}
        want = (np_logprobs(params, sb) * np.asarray(target_mask(sb))).sum(-1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_logprob_pass_holds_no_full_logits():
    """XLA's temporary buffers for the pass: the unchunked program holds at least one float32
    [B, T, V] array; with chunk 32 and 4 micro-batches less than a quarter of one."""
    cfg = CFG.replace(vocab_size=8192, num_hidden_layers=2)
    b, t = 8, 256
    full_logits = b * t * cfg.vocab_size * 4
    abstract = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32),
                "positions": jax.ShapeDtypeStruct((b, t), jnp.int32),
                "segment_ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
                "temperature": jax.ShapeDtypeStruct((b,), jnp.float32)}
    temp = {}
    for chunk, micro in ((0, 1), (32, 4)):
        compiled = make_token_logprob_fn(cfg, None, chunk, micro).lower(
            abstract_params(cfg), abstract).compile()
        temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[0] >= full_logits, temp
    assert temp[32] < full_logits / 4, temp


def test_frozen_reference_is_compute_dtype_sharded_and_gives_the_same_logprobs():
    cfg = CFG.replace(dtype="bfloat16")
    mesh = make_mesh(1, 8, 1)
    params = sharded_init(cfg, jax.random.key(2), mesh)
    ref = frozen_reference(params, cfg)
    want_sh = param_shardings(cfg, mesh)
    for (path, w), r, sh in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(want_sh)):
        assert w.dtype == jnp.float32 and r.dtype == jnp.bfloat16, path
        assert r.sharding.is_equivalent_to(sh, r.ndim), path
    batch = rows(np.random.default_rng(3), b=16)  # 2 micro-batches of 8 rows over fsdp=8
    batch = {k: batch[k] for k in ("tokens", "positions", "segment_ids")}
    fn = make_token_logprob_fn(cfg, mesh, logits_chunk=5, micro_batches=2)
    # every weight is cast to bf16 before use: the bf16 copy computes the same log-probs
    np.testing.assert_allclose(np.asarray(fn(ref, batch)), np.asarray(fn(params, batch)),
                               rtol=0, atol=1e-6)
    # a float32-compute model keeps a float32 reference, in its own buffers: deleting the
    # policy's (what donation does) leaves it readable
    policy = init_params(CFG, jax.random.PRNGKey(0))
    ref32 = frozen_reference(policy, CFG)
    want = jax.device_get(policy)
    for w in jax.tree_util.tree_leaves(policy):
        w.delete()
    for r, w in zip(jax.tree_util.tree_leaves(ref32), jax.tree_util.tree_leaves(want)):
        assert r.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(r), w)
