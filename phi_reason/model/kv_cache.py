"""A static KV cache and the decoder run over it: prefill of whole prompts, then one token at a
time.

The per-layer math is the decoder's own (`attention_inputs`, `layer_output`, `embed_tokens`,
`logits_from_hidden`); this module only decides where keys and values live:

    k, v: [L, B, nKV, S, hd]   layers stacked, one row per batch slot, S = static capacity
    or a tuple of L arrays [B, nKV, S, hd] (`per_layer=True`, for the unrolled layer loop)

Head-major (nKV before S) so that single-query decode attention contracts over the cache in its
storage layout: with [B, S, nKV, hd] XLA transposes every layer's whole cache on every step, which
at batch 32 cost more memory traffic than the weights (measured on CPU).

K is stored after RoPE (as in HF), so a cached key never needs re-rotating. A row's cache entries
beyond its current position hold stale values from an earlier occupant or prompt padding; they are
never read because attention masks `kv_index <= q_index` (cache slot s holds position s).

Layer loop: `layers` is either the stacked dict (scanned with `lax.scan`) or a list of per-layer
dicts (`split_layers`, unrolled). Unrolling avoids a per-step dynamic-slice copy of each layer's
weights inside a decode loop, which on CPU costs as much memory traffic as the matmuls themselves.
The unrolled loop wants the per-layer cache for the same reason: reading layer i of a stacked
cache materialises a copy of it every step (measured on CPU at 30M params, batch 32: ~30% of the
decode step), while a per-layer buffer is updated in place and read directly.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .attention import MASK_VALUE, attention
from .config import ModelConfig
from .decoder import attention_inputs, embed_tokens, layer_output, logits_from_hidden
from .rope import rope_tables


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, nKV, S, hd], or a tuple of L [B, nKV, S, hd] arrays
    v: jax.Array


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None,
               per_layer: bool = False) -> KVCache:
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    if per_layer:
        def zeros():
            return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
    else:
        def zeros():
            return jnp.zeros((cfg.num_hidden_layers,) + shape, dtype)
    return KVCache(zeros(), zeros())


def split_layers(params: dict) -> dict:
    """The same parameters with `layers` as a list of per-layer dicts (for an unrolled loop)."""
    layers = params["layers"]
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree_util.tree_map(lambda w, i=i: w[i], layers)
                                 for i in range(n)]}


def _use_long(cfg: ModelConfig, use_long):
    """[n] bool -> the [n, 1, 1] form rope_tables broadcasts per row. None for plain RoPE, and
    None stays None (rope_tables then decides from the positions, as HF does)."""
    if cfg.rope_scaling_type != "longrope" or use_long is None:
        return None
    return jnp.asarray(use_long, bool)[:, None, None]


def prefill(params, cfg: ModelConfig, tokens, lengths, use_long):
    """Run whole prompts through the decoder.

    tokens [n, T] (right-padded), lengths [n] (real tokens per row, >= 1), use_long [n] (LongRoPE
    regime per row). Returns (logits [n, V] float32 at each row's last real token,
    k [L, n, T, nKV, hd], v [L, n, T, nKV, hd]). Positions are 0..T-1 in every row.
    """
    n, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)  # 0 = padding
    cos, sin = rope_tables(cfg, positions, use_long=_use_long(cfg, use_long))
    x = embed_tokens(params, tokens, cfg)

    def layer(x, lp):
        q, k, v = attention_inputs(lp, x, cfg, cos, sin)
        attn = attention(q, k, v, segment_ids, segment_ids, impl=cfg.attention,
                         block=cfg.attention_chunk)
        return layer_output(lp, x, attn, cfg), (k, v)

    layers = params["layers"]
    if isinstance(layers, list):
        kvs = []
        for lp in layers:
            x, kv = layer(x, lp)
            kvs.append(kv)
        k = jnp.stack([kv[0] for kv in kvs])
        v = jnp.stack([kv[1] for kv in kvs])
    else:
        x, (k, v) = lax.scan(layer, x, layers)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [n, 1, H]
    return logits_from_hidden(params, last, cfg)[:, 0], k, v


def write_rows(cache: KVCache, slots, k, v) -> KVCache:
    """Store prefill keys/values k, v [L, n, T, nKV, hd] into cache rows `slots` [n] at
    positions 0..T-1."""
    t = k.shape[2]

    def put(c, x):
        if isinstance(c, tuple):
            return tuple(ci.at[slots, :, :t].set(jnp.swapaxes(x[i], 1, 2).astype(ci.dtype))
                         for i, ci in enumerate(c))
        return c.at[:, slots, :, :t].set(jnp.swapaxes(x, 2, 3).astype(c.dtype))

    return KVCache(put(cache.k, k), put(cache.v, v))


def decode_attention(q, k, v, positions):
    """Single-query attention over a head-major cache layer.

    q [B, 1, nH, hd]; k, v [B, nKV, S, hd]; row b sees cache slots 0..positions[b]. Same math as
    `attention.reference_attention` (scale hd^-0.5, float32 softmax, GQA groups), contracted in the
    cache's layout so no copy of the cache is made.
    """
    b, _, nh, hd = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    qg = q.reshape(b, n_kv, nh // n_kv, hd)  # query head j*g + i -> KV head j
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * (hd ** -0.5)
    visible = jnp.arange(s, dtype=jnp.int32)[None, :] <= positions[:, None]  # [B, S]
    scores = jnp.where(visible[:, None, None, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v.astype(q.dtype),
                     preferred_element_type=jnp.float32)
    return out.reshape(b, 1, nh, hd).astype(q.dtype)


def decode_step(params, cfg: ModelConfig, cache: KVCache, tokens, positions, use_long):
    """One token per row: tokens [B] at positions [B] (each row's own position).

    Writes the new key/value at cache slot `positions[b]` of row b, attends over slots
    0..positions[b], and returns (logits [B, V] float32, cache).
    """
    b = tokens.shape[0]
    rows = jnp.arange(b)
    pos = positions.astype(jnp.int32)[:, None]  # [B, 1]
    cos, sin = rope_tables(cfg, pos, use_long=_use_long(cfg, use_long))
    x = embed_tokens(params, tokens[:, None], cfg)  # [B, 1, H]

    def layer(x, lp, i, kc, vc):
        q, k, v = attention_inputs(lp, x, cfg, cos, sin)
        # Scatter the new entry in place (a [B]-row scatter, not a rewrite of the layer).
        kc = kc.at[i, rows, :, positions].set(k[:, 0].astype(kc.dtype))
        vc = vc.at[i, rows, :, positions].set(v[:, 0].astype(vc.dtype))
        attn = decode_attention(q, kc[i], vc[i], positions)
        return layer_output(lp, x, attn, cfg), kc, vc

    def own_layer(x, lp, kc, vc):  # per-layer cache buffers: updated and read in place
        q, k, v = attention_inputs(lp, x, cfg, cos, sin)
        kc = kc.at[rows, :, positions].set(k[:, 0].astype(kc.dtype))
        vc = vc.at[rows, :, positions].set(v[:, 0].astype(vc.dtype))
        return layer_output(lp, x, decode_attention(q, kc, vc, positions), cfg), kc, vc

    layers = params["layers"]
    kc, vc = cache
    if isinstance(kc, tuple):
        if not isinstance(layers, list):
            raise ValueError("a per-layer KV cache needs per-layer params (split_layers)")
        ks, vs = [], []
        for lp, kc_i, vc_i in zip(layers, kc, vc):
            x, kc_i, vc_i = own_layer(x, lp, kc_i, vc_i)
            ks.append(kc_i)
            vs.append(vc_i)
        kc, vc = tuple(ks), tuple(vs)
    elif isinstance(layers, list):
        for i, lp in enumerate(layers):
            x, kc, vc = layer(x, lp, i, kc, vc)
    else:
        def body(carry, xs):
            lp, i = xs
            return layer(carry[0], lp, i, carry[1], carry[2]), None

        idx = jnp.arange(cfg.num_hidden_layers)
        (x, kc, vc), _ = lax.scan(body, (x, kc, vc), (layers, idx))
    cache = KVCache(kc, vc)
    return logits_from_hidden(params, x, cfg)[:, 0], cache
