"""Device side of the paged engine: a block pool of keys/values and pure functions over it.

    pool k, v: a tuple of L arrays [D, NB, nKV, bs, hd] (per-layer buffers, for the unrolled layer
               loop) or one stacked [L, D, NB, nKV, bs, hd] array (scanned): the "split" layout
    kernel layout (`init_pool(..., layout="kernel")`): KVPool(kv, None), kv per layer
               [D, NB, bs, 2*nKV, hd] with K at even and V at odd heads (the page layout of
               JAX's ragged paged attention TPU kernel, see paged_tpu.py)

D = shards of the batch axes of a mesh (1 without one): every shard has its own blocks and rows,
and every array that the host scheduler indexes by block or row carries the shard dim first, so
gathers and scatters are batched over it and partition with it. A row's block table lists its
blocks in position order (position p lives at block table[p // bs], offset p % bs); entries past
its blocks point at block 0, the scratch block, which is never read unmasked.

`decode_chunk` runs up to `chunk` decode steps in one device loop. Each step a row attends only
over its table's blocks: the table width W is bucketed (power of two) to the live rows' blocks,
not the capacity of a row, and rows are compacted by the host between chunks, so the work of a
step follows the live rows and their lengths. The attention is the static cache's math
(`kv_cache.decode_attention`: scale hd^-0.5, float32 scores and softmax, GQA groups) over blocks
gathered by XLA into [D, R, W, nKV, bs, hd] (`paged_attention`): the exact reference, and the
only path for the split layout on every backend. A kernel-layout pool on the TPU backend, with
shapes the kernel supports (head_dim a multiple of 128, KV heads tileable:
`paged_tpu.kernel_supports`), is read in place by JAX's Pallas ragged paged attention kernel
instead; elsewhere it takes the same XLA gather path. The engine (paged_sampler.generate_paged)
builds a kernel-layout pool on one TPU device and split pools everywhere else; the kernel path runs
per device (one device, or inside a shard_map, which the engine does not build yet), since GSPMD
does not partition a pallas_call. Kernel choices per backend: docs/paged_kernels.md.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ..model.attention import MASK_VALUE
from ..model.config import ModelConfig
from ..model.decoder import attention_inputs, embed_tokens, layer_output, logits_from_hidden
from ..model.kv_cache import prefill
from ..model.rope import rope_tables
from . import paged_tpu
from .sampling import SamplingParams, sample_rows


class KVPool(NamedTuple):
    k: object  # tuple of L [D, NB, nKV, bs, hd] arrays, or [L, D, NB, nKV, bs, hd]
    v: object  # same; None in the kernel layout, where k holds [D, NB, bs, 2*nKV, hd] pages


class ChunkOut(NamedTuple):
    tokens: jax.Array  # [D, R, chunk] sampled ids (valid for the first new[d, r] entries)
    logprobs: jax.Array  # [D, R, chunk] untempered log-probs of those ids
    length: jax.Array  # [D, R] tokens known after the chunk
    done: jax.Array  # [D, R] finished (stop token or limit)
    stopped: jax.Array  # [D, R] finished on a stop token


def init_pool(cfg: ModelConfig, shards: int, num_blocks: int, block_size: int, dtype=None,
              per_layer: bool = True, layout: str = "split") -> KVPool:
    """Zeros. layout "split": k, v [D, NB, nKV, bs, hd]; "kernel": the TPU kernel's combined
    pages KVPool(kv [D, NB, bs, 2*nKV, hd] with K at even and V at odd heads, None)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    if layout == "split":
        shape = (shards, num_blocks, cfg.num_key_value_heads, block_size, cfg.head_dim)
    elif layout == "kernel":
        shape = (shards, num_blocks, block_size, 2 * cfg.num_key_value_heads, cfg.head_dim)
    else:
        raise ValueError(f"unknown KV pool layout {layout!r} (split or kernel)")
    if per_layer:
        def zeros():
            return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
    else:
        def zeros():
            return jnp.zeros((cfg.num_hidden_layers,) + shape, dtype)
    return KVPool(zeros(), zeros() if layout == "split" else None)


