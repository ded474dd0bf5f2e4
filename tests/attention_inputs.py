"""Shared inputs for the attention tests: packed GQA rows (3 segments + padding)."""
import jax.numpy as jnp
import numpy as np


def packed_segments(t: int) -> np.ndarray:
    """Row 0: three packed sequences then padding (segment 0); row 1: one sequence."""
    a, b = t * 3 // 10, t * 4 // 10
    c = t - a - b - max(2, t // 10)
    row0 = [1] * a + [2] * b + [3] * c
    row0 += [0] * (t - len(row0))
    return np.array([row0, [7] * t], np.int32)


def qkv(t: int, n_heads: int = 4, n_kv: int = 2, head_dim: int = 16, s: int = None, seed=0,
        batch: int = 2):
    s = t if s is None else s
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(batch, t, n_heads, head_dim), jnp.float32)
    k = jnp.asarray(r.randn(batch, s, n_kv, head_dim), jnp.float32)
    v = jnp.asarray(r.randn(batch, s, n_kv, head_dim), jnp.float32)
    return q, k, v


def numpy_attention(q, k, v, q_seg, kv_seg, q_idx, kv_idx, scale):
    """Loop-per-head softmax attention written directly from the mask definition."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, nh, _ = q.shape
    g = nh // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        allowed = (q_seg[bi][:, None] == kv_seg[bi][None, :]) & (
            kv_idx[bi][None, :] <= q_idx[bi][:, None])
        for h in range(nh):
            s = q[bi, :, h] @ k[bi, :, h // g].T * scale
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[bi, :, h] = p @ v[bi, :, h // g]
    return out
