"""Accelerator attention kernels behind `attention(impl="gpu" | "tpu")`.

Same contract as `attention.reference_attention`: q [B, T, nH, hd], k/v [B, S, nKV, hd],
allowed(t, s) = q_segment[t] == kv_segment[s] and kv_index[s] <= q_index[t]; segment 0 is padding.

- gpu: cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) for rows that
  hold one sequence (every token in the same segment; cuDNN's public API cannot express segment
  ids), chosen at run time with `lax.cond`; otherwise the Pallas Triton kernel
  `jax.experimental.pallas.ops.gpu.attention.mha`, which takes segment ids. cuDNN needs bf16/fp16
  and head_dim <= 128 (a multiple of 8); float32 always takes the Triton kernel.
- tpu: splash attention with `SegmentIds` and a causal mask (native GQA: nH a multiple of nKV).

Both kernels assume training-shaped self-attention (T == S, index = arange). Calls with explicit
indices (the KV-cache sampler) or T != S fall back to the exact XLA paths in `attention.py`.

Pallas kernels run on CPU only in the Pallas interpreter (slow, for tests): pass interpret=True,
or set `INTERPRET = True` (env PHI_REASON_PALLAS_INTERPRET=1), which is honoured only when the
default backend is CPU. On CPU the cuDNN branch is replaced by the same `dot_product_attention`
call with implementation="xla", so the dispatch and argument plumbing are still exercised.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

INTERPRET = os.environ.get("PHI_REASON_PALLAS_INTERPRET", "") not in ("", "0")

# Segment id given to sequence padding added to reach a block multiple: it matches no real
# segment (real ids are >= 0), so real tokens never see it; the padded rows see only themselves.
_PAD_SEGMENT = -1


def _use_interpret(interpret: bool) -> bool:
    if interpret:
        return True
    if jax.default_backend() == "cpu":
        if INTERPRET:
            return True
        raise RuntimeError(
            "attention='gpu'/'tpu' runs Pallas kernels that need an accelerator; on CPU set "
            "phi_reason.model.attention_kernels.INTERPRET = True (or PHI_REASON_PALLAS_INTERPRET=1)"
            " to run them in the (slow) Pallas interpreter, or use attention='auto'")
    return False


def _fallback(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, scale):
    """Exact XLA path for shapes the kernels do not cover (decode, explicit cache indices)."""
    from .attention import chunked_attention, reference_attention

    if q.shape[1] <= 256:  # [T, S] scores are small for short query blocks
        return reference_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index,
                                   scale)
    return chunked_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, scale)


def _kernel_shaped(q, k, q_index, kv_index) -> bool:
    return q_index is None and kv_index is None and q.shape[1] == k.shape[1]


def _padded_length(t: int, block: int, minimum: int) -> int:
    """Smallest length >= t the kernels can tile: a power of two (>= minimum) up to `block`,
    else a multiple of `block` (Triton tiles must be powers of two; splash's KV tiles must be
    multiples of 128 lanes)."""
    if t <= block:
        return max(minimum, 1 << (t - 1).bit_length())
    return -(-t // block) * block


def _pad_sequence(x, t_pad, value=0):
    n = t_pad - x.shape[1]
    if n == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


# ----------------------------------------------------------------------------------------- GPU

TRITON_BLOCK = 128  # forward tile; the backward kernels use TRITON_BWD_BLOCK
# Backward tile 64 (jax's default is 32): fwd+bwd 3.09 -> 1.78 ms at T=4096 and 39.8 -> 21.2 ms at
# T=16384 on an H200, 24/8 heads of 128 (benchmarks/results/nvidia-h200.md).
TRITON_BWD_BLOCK = 64


def triton_attention(q, k, v, segment_ids, scale, interpret: bool,
                     bwd_block: Optional[int] = None):
    """Pallas Triton flash attention with segment ids, causal, GQA by repeating KV heads.
    bwd_block: tile of the backward kernels (default TRITON_BWD_BLOCK)."""
    from jax.experimental.pallas.ops.gpu import attention as triton_mha

    t = q.shape[1]
    t_pad = _padded_length(t, TRITON_BLOCK, 32)
    bwd = min(bwd_block or TRITON_BWD_BLOCK, t_pad)
    blocks = triton_mha.BlockSizes(block_q=min(TRITON_BLOCK, t_pad),
                                   block_k=min(TRITON_BLOCK, t_pad), block_q_dkv=bwd,
                                   block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd)
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # grads sum back per KV head
    out = triton_mha.mha(_pad_sequence(q, t_pad), _pad_sequence(k, t_pad),
                         _pad_sequence(v, t_pad),
                         _pad_sequence(segment_ids.astype(jnp.int32), t_pad, _PAD_SEGMENT),
                         sm_scale=scale, causal=True, block_sizes=blocks, interpret=interpret)
    return out[:, :t]


def dense_causal_attention(q, k, v, scale, implementation: str = "cudnn"):
    """Plain causal attention (one sequence per row) through `jax.nn.dot_product_attention`
    (native GQA). implementation="cudnn" on GPU; "xla" is the CPU stand-in used in tests."""
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        implementation=implementation)


def _cudnn_supported(q) -> bool:
    hd = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and hd <= 128 and hd % 8 == 0


def gpu_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index=None, kv_index=None,
                  scale: Optional[float] = None, interpret: bool = False,
                  variant: str = "auto", triton_bwd_block: Optional[int] = None):
    """variant: "auto" (cuDNN for single-sequence rows, else Triton), "cudnn", "triton".

    "cudnn" ignores segment ids (the caller guarantees one sequence per row); it is exposed for
    benchmarks. q_segment_ids must equal kv_segment_ids (self-attention).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not _kernel_shaped(q, k, q_index, kv_index):
        return _fallback(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, scale)
    interpret = _use_interpret(interpret)
    dense_impl = "xla" if interpret else "cudnn"
    if variant == "cudnn":
        return dense_causal_attention(q, k, v, scale, dense_impl)
    if variant not in ("auto", "triton"):
        raise ValueError(f"unknown gpu attention variant {variant!r}")
    # The Triton kernel takes one segment-id array for both sides: self-attention only.
    triton = functools.partial(triton_attention, segment_ids=q_segment_ids, scale=scale,
                               interpret=interpret, bwd_block=triton_bwd_block)
    if variant == "triton" or not (interpret or _cudnn_supported(q)):
        return triton(q, k, v)
    one_sequence_rows = jnp.all(q_segment_ids == q_segment_ids[:, :1])
    return lax.cond(one_sequence_rows,
                    lambda q, k, v: dense_causal_attention(q, k, v, scale, dense_impl),
                    lambda q, k, v: triton(q, k, v), q, k, v)