def _kernel_layout(pool: KVPool) -> bool:
    return pool.v is None


def _block_size(pool: KVPool) -> int:
    layer0 = pool.k[0]  # layer 0 of either layer arrangement: [D, NB, ...]
    return layer0.shape[-3] if _kernel_layout(pool) else layer0.shape[-2]


def _over_layers(params, pool: KVPool, x, fn):
    """x -> fn(lp, x, k_layer, v_layer) -> (x, k_layer, v_layer) over every layer (v_layer is
    None in the kernel layout)."""
    layers = params["layers"]
    if isinstance(pool.k, tuple):
        if not isinstance(layers, list):
            raise ValueError("a per-layer KV pool needs per-layer params (split_layers)")
        ks, vs = [], []
        for lp, kl, vl in zip(layers, pool.k, (None,) * len(pool.k) if pool.v is None else pool.v):
            x, kl, vl = fn(lp, x, kl, vl)
            ks.append(kl)
            vs.append(vl)
        return x, KVPool(tuple(ks), None if pool.v is None else tuple(vs))
    if isinstance(layers, list):
        raise ValueError("a stacked KV pool needs the stacked layer dict (scanned)")

    def body(carry, xs):
        x, k, v = carry
        lp, i = xs
        x, ki, vi = fn(lp, x, k[i], None if v is None else v[i])
        return (x, k.at[i].set(ki), None if v is None else v.at[i].set(vi)), None

    idx = jnp.arange(jax.tree_util.tree_leaves(layers)[0].shape[0])
    (x, k, v), _ = lax.scan(body, (x, pool.k, pool.v), (layers, idx))
    return x, KVPool(k, v)


def _use_long(cfg: ModelConfig, use_long):
    if cfg.rope_scaling_type != "longrope":
        return None
    return jnp.asarray(use_long, bool)[:, None, None]


