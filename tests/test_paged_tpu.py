"""JAX's ragged paged attention TPU kernel (paged_tpu.py) against `paged.paged_attention`, run in
Pallas TPU interpret mode on CPU; and the kernel page layout of the pool (init_pool
layout="kernel") through prefill, copies and decode on the XLA path, against the split layout.

JAX 0.10's TPU interpreter folds only indexers into a read range: the kernel reads its VMEM page
buffer through `.reshape(...)` (and, for bf16, `.bitcast(uint32)`) views, which it rejects
("'ReshapeTransform' object has no attribute 'indices'"). `_views_in_interpreter` applies those
view transforms to the buffer in numpy after the interpreter's own read; the kernel itself runs
unchanged. (The generic `interpret=True` HLO interpreter cannot run it either: no strided loads.)
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import TINY_SHAPES

from phi_reason.engine import paged_tpu
from phi_reason.engine.paged import (
    copy_blocks,
    decode_chunk,
    init_pool,
    paged_attention,
    prefill_blocks,
)
from phi_reason.engine.sampling import SamplingParams
from phi_reason.model.kv_cache import split_layers
from phi_reason.model.params import init_params

try:
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as _ipc
    from jax._src.pallas.mosaic.interpret import utils as _iu
    from jax._src.state import indexing as _indexing
    from jax._src.state import types as _st
    from jax.experimental.pallas import tpu as pltpu
    _INTERPRET = hasattr(pltpu, "force_tpu_interpret_mode") and hasattr(_ipc.get, "__wrapped__")
except Exception:  # pragma: no cover - depends on the installed jax
    _INTERPRET = False

needs_interpret = pytest.mark.skipif(
    not (_INTERPRET and paged_tpu.kernel_available()),
    reason="this jax has no Pallas TPU interpret mode or no ragged_paged_attention")


def _apply_view(x, t):
    if isinstance(t, _st.ReshapeTransform):
        return x.reshape(t.shape)
    if isinstance(t, _st.BitcastTransform):  # TPU ref bitcast: packs along the 2nd-minor dim
        src, dst = x.dtype.itemsize, np.dtype(t.dtype).itemsize
        if src < dst:
            r = dst // src
            x = x.reshape(*x.shape[:-2], x.shape[-2] // r, r, x.shape[-1]).swapaxes(-1, -2)
            return np.ascontiguousarray(x).view(t.dtype)[..., 0]
        assert src == dst, (x.dtype, t.dtype)
        return x.view(t.dtype)
    if isinstance(t, _indexing.NDIndexer):
        return x[_iu.to_range((jax.tree.map(int, t),))]
    raise NotImplementedError(type(t))


@contextlib.contextmanager
def _views_in_interpreter():
    """TPU interpret mode, with reads through reshape/bitcast views of a buffer supported."""
    saved, plain = _ipc.get, _ipc.get.__wrapped__

    def get(token, device_id, local_core_id, memory_space, buffer_id, transforms, *a, **kw):
        ts = tuple(transforms)
        cut = next((i for i, t in enumerate(ts) if not isinstance(t, _indexing.NDIndexer)), None)
        if cut is None:
            return plain(token, device_id, local_core_id, memory_space, buffer_id, transforms,
                         *a, **kw)
        token, x = plain(token, device_id, local_core_id, memory_space, buffer_id, ts[:cut],
                         *a, **kw)
        x = np.asarray(x)
        for t in ts[cut:]:
            x = _apply_view(x, t)
        return token, x

    _ipc.get = _ipc.fail_on_exception(get)
    try:
        with pltpu.force_tpu_interpret_mode():
            yield
    finally:
        _ipc.get = saved


def _case(dtype, d=2, nb=12, bs=8, n_kv=2, n_h=8, hd=128, seed=0):
    """Random pools (scratch block 0 included: finite garbage), 4 rows per shard: lengths 1, 8
    (one full block), 9 and 23 (crossing block boundaries), the last two sharing their first block;
    table entries past a row's blocks point at scratch."""
    ks = jax.random.split(jax.random.key(seed), 3)
    k_pool = jax.random.normal(ks[0], (d, nb, n_kv, bs, hd), jnp.float32).astype(dtype)
    v_pool = jax.random.normal(ks[1], (d, nb, n_kv, bs, hd), jnp.float32).astype(dtype)
    q = jax.random.normal(ks[2], (d, 4, n_h, hd), jnp.float32).astype(dtype)
    table = np.zeros((d, 4, 4), np.int32)
    table[0] = [[1, 0, 0, 0], [2, 0, 0, 0], [3, 4, 0, 0], [3, 5, 6, 0]]
    table[1] = [[11, 0, 0, 0], [7, 0, 0, 0], [8, 9, 0, 0], [8, 10, 1, 0]]
    positions = np.array([[0, 7, 8, 22], [0, 7, 8, 22]], np.int32)
    return q, k_pool, v_pool, jnp.asarray(table), jnp.asarray(positions)


