"""Rotary position embeddings as in transformers' Phi-3: half-split (NeoX) rotation of the
first `rotary_dim` dims of each head, optional LongRoPE (per-frequency factors + attention factor).

LongRoPE regime: HF picks `long_factor` when max(position) + 1 > original_max_position_embeddings
(computed over the whole batch), else `short_factor`; we do the same, traced, so one compiled
function serves both regimes. The decode policy built on this lives in `generate/`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


def _inv_freq(cfg: ModelConfig, factors=None) -> np.ndarray:
    """float32 inverse frequencies, rounded the way torch's float32 ops round them."""
    dim = cfg.rotary_dim
    exponent = (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    powers = np.power(np.float64(cfg.rope_theta), exponent.astype(np.float64)).astype(np.float32)
    if factors is not None:
        powers = (np.asarray(factors, np.float32) * powers).astype(np.float32)
    return (np.float32(1.0) / powers).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray, use_long=None):
    """cos, sin of shape [B, T, rotary_dim] (float32), already scaled by the attention factor.

    `use_long`: None -> decide from max(positions) as HF does; or a (traced) bool to force a regime.
    """
    pos = positions.astype(jnp.float32)
    if cfg.rope_scaling_type == "longrope":
        short = jnp.asarray(_inv_freq(cfg, cfg.rope_short_factor))
        long = jnp.asarray(_inv_freq(cfg, cfg.rope_long_factor))
        if use_long is None:
            use_long = jnp.max(positions) + 1 > cfg.original_max_position_embeddings
        inv = jnp.where(use_long, long, short)
    else:
        inv = jnp.asarray(_inv_freq(cfg))
    freqs = pos[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = jnp.float32(cfg.attention_factor)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, heads, hd]; cos/sin: [B, T, rotary_dim]. Matches HF's order of casts:
    cos/sin are cast to x's dtype before the products."""
    rd = cos.shape[-1]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