# -- prefill and copies --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("pool",))
def prefill_blocks(params, pool: KVPool, tokens, lengths, use_long, blocks, *, cfg: ModelConfig):
    """Cache `lengths[d, n]` tokens of each row `tokens[d, n, T]` into blocks `blocks[d, n, T/bs]`.

    Cache only: nothing is sampled (the row's next token is processed by its first decode step).
    Padding rows have length 0 and point every block at scratch. `use_long[d, n]`: the LongRoPE
    regime of the row's *next* token (the cache must be computed in the regime it is read in).
    """
    d, n, t = tokens.shape
    bs = _block_size(pool)
    flat = lambda a: a.reshape((d * n,) + a.shape[2:])  # noqa: E731
    _, k, v = prefill(params, cfg, flat(tokens), jnp.maximum(flat(lengths), 1), flat(use_long))

    def into_blocks(x):  # [L, d*n, T, nKV, hd] -> [L, d, n, T/bs, bs, nKV, hd]
        return x.reshape(x.shape[0], d, n, t // bs, bs, x.shape[3], x.shape[4])

    put = jax.vmap(lambda p, idx, x: p.at[idx].set(x.astype(p.dtype)))  # over shards

    def write(c, x):
        if isinstance(c, tuple):
            return tuple(put(ci, blocks, x[i]) for i, ci in enumerate(c))
        return jax.vmap(lambda ci, xi: put(ci, blocks, xi))(c, x)

    if _kernel_layout(pool):  # [L, d, n, T/bs, bs, 2*nKV, hd], K and V interleaved by head
        kv = jnp.stack([into_blocks(k), into_blocks(v)], axis=-2)
        return KVPool(write(pool.k, kv.reshape(kv.shape[:-3] + (-1, kv.shape[-1]))), None)
    kb, vb = (jnp.swapaxes(into_blocks(x), 4, 5) for x in (k, v))  # [.., T/bs, nKV, bs, hd]
    return KVPool(write(pool.k, kb), write(pool.v, vb))


@functools.partial(jax.jit, donate_argnames=("pool",))
def copy_blocks(pool: KVPool, src, dst) -> KVPool:
    """Block src[d, m] -> dst[d, m] of each shard d (padding entries copy scratch onto itself)."""
    cp = jax.vmap(lambda p, s, t: p.at[t].set(p[s]))

    def each(c):
        return tuple(cp(ci, src, dst) for ci in c) if isinstance(c, tuple) else jax.vmap(
            lambda ci: cp(ci, src, dst))(c)

    return KVPool(each(pool.k), None if pool.v is None else each(pool.v))


# -- decode --------------------------------------------------------------------------------------
def paged_attention(q, k_pool, v_pool, table, positions):
    """Single-query attention over each row's blocks.

    q [D, R, nH, hd]; k_pool, v_pool [D, NB, nKV, bs, hd]; table [D, R, W] block ids; positions
    [D, R]: row r sees positions 0..positions[d, r]. Returns [D, R, nH, hd].
    """
    gather = jax.vmap(lambda p, t: p[t])  # [D, R, W, nKV, bs, hd], batched over shards
    return _attend(q, gather(k_pool, table), gather(v_pool, table), positions)


def paged_attention_kernel_pages(q, kv_pool, table, positions):
    """`paged_attention` over a kernel-layout pool kv [D, NB, bs, 2*nKV, hd]: JAX's ragged paged
    attention kernel on TPU (`paged_tpu.use_kernel`), else the same XLA gather path."""
    nh, hd, n_kv = q.shape[2], q.shape[3], kv_pool.shape[3] // 2
    if paged_tpu.use_kernel(nh, n_kv, hd, q.dtype, kv_pool.dtype):
        return paged_tpu.decode_attention(q, kv_pool, table, positions)
    kvg = jax.vmap(lambda p, t: p[t])(kv_pool, table)  # [D, R, W, bs, 2*nKV, hd]
    kg, vg = (jnp.swapaxes(kvg[..., i::2, :], -3, -2) for i in (0, 1))  # [D, R, W, nKV, bs, hd]
    return _attend(q, kg, vg, positions)


def _attend(q, kg, vg, positions):
    """q [D, R, nH, hd] over gathered blocks kg, vg [D, R, W, nKV, bs, hd]."""
    d, r, nh, hd = q.shape
    w, n_kv, bs = kg.shape[2], kg.shape[3], kg.shape[4]
    qg = q.reshape(d, r, n_kv, nh // n_kv, hd)
    scores = jnp.einsum("drkgh,drwksh->drkgws", qg, kg.astype(q.dtype),
                        preferred_element_type=jnp.float32) * (hd ** -0.5)
    scores = scores.reshape(d, r, n_kv, nh // n_kv, w * bs)
    visible = jnp.arange(w * bs, dtype=jnp.int32) <= positions[..., None]  # [D, R, W*bs]
    scores = jnp.where(visible[:, :, None, None, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    probs = probs.reshape(d, r, n_kv, nh // n_kv, w, bs)
    out = jnp.einsum("drkgws,drwksh->drkgh", probs, vg.astype(q.dtype),
                     preferred_element_type=jnp.float32)
    return out.reshape(d, r, nh, hd).astype(q.dtype)


def paged_decode_step(params, cfg: ModelConfig, pool: KVPool, tokens, positions, table):
    """One token per row: tokens, positions [D, R]; the new key/value goes to position
    positions[d, r] of the row's blocks. Returns (logits [D, R, V] float32, pool)."""
    d, r = tokens.shape
    bs = _block_size(pool)
    flat_pos = positions.reshape(d * r, 1).astype(jnp.int32)
    use_long = flat_pos[:, 0] + 1 > cfg.original_max_position_embeddings
    cos, sin = rope_tables(cfg, flat_pos, use_long=_use_long(cfg, use_long))
    x = embed_tokens(params, tokens.reshape(d * r, 1), cfg)  # [D*R, 1, H]
    block = jnp.take_along_axis(table, (positions // bs)[..., None], axis=2)[..., 0]  # [D, R]
    offset = positions % bs
    put = jax.vmap(lambda p, b, o, val: p.at[b, :, o].set(val.astype(p.dtype)))  # over shards
    put_page = jax.vmap(lambda p, b, o, val: p.at[b, o].set(val.astype(p.dtype)))

    def layer(lp, x, kl, vl):
        q, k, v = attention_inputs(lp, x, cfg, cos, sin)
        q = q.reshape(d, r, *q.shape[2:])
        if vl is None:  # kernel layout: one write of the interleaved [2*nKV, hd] per row
            kv = jnp.stack([k, v], axis=-2).reshape(d, r, -1, k.shape[-1])
            kl = put_page(kl, block, offset, kv)
            attn = paged_attention_kernel_pages(q, kl, table, positions)
            return layer_output(lp, x, attn.reshape(d * r, 1, *attn.shape[2:]), cfg), kl, vl
        kl = put(kl, block, offset, k.reshape(d, r, *k.shape[2:]))
        vl = put(vl, block, offset, v.reshape(d, r, *v.shape[2:]))
        attn = paged_attention(q, kl, vl, table, positions)
        return layer_output(lp, x, attn.reshape(d * r, 1, *attn.shape[2:]), cfg), kl, vl

    x, pool = _over_layers(params, pool, x, layer)
    return logits_from_hidden(params, x, cfg)[:, 0].reshape(d, r, -1), pool


@functools.partial(jax.jit, static_argnames=("cfg", "sp", "chunk"), donate_argnames=("pool",))
def decode_chunk(params, pool: KVPool, key, stop_ids, tokens, length, limit, pause_at, row_id,
                 active, table, max_steps, min_live, *, cfg: ModelConfig, sp: SamplingParams,
                 chunk: int):
    """Decode up to min(chunk, max_steps) tokens per live row.

    tokens [D, R]: each row's pending token (position length - 1); a row is live while active,
    not done and length < pause_at (pause_at = the LongRoPE crossing for a short-regime cache).
    The loop also ends once fewer than `min_live` rows are live (so the host can refill or shrink
    the batch). Sampling keys are (row_id, token index), so the chunking changes no output.
    Returns (pool, ChunkOut).
    """
    d, r = tokens.shape
    out_tok = jnp.zeros((d, r, chunk), jnp.int32)
    out_lp = jnp.zeros((d, r, chunk), jnp.float32)
    done = ~active
    stopped = jnp.zeros_like(active)

    def live_of(length, done):
        return ~done & (length < pause_at)

    def cond(c):
        step, length, done = c[0], c[2], c[3]
        n_live = jnp.sum(live_of(length, done))
        return (step < jnp.minimum(max_steps, chunk)) & (n_live > 0) & (n_live >= min_live)

    def body(c):
        step, tok, length, done, stopped, out_tok, out_lp, pool = c
        live = live_of(length, done)
        pos = jnp.maximum(length - 1, 0)
        logits, pool = paged_decode_step(params, cfg, pool, tok, pos, table)
        new, lp = sample_rows(key, logits.reshape(d * r, -1), row_id.reshape(-1),
                              length.reshape(-1), sp)
        new, lp = new.reshape(d, r), lp.reshape(d, r)
        is_stop = jnp.any(new[..., None] == stop_ids, axis=-1)
        new_len = length + 1
        out_tok = out_tok.at[:, :, step].set(jnp.where(live, new, 0))
        out_lp = out_lp.at[:, :, step].set(jnp.where(live, lp, 0.0))
        fin = is_stop | (new_len >= limit)
        return (step + 1, jnp.where(live, new, tok), jnp.where(live, new_len, length),
                jnp.where(live, fin, done), jnp.where(live, is_stop, stopped), out_tok, out_lp,
                pool)

    c = (jnp.int32(0), tokens, length, done, stopped, out_tok, out_lp, pool)
    _, _, length, done, stopped, out_tok, out_lp, pool = lax.while_loop(cond, body, c)
    return pool, ChunkOut(out_tok, out_lp, length, done & active, stopped)
