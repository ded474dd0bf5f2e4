"""Jitted KV-cache generation with continuous batching.

`generate(params, cfg, prompts, ...)` runs any number of prompts through a fixed number of batch
*slots*. Each slot holds one prompt's state in device arrays of static shape ([slots, S] tokens,
the [L, slots, nKV, S, hd] cache), so nothing recompiles while the work changes:

1. Free slots are filled by a jitted *prefill* of the waiting prompts (right-padded to a
   power-of-two length bucket, grouped per bucket; the group size is padded to a power of two too),
   which also samples each prompt's first new token.
2. A jitted `lax.while_loop` decodes one token per live slot per iteration, entirely on device,
   until a slot finishes while prompts are still waiting (or a slot reaches the LongRoPE crossing,
   below). The host then collects the finished rows, prefills the next prompts into their slots,
   and re-enters the loop. With nothing waiting, the loop runs until every slot is done.

Every row has its own positions (0 at its first prompt token). Sampling keys are derived from
(seed, prompt index, token index), so a prompt's output does not depend on the slot count, on
which slot it ran in, or on the other prompts: continuous batching and one-at-a-time generation
give identical results, greedy or sampled.

LongRoPE decode policy (phi-4-mini; configs with `rope_scaling_type == "longrope"`): we follow
transformers exactly. A sequence whose length n (tokens seen so far) is at most
`original_max_position_embeddings` (omax) uses the short factors; the prompt is prefilled with the
long factors when it is already longer than omax. When a row generated from a short cache is about
to process position omax (n becomes omax + 1), its cache is discarded and the row's whole history
(prompt + generated tokens) is re-prefilled with the long factors; all later positions use the long
factors. So the logits for the token after n tokens always equal `forward(sequence[:n])` with
`use_long = n > omax` - the same as a model without a cache. This is what HF's
`Phi3ForCausalLM.prepare_inputs_for_generation` does (it drops the cache when
`input_ids.shape[1] >= omax + 1` and the cache holds <= omax tokens), except that HF decides the
regime from the longest row of a padded batch while we decide it per row (identical for a batch
of one). The cost is one extra prefill of omax + 1 tokens per row that crosses.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..model.config import ModelConfig
from ..model.kv_cache import KVCache, decode_step, init_cache, prefill, split_layers, write_rows
from .sampling import SamplingParams, sample_rows

MIN_BUCKET = 16


class GenerationInterrupted(Exception):
    """`generate`'s `interrupt()` returned True at a safe point (between decode chunks)."""


@dataclasses.dataclass
class GenerateOutput:
    tokens: List[List[int]]  # generated ids per prompt (a stop token that ended the row included)
    logprobs: List[List[float]]  # untempered log-probability of each generated token
    finish_reasons: List[str]  # "stop" | "length"
    stats: dict = dataclasses.field(default_factory=dict)  # engine counters (paged engine)


class SlotState(NamedTuple):
    cache: KVCache
    tokens: jax.Array  # [B, S] int32: prompt then generated tokens
    logprobs: jax.Array  # [B, S] float32: logprob of tokens[b, t] (generated positions only)
    length: jax.Array  # [B] tokens known; the cache holds positions < length - 1
    prompt_len: jax.Array  # [B]
    limit: jax.Array  # [B] the row is finished once length reaches limit
    row_id: jax.Array  # [B] prompt index (for the sampling key)
    active: jax.Array  # [B] bool: slot holds a prompt
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool: finished on a stop token


