"""JAX's Pallas TPU ragged paged attention kernel behind `paged.paged_attention`'s semantics.

The kernel (`jax.experimental.pallas.ops.tpu.ragged_paged_attention`, maintained in JAX) reads a
row's pages in place by DMA from HBM, so a decode step reads only the live blocks instead of
materialising a gathered [R, W*bs] copy of them. Its page layout differs from the split pool's:

    split pool (paged.py default):  k, v [D, NB, nKV, bs, hd]
    kernel pages (layout="kernel"): kv [D, NB, bs, 2*nKV, hd], K at even heads, V at odd ones

`to_kernel_pages` converts between them, but that conversion reads and writes the whole pool, so
calling it per step would cost more than the gather it replaces; the kernel path is meant for a
pool that is *stored* in the kernel layout (`paged.init_pool(..., layout="kernel")`), which
`paged.paged_decode_step` then hands to `decode_attention` directly.

Decode semantics: one query per row (cu_q_lens = 0..R), kv_lens = positions + 1, page_indices =
the row's table, scale hd^-0.5, no soft cap or window. The kernel's constraints (in JAX 0.10):
head_dim a multiple of 128 and 2*nKV "fully tiled" for the kv dtype (`kernel_supports`); the
tuned block sizes need a TPU v4+, elsewhere (interpret mode on CPU) explicit ones are passed.

The pallas_call is not partitioned by GSPMD: under a mesh it has to run per shard (shard_map over
the batch/tensor axes, D = 1 per device); without that XLA would gather its operands.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

try:  # JAX 0.10 and 0.11 ship it; guarded so that a JAX without it still imports the engine
    from jax.experimental.pallas.ops.tpu import ragged_paged_attention as _rpa
except Exception:  # pragma: no cover - depends on the installed jax
    _rpa = None


def kernel_available() -> bool:
    return _rpa is not None


def kernel_supports(num_heads: int, num_kv_heads: int, head_dim: int, q_dtype, kv_dtype) -> bool:
    """Whether the kernel accepts these shapes (otherwise the XLA path is used)."""
    if _rpa is None or head_dim % 128 or num_heads % num_kv_heads:
        return False
    try:
        _rpa.kernel.get_min_heads_per_blk(num_heads, 2 * num_kv_heads, jnp.dtype(q_dtype),
                                          jnp.dtype(kv_dtype))
    except (ValueError, AssertionError):
        return False
    return True


def use_kernel(num_heads: int, num_kv_heads: int, head_dim: int, q_dtype, kv_dtype) -> bool:
    """Dispatch rule: the kernel on the TPU backend for supported shapes; XLA elsewhere."""
    return jax.default_backend() == "tpu" and kernel_supports(num_heads, num_kv_heads, head_dim,
                                                              q_dtype, kv_dtype)


def to_kernel_pages(k_pool, v_pool):
    """[..., NB, nKV, bs, hd] x 2 -> [..., NB, bs, 2*nKV, hd] (K even heads, V odd). A full copy."""
    kv = jnp.stack([k_pool, v_pool], axis=-3)  # [..., NB, nKV, 2, bs, hd]
    kv = jnp.moveaxis(kv, -2, -4)  # [..., NB, bs, nKV, 2, hd]
    return kv.reshape(kv.shape[:-3] + (2 * kv.shape[-3], kv.shape[-1]))


def from_kernel_pages(kv):
    """Inverse of `to_kernel_pages`: [..., NB, bs, 2*nKV, hd] -> (k, v) [..., NB, nKV, bs, hd]."""
    k, v = kv[..., 0::2, :], kv[..., 1::2, :]
    return jnp.swapaxes(k, -3, -2), jnp.swapaxes(v, -3, -2)


def decode_attention(q, kv_pages, table, positions, *, num_kv_pages_per_block=None,
                     num_queries_per_block=None, vmem_limit_bytes=None):
    """`paged.paged_attention` over kernel pages, by the ragged paged attention kernel.

    q [D, R, nH, hd]; kv_pages [D, NB, bs, 2*nKV, hd]; table [D, R, W]; positions [D, R] (row r
    sees 0..positions[d, r]). Returns [D, R, nH, hd]. One kernel call per shard d (a Python loop:
    D is 1 per device under a shard_map). Off TPU the tuned block sizes are unavailable, so
    defaults small enough for interpret mode are used unless given.
    """
    if _rpa is None:
        raise RuntimeError("this jax has no jax.experimental.pallas.ops.tpu.ragged_paged_attention")
    d, r, _, hd = q.shape
    w = table.shape[2]
    if jax.default_backend() != "tpu":
        num_kv_pages_per_block = num_kv_pages_per_block or min(w, 4)
        num_queries_per_block = num_queries_per_block or min(r, 8)
    cu_q_lens = jnp.arange(r + 1, dtype=jnp.int32)
    num_seqs = jnp.array([r], jnp.int32)
    outs = []
    for i in range(d):
        outs.append(_rpa.ragged_paged_attention(
            q[i], kv_pages[i], (positions[i] + 1).astype(jnp.int32), table[i].astype(jnp.int32),
            cu_q_lens, num_seqs, sm_scale=hd ** -0.5,
            num_kv_pages_per_block=num_kv_pages_per_block,
            num_queries_per_block=num_queries_per_block, vmem_limit_bytes=vmem_limit_bytes))
    return jnp.stack(outs)


def paged_attention_via_kernel(q, k_pool, v_pool, table, positions, **kw):
    """`paged.paged_attention` on a split pool through the kernel. Converts the whole pool first
    (a full copy per call): for tests and measurements, not for the decode loop."""
    return decode_attention(q, to_kernel_pages(k_pool, v_pool), table, positions, **kw)