# ----------------------------------------------------------------------------------------- TPU

SPLASH_BLOCK = 128


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, t_pad: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((t_pad, t_pad)) for _ in range(num_heads)])
    b = min(block, t_pad)
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                           block_kv_dq=b)
    # The mask metadata are constants; build them outside any trace so the cached kernel
    # never holds a tracer.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def tpu_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index=None, kv_index=None,
                  scale: Optional[float] = None, interpret: bool = False):
    """Splash attention: causal mask and `SegmentIds`, GQA natively (nH a multiple of nKV)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not _kernel_shaped(q, k, q_index, kv_index):
        return _fallback(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, scale)
    interpret = _use_interpret(interpret)
    b, t, nh, hd = q.shape
    t_pad = _padded_length(t, SPLASH_BLOCK, 128)
    kernel = _splash_kernel(nh, t_pad, SPLASH_BLOCK, interpret)
    # Splash has no scale argument: fold it into q (in float32, then back to the compute dtype).
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)

    def heads_major(x):  # [B, heads, T, hd]
        return jnp.swapaxes(_pad_sequence(x, t_pad), 1, 2)

    qseg = _pad_sequence(q_segment_ids.astype(jnp.int32), t_pad, _PAD_SEGMENT)
    kvseg = _pad_sequence(kv_segment_ids.astype(jnp.int32), t_pad, _PAD_SEGMENT)
    out = jax.vmap(lambda q1, k1, v1, qs1, ks1: kernel(
        q1, k1, v1, segment_ids=sk.SegmentIds(q=qs1, kv=ks1)))(
        heads_major(qs), heads_major(k), heads_major(v), qseg, kvseg)
    return jnp.swapaxes(out, 1, 2)[:, :t].astype(q.dtype)