def bucket(n: int, cap: int) -> int:
    """Smallest power of two >= max(n, MIN_BUCKET), capped at `cap`."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, cap)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def init_state(cfg: ModelConfig, slots: int, max_len: int, per_layer: bool = False) -> SlotState:
    def ints():  # distinct buffers: the state is donated, so no two fields may share one
        return jnp.zeros((slots,), jnp.int32)

    def flags():
        return jnp.zeros((slots,), bool)

    return SlotState(init_cache(cfg, slots, max_len, per_layer=per_layer),
                     jnp.zeros((slots, max_len), jnp.int32),
                     jnp.zeros((slots, max_len), jnp.float32), ints(), ints(), ints(), ints(),
                     flags(), flags(), flags())


def _needs_reprefill(cfg: ModelConfig, st: SlotState):
    """Rows about to decode position omax from a short-factor cache (LongRoPE crossing)."""
    if cfg.rope_scaling_type != "longrope":
        return jnp.zeros_like(st.done)
    return st.active & ~st.done & (st.length - 1 == cfg.original_max_position_embeddings)


def _record(st: SlotState, rows, upd, tok, lp, stop_ids) -> SlotState:
    """Append the sampled token of rows `rows` where `upd`, and update their finish flags."""
    s = st.tokens.shape[1]
    length = st.length[rows]
    at = jnp.where(upd, length, s)  # out of range -> the scatter drops it
    is_stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    new_len = length + 1
    done = is_stop | (new_len >= st.limit[rows])
    return st._replace(
        tokens=st.tokens.at[rows, at].set(tok, mode="drop"),
        logprobs=st.logprobs.at[rows, at].set(lp, mode="drop"),
        length=st.length.at[rows].set(jnp.where(upd, new_len, length)),
        done=st.done.at[rows].set(jnp.where(upd, done, st.done[rows])),
        stopped=st.stopped.at[rows].set(jnp.where(upd, is_stop, st.stopped[rows])))


def _constrain(st, sharding):
    return st if sharding is None else lax.with_sharding_constraint(st, sharding)


def _prefill_rows(params, cfg, sp, st, key, stop_ids, slots, tokens, lengths):
    """Prefill `tokens` [n, T] (lengths [n]) into cache rows `slots` and sample one token each."""
    use_long = lengths > cfg.original_max_position_embeddings
    logits, k, v = prefill(params, cfg, tokens, lengths, use_long)
    st = st._replace(cache=write_rows(st.cache, slots, k, v))
    tok, lp = sample_rows(key, logits, st.row_id[slots], lengths, sp)
    return _record(st, slots, jnp.ones(slots.shape, bool), tok, lp, stop_ids)


@functools.partial(jax.jit, static_argnames=("cfg", "sp", "sharding"), donate_argnames=("st",))
def _start_rows(params, st, key, stop_ids, slots, tokens, lengths, limits, row_ids, *, cfg, sp,
                sharding=None):
    """New prompts into `slots`: set up the rows, prefill, sample their first token."""
    t = tokens.shape[1]
    st = st._replace(
        tokens=st.tokens.at[slots, :t].set(tokens), length=st.length.at[slots].set(lengths),
        prompt_len=st.prompt_len.at[slots].set(lengths), limit=st.limit.at[slots].set(limits),
        row_id=st.row_id.at[slots].set(row_ids), active=st.active.at[slots].set(True),
        done=st.done.at[slots].set(False), stopped=st.stopped.at[slots].set(False))
    st = _prefill_rows(params, cfg, sp, st, key, stop_ids, slots, tokens, lengths)
    return _constrain(st, sharding)


@functools.partial(jax.jit, static_argnames=("cfg", "sp", "width", "sharding"),
                   donate_argnames=("st",))
def _restart_rows(params, st, key, stop_ids, slots, *, cfg, sp, width, sharding=None):
    """Re-prefill rows' whole histories (first `width` cache slots) with the long RoPE factors."""
    tokens = st.tokens[slots, :width]
    st = _prefill_rows(params, cfg, sp, st, key, stop_ids, slots, tokens, st.length[slots])
    return _constrain(st, sharding)


@functools.partial(jax.jit, static_argnames=("cfg", "sp", "sharding"),
                   donate_argnames=("st",))
def _decode(params, st, key, stop_ids, refill_wanted, max_steps, *, cfg, sp, sharding=None):
    """Decode until every live row is done, or a row finishes while prompts wait (refill_wanted),
    or a row reaches the LongRoPE crossing, or after `max_steps` steps. `params["layers"]` is a
    list (unrolled layer loop, per-layer cache) or the stacked dict (scanned)."""
    rows = jnp.arange(st.length.shape[0])
    omax = cfg.original_max_position_embeddings

    def cond(carry):
        st, step = carry
        live = st.active & ~st.done
        service = jnp.any(_needs_reprefill(cfg, st)) | (
            refill_wanted & jnp.any(st.active & st.done))
        return (step < max_steps) & jnp.any(live) & ~service

    def body(carry):
        st, step = carry
        live = st.active & ~st.done
        pos = jnp.maximum(st.length - 1, 0)
        logits, cache = decode_step(params, cfg, st.cache, st.tokens[rows, pos], pos,
                                    pos + 1 > omax)
        st = st._replace(cache=cache)
        tok, lp = sample_rows(key, logits, st.row_id, st.length, sp)
        st = _constrain(_record(st, rows, live, tok, lp, stop_ids), sharding)
        return st, step + 1

    st, _ = lax.while_loop(cond, body, (st, jnp.int32(0)))
    return st


split_layers_jit = jax.jit(split_layers)


def _pad_group(n: int, cap: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return min(p, cap)


def batch_axes(mesh) -> tuple:
    return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)


def batch_shards(mesh) -> int:
    """How many ways rows split over the batch axes (1 without a mesh)."""
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in batch_axes(mesh)] or [1]))