def test_kernel_page_layout_round_trips():
    _, k_pool, v_pool, _, _ = _case(jnp.float32, hd=4)
    kv = paged_tpu.to_kernel_pages(k_pool, v_pool)
    assert kv.shape == (2, 12, 8, 4, 4)
    np.testing.assert_array_equal(kv[:, :, :, 0::2], jnp.swapaxes(k_pool, 2, 3))
    np.testing.assert_array_equal(kv[:, :, :, 1::2], jnp.swapaxes(v_pool, 2, 3))
    for a, b in zip(paged_tpu.from_kernel_pages(kv), (k_pool, v_pool)):
        np.testing.assert_array_equal(a, b)


def test_kernel_support_and_dispatch():
    assert paged_tpu.kernel_supports(24, 8, 128, jnp.bfloat16, jnp.bfloat16)  # Phi-4-mini
    assert not paged_tpu.kernel_supports(6, 2, 16, jnp.float32, jnp.float32)  # head_dim < 128
    # Phi-4 (14B): 10 KV heads -> 20 combined, not tileable for the kernel in JAX 0.10
    assert not paged_tpu.kernel_supports(40, 10, 128, jnp.bfloat16, jnp.bfloat16)
    if jax.default_backend() != "tpu":
        assert not paged_tpu.use_kernel(24, 8, 128, jnp.bfloat16, jnp.bfloat16)


# float32: both sides accumulate in float32 (the kernel's online softmax reorders the sums), so
# they agree to float32 rounding. bfloat16: the kernel multiplies the float32 probabilities by
# bf16 values, the reference rounds the probabilities to bf16 first, and the outputs are rounded
# to bf16 (|out| < ~2 here, ulp 2^-7): one or two bf16 ulps.
@needs_interpret
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_ragged_paged_attention_kernel_matches_paged_attention(dtype, atol):
    q, k_pool, v_pool, table, positions = _case(dtype)
    want = paged_attention(q, k_pool, v_pool, table, positions)
    with _views_in_interpreter():
        got = paged_tpu.paged_attention_via_kernel(q, k_pool, v_pool, table, positions,
                                                   num_kv_pages_per_block=2,
                                                   num_queries_per_block=2)
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    if dtype == jnp.float32:
        assert np.abs(got - want).max() < 1e-6


CFG = TINY_SHAPES["phi-4-mini-like"].replace(initializer_range=0.2)


def test_kernel_layout_pool_matches_split_layout_through_prefill_copy_and_decode():
    """The same prefill, block copy and 6 sampled decode steps over both layouts (the XLA path:
    CPU), with the last two rows sharing a prompt block copied for the second."""
    params = split_layers(init_params(CFG, jax.random.key(3)))
    bs, nb, t = 4, 16, 12
    rng = np.random.default_rng(0)
    lens = np.array([5, 9, 12])
    tokens = np.zeros((1, 3, t), np.int32)
    for i, n in enumerate(lens):
        tokens[0, i, :n] = rng.integers(0, CFG.vocab_size, n)
    blocks = np.array([[[1, 0, 0], [2, 3, 0], [4, 5, 6]]], np.int32)
    table = np.zeros((1, 3, 8), np.int32)
    table[0, 0, :3] = [1, 7, 8]
    table[0, 1, :4] = [2, 3, 9, 10]
    table[0, 2, :5] = [4, 5, 11, 12, 13]  # block 6 (partial) is copied to 11 before decoding
    stop_ids = jnp.array([-1], jnp.int32)
    length = jnp.asarray(lens[None], jnp.int32)
    pending = jnp.asarray(tokens[:, np.arange(3), lens - 1])
    out = {}
    for layout in ("split", "kernel"):
        pool = init_pool(CFG, 1, nb, bs, jnp.float32, layout=layout)
        pool = prefill_blocks(params, pool, jnp.asarray(tokens), length - 1,
                              jnp.zeros((1, 3), bool), jnp.asarray(blocks), cfg=CFG)
        pool = copy_blocks(pool, jnp.array([[6]], jnp.int32), jnp.array([[11]], jnp.int32))
        pool, res = decode_chunk(
            params, pool, jax.random.key(1), stop_ids, pending, length, length + 6,
            jnp.full((1, 3), 1 << 20, jnp.int32), jnp.arange(3, dtype=jnp.int32)[None],
            jnp.ones((1, 3), bool), jnp.asarray(table), jnp.int32(6), jnp.int32(1), cfg=CFG,
            sp=SamplingParams(temperature=1.0, top_k=20), chunk=6)
        out[layout] = pool, res
    (split, a), (kern, b) = out["split"], out["kernel"]
    assert kern.v is None and kern.k[0].shape == (1, nb, bs, 2 * CFG.num_key_value_heads,
                                                    CFG.head_dim)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.length, b.length)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    for kl, vl, kvl in zip(split.k, split.v, kern.k):
        k, v = paged_tpu.from_kernel_pages(kvl)
        np.testing.assert_allclose(k, kl, atol=1e-5, rtol=0)
        np.testing.assert_allclose(v, vl, atol=1e-5, rtol=0)
