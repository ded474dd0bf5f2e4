"""Generation over a paged KV cache: cost follows live tokens, not capacity.

`generate_paged` has `sampler.generate`'s interface and results (same sampling keys, stop rules,
LongRoPE policy; the static sampler is the reference in the tests) and runs as a loop of

    host: `Scheduler.schedule()` (admission by free blocks, preemption, prefix sharing)
    device: prefill the admitted rows' histories into their blocks, copy shared tail blocks,
            then `decode_chunk` over the running rows (compacted; table width = live blocks)
    host: append each row's new tokens, free finished rows, restart rows at the LongRoPE crossing

Device functions compile once per shape bucket: rows and table width are powers of two, prefill
lengths are the sampler's power-of-two buckets (a multiple of the block size).

Prefix sharing: identical prompts (a GRPO group's samples) are prefilled once when they are
admitted in one step or while their group still waits; each sample then decodes from the shared
blocks with its own sampling key, so outputs equal the unshared path's.
"""
from __future__ import annotations

import collections
import functools
from typing import Callable, Dict, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ..model.config import ModelConfig
from .paged import copy_blocks, decode_chunk, init_pool, prefill_blocks
from .paged_tpu import use_kernel
from .sampler import (
    GenerateOutput,
    GenerationInterrupted,
    batch_axes,
    batch_shards,
    bucket,
    check_requests,
    host_reader,
    split_layers_jit,
    stop_ids_of,
)
from .sampling import SamplingParams
from .scheduler import Scheduler, blocks_for_memory, kv_bytes_per_block