def _state_sharding(mesh, cfg: ModelConfig, per_layer: bool = False):
    """Slots over the batch axes (data, fsdp), KV heads over `tensor` when it divides them."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    b = batch_axes(mesh) or None
    heads = "tensor" if ("tensor" in mesh.axis_names
                         and cfg.num_key_value_heads % mesh.shape["tensor"] == 0) else None
    rows = NamedSharding(mesh, P(b))
    if per_layer:
        cache = (NamedSharding(mesh, P(b, heads, None, None)),) * cfg.num_hidden_layers
    else:
        cache = NamedSharding(mesh, P(None, b, heads, None, None))
    return SlotState(KVCache(cache, cache), NamedSharding(mesh, P(b, None)),
                     NamedSharding(mesh, P(b, None)), rows, rows, rows, rows, rows, rows, rows)


def host_reader(mesh):
    """`read(*arrays) -> numpy arrays` of slot-state fields for the host scheduler. Under several
    processes each holds only its rows, so the fields are all-gathered (replicated) first; every
    process then runs the same scheduling decisions on the same values."""
    from ..sharding import processes
    if mesh is None or processes.process_count() == 1:
        return lambda *xs: tuple(map(np.asarray, jax.device_get(xs)))
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    gather = jax.jit(lambda xs: xs, out_shardings=NamedSharding(mesh, P()))
    return lambda *xs: tuple(map(np.asarray, jax.device_get(gather(xs))))


def place_params(params, cfg: ModelConfig, mesh):
    """Parameters already laid out on `mesh` (e.g. the trainer's live ones) are used as they are;
    otherwise they are placed by the project's sharding rules (heads / MLP / vocab over tensor,
    embed over fsdp)."""
    from jax.sharding import NamedSharding

    from ..model.sharded import param_shardings

    leaves = jax.tree_util.tree_leaves(params)
    if all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
           for x in leaves):
        return params
    return jax.device_put(params, param_shardings(cfg, mesh))


def check_requests(cfg: ModelConfig, prompts, max_new_tokens):
    """(prompts as int lists, one budget per prompt), or ValueError naming the bad prompt."""
    prompts = [list(map(int, p)) for p in prompts]
    n = len(prompts)
    budgets = ([int(max_new_tokens)] * n if np.ndim(max_new_tokens) == 0
               else [int(m) for m in max_new_tokens])
    if len(budgets) != n:
        raise ValueError(f"max_new_tokens has {len(budgets)} entries for {n} prompts")
    for i, (p, m) in enumerate(zip(prompts, budgets)):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if m < 1:
            raise ValueError(f"max_new_tokens for prompt {i} must be >= 1, got {m}")
        if len(p) >= cfg.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model allows "
                             f"{cfg.max_position_embeddings} positions in total")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside [0, {cfg.vocab_size})")
    return prompts, budgets


def stop_ids_of(cfg: ModelConfig, stop_tokens):
    stops = cfg.stop_token_ids if stop_tokens is None else tuple(int(t) for t in stop_tokens)
    return jnp.asarray(stops or (-1,), jnp.int32)


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
             max_new_tokens: Union[int, Sequence[int]], temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop_tokens: Optional[Sequence[int]] = None,
             seed: int = 0, num_slots: Optional[int] = None, mesh=None,
             on_tokens: Optional[Callable[[int, List[int]], None]] = None,
             stream_every: int = 8, unroll_layers: Optional[bool] = None,
             interrupt: Optional[Callable[[], bool]] = None,
             interrupt_every: int = 256) -> GenerateOutput:
    """Generate continuations of `prompts` (lists of token ids, any lengths).

    max_new_tokens: one budget for all prompts or one per prompt. A row also ends at
      `cfg.max_position_embeddings` total tokens (finish reason "length").
    temperature 0 is greedy; otherwise temperature, then top-k (0 = off), then top-p.
    stop_tokens: ids that end a row (included in its output); None -> `cfg.stop_token_ids`,
      () -> none.
    seed: the PRNG seed; the same seed gives the same output.
    num_slots: concurrent rows (default min(len(prompts), 64)); on a mesh it is rounded up to a
      multiple of the batch axes (data x fsdp).
    mesh: a jax Mesh; rows go over (data, fsdp) and heads over tensor.
    on_tokens(prompt_index, new_ids): streaming callback, called every `stream_every` steps.
    unroll_layers: unroll the layer loop in decode (default: on CPU, or when not cfg.scan_layers).
    interrupt(): asked before every decode chunk of at most `interrupt_every` steps; True raises
      GenerationInterrupted (the partial rows are dropped). Under several processes every process
      asks at the same points, so it may be a collective.
    """
    prompts, budgets = check_requests(cfg, prompts, max_new_tokens)
    n = len(prompts)
    if n == 0:
        return GenerateOutput([], [], [])
    sp = SamplingParams(float(temperature), float(top_p), int(top_k)).validate()
    stop_ids = stop_ids_of(cfg, stop_tokens)

    slots = int(num_slots or min(n, 64))
    if unroll_layers is None:
        unroll_layers = jax.default_backend() == "cpu" or not cfg.scan_layers
    unroll_layers = bool(unroll_layers)
    sharding = None
    if mesh is not None:
        mult = int(np.prod([mesh.shape[a] for a in batch_axes(mesh)] or [1]))
        slots = _round_up(slots, mult)
        sharding = _state_sharding(mesh, cfg, per_layer=unroll_layers)
        params = place_params(params, cfg, mesh)
    # Static capacity: the longest prompt's bucket plus the largest budget, rounded up so that
    # similar calls (an RL loop) reuse the compiled functions.
    cap = cfg.max_position_embeddings
    width = min(_round_up(bucket(max(map(len, prompts)), cap) + max(budgets), 64), cap)
    limits = [min(len(p) + m, width) for p, m in zip(prompts, budgets)]
    if unroll_layers and not isinstance(params["layers"], list):
        # Sliced once per call, not inside `_decode`: that is re-entered at every refill of
        # continuous batching, and each entry would copy every layer's weights again.
        params = split_layers_jit(params)
    st = init_state(cfg, slots, width, per_layer=unroll_layers)
    if sharding is not None:
        st = jax.device_put(st, sharding)
    key = jax.random.key(seed)
    kw = dict(cfg=cfg, sp=sp, sharding=sharding)

    queue = collections.deque(range(n))
    slot_row = [-1] * slots  # prompt index held by each slot
    emitted = [0] * n  # tokens already streamed
    out_tokens: List[Optional[List[int]]] = [None] * n
    out_logprobs: List[Optional[List[float]]] = [None] * n
    reasons: List[Optional[str]] = [None] * n

    def stream(rows, length_host, tokens_host):
        for b in rows:
            i = slot_row[b]
            p = len(prompts[i])
            new = tokens_host[b, p + emitted[i]:length_host[b]].tolist()
            if new:
                emitted[i] += len(new)
                on_tokens(i, new)

    omax = cfg.original_max_position_embeddings
    read = host_reader(mesh)
    while True:
        done, length, stopped = read(st.done, st.length, st.stopped)
        finished = [b for b in range(slots) if slot_row[b] >= 0 and done[b]]
        if finished or on_tokens is not None:
            rows_host = [b for b in range(slots) if slot_row[b] >= 0]
            toks, lps = read(st.tokens, st.logprobs)
            if on_tokens is not None:
                stream(rows_host, length, toks)
            for b in finished:
                i = slot_row[b]
                p = len(prompts[i])
                out_tokens[i] = toks[b, p:length[b]].tolist()
                out_logprobs[i] = lps[b, p:length[b]].tolist()
                reasons[i] = "stop" if stopped[b] else "length"
                slot_row[b] = -1
        free = [b for b in range(slots) if slot_row[b] < 0]
        if queue and free:
            starts = []
            while queue and free:
                b, i = free.pop(0), queue.popleft()
                slot_row[b] = i
                starts.append((b, i))
            groups = collections.defaultdict(list)
            for b, i in starts:
                groups[bucket(len(prompts[i]), width)].append((b, i))
            for t, group in sorted(groups.items()):
                group = group + [group[0]] * (_pad_group(len(group), slots) - len(group))
                toks = np.zeros((len(group), t), np.int32)
                for r, (_, i) in enumerate(group):
                    toks[r, :len(prompts[i])] = prompts[i]
                st = _start_rows(
                    params, st, key, stop_ids,
                    jnp.asarray([b for b, _ in group], jnp.int32), jnp.asarray(toks),
                    jnp.asarray([len(prompts[i]) for _, i in group], jnp.int32),
                    jnp.asarray([limits[i] for _, i in group], jnp.int32),
                    jnp.asarray([i for _, i in group], jnp.int32), **kw)
            continue
        if cfg.rope_scaling_type == "longrope":
            crossing = [b for b in range(slots)
                        if slot_row[b] >= 0 and not done[b] and length[b] - 1 == omax]
            if crossing:
                group = crossing + [crossing[0]] * (_pad_group(len(crossing), slots)
                                                    - len(crossing))
                st = _restart_rows(params, st, key, stop_ids, jnp.asarray(group, jnp.int32),
                                   width=bucket(omax + 1, width), **kw)
                continue
        if all(r < 0 for r in slot_row):
            break
        if interrupt is not None and interrupt():
            raise GenerationInterrupted("generation interrupted at a safe point")
        max_steps = stream_every if on_tokens is not None else np.iinfo(np.int32).max
        if interrupt is not None:
            max_steps = min(max_steps, max(1, int(interrupt_every)))
        st = _decode(params, st, key, stop_ids, jnp.asarray(bool(queue)), jnp.int32(max_steps),
                     **kw)
    return GenerateOutput(out_tokens, out_logprobs, reasons)