NO_PAUSE = np.iinfo(np.int32).max
BLOCK_SIZE = 16  # tokens per KV block (default)
CHUNK_STEPS = 32  # decode steps per device loop (default)
PREFILL_TOKENS = 16384  # most prompt tokens one prefill call processes per shard
MAX_ROWS = 256  # default cap on rows a shard decodes at once (vLLM's max_num_seqs per engine)
CPU_KV_BYTES = 2 << 30  # default KV pool budget per device on CPU (host RAM is shared)
ACCEL_KV_FRACTION = 0.5  # of the memory a device reports free, when no budget is given


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def kv_budget_bytes(device=None) -> int:
    """KV pool bytes per device by default: half the free accelerator memory, 2 GiB on CPU."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return CPU_KV_BYTES
    return int((stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * ACCEL_KV_FRACTION)


def pool_plan(cfg, rows: int, shards: int, max_limit: int, prompt_tokens: int, block_size: int,
              chunk: int, dtype, budget: int, num_slots: Optional[int] = None,
              kv_blocks: Optional[int] = None):
    """(rows per shard, blocks per shard) of a call: the engine's sizing, shared with the planner.

    Blocks: enough for every row at its full length (no preemption), rounded up to a power of
    two (calls of similar sizes share compiles), or what `budget` bytes per device hold, but at
    least one row at full length plus scratch (or `kv_blocks`). Rows: `num_slots` (over all
    shards) if given, else every row up to MAX_ROWS per shard, no more than the pool can start at
    once (each with its prompt and one chunk)."""
    rows = -(-int(num_slots) // shards) if num_slots else min(-(-rows // shards), MAX_ROWS)
    per_row = -(-(max_limit - 1) // block_size)
    want = _pow2(rows * per_row + 1)
    per_block = kv_bytes_per_block(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                   block_size, jnp.dtype(dtype).itemsize)
    blocks = kv_blocks or max(min(want, blocks_for_memory(budget, per_block)), per_row + 2)
    if num_slots is None:
        start = -(-(prompt_tokens + chunk) // block_size)
        rows = max(1, min(rows, (blocks - 1) // start))
    return rows, blocks


DECODE_RULES = {"embed": None}  # decode layout: weights replicated over data/fsdp, TP over tensor


def inference_params(params, cfg: ModelConfig, mesh=None):
    """The weights decoding reads, prepared once per call: in the compute dtype (bf16 when the
    model computes in bf16: half the bytes of fp32 masters per step) and, on a mesh, replicated
    over the batch axes and split over `tensor` only, so the decode loop gathers no weights
    (FSDP-sharded training weights would cross the interconnect at every token). The math is
    unchanged: every layer casts its weights to the compute dtype anyway."""
    dt = jnp.dtype(cfg.dtype)

    def cast(p):
        return jax.tree_util.tree_map(
            lambda w: w.astype(dt) if jnp.issubdtype(w.dtype, jnp.floating) else w, p)

    if mesh is None:
        return cast(params) if dt != jnp.float32 else params
    from ..model.sharded import param_shardings

    shardings = param_shardings(cfg, mesh, DECODE_RULES)
    if isinstance(params["layers"], list):
        raise ValueError("inference_params wants the stacked layer dict (before split_layers)")
    ready = jax.tree_util.tree_map(
        lambda w, s: (w.dtype == dt or not jnp.issubdtype(w.dtype, jnp.floating))
        and w.sharding.is_equivalent_to(s, w.ndim), params, shardings)
    if all(jax.tree_util.tree_leaves(ready)):  # loaded for decoding already: no copy
        return params
    return jax.jit(cast, out_shardings=shardings)(params)


def generate_paged(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                   max_new_tokens: Union[int, Sequence[int]], temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0,
                   stop_tokens: Optional[Sequence[int]] = None, seed: int = 0,
                   num_slots: Optional[int] = None, mesh=None,
                   on_tokens: Optional[Callable[[int, List[int]], None]] = None,
                   stream_every: int = 8, unroll_layers: Optional[bool] = None,
                   interrupt: Optional[Callable[[], bool]] = None, interrupt_every: int = 256,
                   *, block_size: int = BLOCK_SIZE, kv_blocks: Optional[int] = None,
                   kv_bytes: Optional[int] = None, chunk_steps: int = CHUNK_STEPS,
                   share_prefix: bool = True, kv_dtype=None,
                   on_progress: Optional[Callable[[dict], None]] = None) -> GenerateOutput:
    """`sampler.generate` over a paged KV cache (see its arguments), plus:

    num_slots: the most rows decoded at once over all shards (default: every row, up to MAX_ROWS
      per shard and no more than the pool can start at once; see `pool_plan`).
    block_size: tokens per KV block. kv_blocks: blocks per shard (scratch included); default:
      every row at full length, capped by kv_bytes (default `kv_budget_bytes()` per device).
      A smaller pool admits fewer rows at a time and preempts (recomputes) when it runs out.
    chunk_steps: decode steps per device loop (blocks are reserved a chunk ahead).
    share_prefix: identical prompts share their prefilled blocks.
    kv_dtype: the cache's dtype (default the compute dtype, cfg.dtype).
    on_progress: called after every device chunk with {"rows_done", "rows", "tokens"} (finished
      rows, all rows, tokens generated so far).
    The result's `stats` counts prefill tokens, forks, preemptions, restarts and peak blocks, and
    gives the pool (blocks per shard, block size, layout) and rows per shard.
    """
    prompts, budgets = check_requests(cfg, prompts, max_new_tokens)
    n = len(prompts)
    if n == 0:
        return GenerateOutput([], [], [])
    sp = SamplingParams(float(temperature), float(top_p), int(top_k)).validate()
    stop_ids = stop_ids_of(cfg, stop_tokens)
    cap = cfg.max_position_embeddings
    limits = [min(len(p) + m, cap) for p, m in zip(prompts, budgets)]

    shards = batch_shards(mesh)
    params = inference_params(params, cfg, mesh)
    if unroll_layers is None:
        unroll_layers = jax.default_backend() == "cpu" or not cfg.scan_layers
    if unroll_layers and not isinstance(params["layers"], list):
        params = split_layers_jit(params)
    kv_dtype = jnp.dtype(kv_dtype or cfg.dtype)
    chunk = int(chunk_steps)
    budget = kv_bytes if kv_bytes is not None else kv_budget_bytes()
    typical_prompt = int(np.median([len(p) for p in prompts]))
    rows, kv_blocks = pool_plan(cfg, n, shards, max(limits), typical_prompt, block_size, chunk,
                                kv_dtype, budget, num_slots, kv_blocks)
    # The TPU kernel reads its own page layout in place; it runs unpartitioned, so only on one
    # device (a mesh keeps the split layout and the XLA path, see docs/paged_kernels.md).
    layout = "kernel" if mesh is None and use_kernel(
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.dtype,
        kv_dtype) else "split"
    make_pool = functools.partial(init_pool, cfg, shards, int(kv_blocks), block_size, kv_dtype,
                                  per_layer=unroll_layers, layout=layout)
    if mesh is None:
        pool = make_pool()
    else:  # created in place, shard by shard (no full copy on one device first)
        pool = jax.jit(make_pool, out_shardings=_pool_sharding(mesh, cfg, unroll_layers))()
    read = host_reader(mesh)
    sched = Scheduler(int(kv_blocks), block_size, rows, chunk, shards)
    for i, p in enumerate(prompts):
        sched.add(i, len(p), limits[i], tuple(p) if share_prefix else None)

    key = jax.random.key(seed)
    omax = cfg.original_max_position_embeddings
    longrope = cfg.rope_scaling_type == "longrope"
    history = [list(p) for p in prompts]
    out_lp: List[List[float]] = [[] for _ in range(n)]
    reasons: List[Optional[str]] = [None] * n
    pause_at: Dict[int, int] = {}
    emitted = [0] * n
    counts = collections.Counter()

    while not sched.idle:
        before = set(sched.running)
        step = sched.schedule()
        for sid in (s for r in step.rows for s in r):
            if sid not in before or any(p.seq_id == sid for p in step.prefills):
                length = len(history[sid])
                pause_at[sid] = omax + 1 if longrope and length <= omax else NO_PAUSE
        pool = _run_prefills(params, cfg, pool, step.prefills, history, shards, block_size)
        pool = _run_copies(pool, step.copies, shards)
        if interrupt is not None and interrupt():
            raise GenerationInterrupted("generation interrupted at a safe point")
        r = _pow2(max(len(x) for x in step.rows))
        w = _pow2(max(len(t) for tabs in step.tables for t in tabs))
        arr = _row_arrays(step, r, w, history, limits, pause_at)
        live_total = sum(len(x) for x in step.rows)
        min_live = live_total if sched.waiting else (r * shards) // 2 + 1 if r > 1 else 1
        max_steps = chunk
        if on_tokens is not None:
            max_steps = min(max_steps, stream_every)
        if interrupt is not None:
            max_steps = min(max_steps, max(1, int(interrupt_every)))
        pool, out = decode_chunk(params, pool, key, stop_ids, arr["tokens"], arr["length"],
                                 arr["limit"], arr["pause_at"], arr["row_id"], arr["active"],
                                 arr["table"], jnp.int32(max_steps), jnp.int32(min_live),
                                 cfg=cfg, sp=sp, chunk=chunk)
        toks, lps, length, done, stopped = read(*out)
        counts["chunks"] += 1
        for d, ids in enumerate(step.rows):
            for j, sid in enumerate(ids):
                new = int(length[d, j]) - len(history[sid])
                history[sid] += toks[d, j, :new].tolist()
                out_lp[sid] += lps[d, j, :new].tolist()
                counts["decode_tokens"] += new
                finished = bool(done[d, j])
                if finished:
                    reasons[sid] = "stop" if stopped[d, j] else "length"
                sched.update(sid, len(history[sid]), finished)
                if not finished and len(history[sid]) >= pause_at[sid]:
                    sched.restart(sid)
        if on_tokens is not None:
            for sid in range(n):
                gen = len(history[sid]) - len(prompts[sid])
                if gen > emitted[sid]:
                    on_tokens(sid, history[sid][len(prompts[sid]) + emitted[sid]:][:gen])
                    emitted[sid] = gen
        if on_progress is not None:
            on_progress({"rows_done": sum(x is not None for x in reasons), "rows": n,
                         "tokens": counts["decode_tokens"]})
    stats = dict(sched.stats, **counts, num_blocks=int(kv_blocks), block_size=block_size,
                 rows=rows, layout=layout, peak_used_blocks=max(p.peak_used for p in sched.pools))
    return GenerateOutput([h[len(p):] for h, p in zip(history, prompts)], out_lp, reasons, stats)


def prefill_rows(bucket_tokens: int) -> int:
    """Rows per prefill call at a length bucket: a power of two, at most PREFILL_TOKENS tokens per
    shard (at least one row), so a prefill's keys, values and activations stay bounded however
    many rows are admitted at once."""
    return 1 << max(0, (PREFILL_TOKENS // bucket_tokens).bit_length() - 1)


def _run_prefills(params, cfg, pool, prefills, history, shards, block_size):
    """Prefill every admitted history, one call per length bucket ([D, n, T] per call)."""
    if not prefills:
        return pool
    omax = cfg.original_max_position_embeddings
    cap = cfg.max_position_embeddings
    groups = collections.defaultdict(list)
    for p in prefills:
        t = -(-bucket(p.tokens, cap) // block_size) * block_size
        groups[t].append(p)
    for t, group in sorted(groups.items()):
        per = collections.defaultdict(list)
        for p in group:
            per[p.shard].append(p)
        m = min(_pow2(max(len(v) for v in per.values())), prefill_rows(t))
        for start in range(0, max(len(v) for v in per.values()), m):
            tokens = np.zeros((shards, m, t), np.int32)
            lengths = np.zeros((shards, m), np.int32)
            blocks = np.zeros((shards, m, t // block_size), np.int32)
            for d, items in per.items():
                for j, p in enumerate(items[start:start + m]):
                    src = history[p.seq_id] if p.seq_id is not None else p.key
                    tokens[d, j, :p.tokens] = src[:p.tokens]
                    lengths[d, j] = p.tokens
                    blocks[d, j, :len(p.blocks)] = p.blocks
            use_long = lengths + 1 > omax
            pool = prefill_blocks(params, pool, tokens, lengths, use_long, blocks, cfg=cfg)
    return pool


def _run_copies(pool, copies, shards):
    if not copies:
        return pool
    per = collections.defaultdict(list)
    for d, s, t in copies:
        per[d].append((s, t))
    m = _pow2(max(len(v) for v in per.values()))
    src = np.zeros((shards, m), np.int32)
    dst = np.zeros((shards, m), np.int32)
    for d, pairs in per.items():
        for j, (s, t) in enumerate(pairs):
            src[d, j], dst[d, j] = s, t
    return copy_blocks(pool, src, dst)


def _row_arrays(step, r, w, history, limits, pause_at) -> dict:
    d = len(step.rows)
    a = dict(tokens=np.zeros((d, r), np.int32), length=np.ones((d, r), np.int32),
             limit=np.full((d, r), 2, np.int32), pause_at=np.full((d, r), NO_PAUSE, np.int32),
             row_id=np.zeros((d, r), np.int32), active=np.zeros((d, r), bool),
             table=np.zeros((d, r, w), np.int32))
    for i, (ids, tabs) in enumerate(zip(step.rows, step.tables)):
        for j, (sid, blocks) in enumerate(zip(ids, tabs)):
            a["tokens"][i, j] = history[sid][-1]
            a["length"][i, j] = len(history[sid])
            a["limit"][i, j] = limits[sid]
            a["pause_at"][i, j] = pause_at[sid]
            a["row_id"][i, j] = sid
            a["active"][i, j] = True
            a["table"][i, j, :len(blocks)] = blocks
    return a


def _pool_sharding(mesh, cfg: ModelConfig, per_layer: bool):
    """Shards of the pool over the batch axes (data, fsdp), KV heads over `tensor`."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from .paged import KVPool

    b = batch_axes(mesh) or None
    heads = "tensor" if ("tensor" in mesh.axis_names
                         and cfg.num_key_value_heads % mesh.shape["tensor"] == 0) else None
    if per_layer:
        one = NamedSharding(mesh, P(b, None, heads, None, None))
        layer = (one,) * cfg.num_hidden_layers
        return KVPool(layer, layer)
    one = NamedSharding(mesh, P(None, b, None, heads, None, None))
    return KVPool(one, one)


generate = generate_paged  # the public `phi_reason.generate` (the static sampler is the reference)
