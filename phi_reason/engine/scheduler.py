"""The paged engine's host scheduler: KV blocks, admission, preemption and prefix sharing.

Plain Python, no JAX and no model: it decides which sequences run in the next decode chunk, which
KV blocks each owns, and what the device must prefill or copy first. `paged_sampler` turns a
`Step` into device calls.

Cache invariant: a running sequence that knows `length` tokens has the keys/values of positions
0..length-2 in its blocks; its last token is *pending* (the next decode step processes it). So a
(re)admitted sequence is prefilled with `length - 1` tokens of its history and never samples in
the prefill: a fresh prompt, a preempted row and a row that crossed the LongRoPE boundary all
start the same way.

Blocks: `BlockPool(num_blocks, block_size)` per shard (a shard = one slice of the batch axes of a
mesh; 1 without a mesh). Block 0 of every pool is scratch (padding rows and unused block-table
entries point there) and is never allocated. Blocks are reference counted: the full prompt blocks
of a group of samples are shared, the partly filled last one is copied per sample.

Each `schedule()`:
1. running sequences get blocks for one more chunk (`chunk_steps` tokens, capped at their
   limit); if the pool runs out, the most recently admitted sequence is preempted (its blocks
   freed, it goes back to the front of the queue with its history: recompute, as vLLM);
2. waiting sequences are admitted in FIFO order while a shard has a free row and the blocks for
   their prefill and first chunk;
3. the first admitted sample of a prompt group (same `share_key`) prefills the prompt once into
   a *prefix* whose full blocks every sample of the group shares; the prefix is released once
   every sample of the group has been admitted.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
from typing import Dict, Hashable, List, Optional, Tuple


class PoolExhausted(Exception):
    """Not enough free blocks for one sequence's next chunk even with everything else preempted."""


class BlockPool:
    """Reference-counted fixed-size KV blocks; block 0 is scratch. Lowest free block first."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs >= 2 blocks (block 0 is scratch), got "
                             f"{num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = int(num_blocks), int(block_size)
        self._free = list(range(1, self.num_blocks))
        heapq.heapify(self._free)
        self._ref = [0] * self.num_blocks
        self.peak_used = 0

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-max(int(tokens), 0) // self.block_size)

    def alloc(self, n: int) -> List[int]:
        if n > len(self._free):
            raise PoolExhausted(f"{n} blocks wanted, {len(self._free)} free")
        out = [heapq.heappop(self._free) for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        self.peak_used = max(self.peak_used, self.used)
        return out

    def share(self, blocks) -> None:
        for b in blocks:
            assert self._ref[b] > 0, f"block {b} is not allocated"
            self._ref[b] += 1

    def release(self, blocks) -> None:
        for b in blocks:
            assert self._ref[b] > 0, f"block {b} released twice"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                heapq.heappush(self._free, b)

    def refcount(self, block: int) -> int:
        return self._ref[block]


@dataclasses.dataclass
class Sequence:
    seq_id: int
    length: int  # tokens known (prompt + generated); positions < length - 1 are cached when running
    limit: int  # the sequence is finished once length reaches limit
    prompt_len: int
    share_key: Optional[Hashable] = None
    shard: int = -1
    blocks: List[int] = dataclasses.field(default_factory=list)
    admitted_at: int = -1  # admission counter (LIFO preemption order)
    fresh: bool = True  # never ran: may use its group's shared prefix


@dataclasses.dataclass
class Prefix:
    """A prompt's cached positions 0..cached-1, prefilled once and shared by its group."""
    key: Hashable
    shard: int
    cached: int
    blocks: List[int]  # full blocks first; the last is partial when cached % block_size


@dataclasses.dataclass
class Prefill:
    """Prefill `seq_id`'s history[:tokens] into `blocks` of `shard` (cache only, no sampling).
    `seq_id` is None for a shared prefix (then `key` names its group; history = the prompt)."""
    shard: int
    tokens: int
    blocks: List[int]
    seq_id: Optional[int] = None
    key: Optional[Hashable] = None


@dataclasses.dataclass
class Step:
    prefills: List[Prefill]
    copies: List[Tuple[int, int, int]]  # (shard, src block, dst block), after the prefills
    preempted: List[int]  # seq ids that lost their blocks this step (they will be recomputed)
    rows: List[List[int]]  # per shard: the running seq ids, in row order
    tables: List[List[List[int]]]  # per shard, per row: its blocks


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_rows: int, chunk_steps: int,
                 num_shards: int = 1):
        if max_rows < 1 or chunk_steps < 1 or num_shards < 1:
            raise ValueError("max_rows, chunk_steps and num_shards must be >= 1")
        self.pools = [BlockPool(num_blocks, block_size) for _ in range(num_shards)]
        self.block_size = int(block_size)
        self.max_rows, self.chunk_steps = int(max_rows), int(chunk_steps)
        self.waiting: collections.deque = collections.deque()
        self.running: Dict[int, Sequence] = {}  # seq_id -> sequence, admission order
        self.prefixes: Dict[Tuple[Hashable, int], Prefix] = {}
        self._waiting_in_group: Dict[Hashable, int] = collections.Counter()
        self._admissions = 0
        self.stats = collections.Counter()

    # -- requests -------------------------------------------------------------------------------
    def add(self, seq_id: int, prompt_len: int, limit: int,
            share_key: Optional[Hashable] = None) -> None:
        if prompt_len < 1 or limit <= prompt_len:
            raise ValueError(f"sequence {seq_id}: need 1 <= prompt_len < limit, got "
                             f"{prompt_len}, {limit}")
        self.waiting.append(Sequence(seq_id, prompt_len, limit, prompt_len, share_key))
        if share_key is not None:
            self._waiting_in_group[share_key] += 1

    def update(self, seq_id: int, length: int, finished: bool) -> None:
        """After a chunk: the sequence knows `length` tokens; a finished one frees its blocks."""
        seq = self.running[seq_id]
        if not seq.length <= length <= seq.limit:
            raise ValueError(f"sequence {seq_id}: length {length} outside [{seq.length}, "
                             f"{seq.limit}]")
        seq.length = length
        if finished or length >= seq.limit:
            self._drop(seq)
            self.stats["finished"] += 1

    def restart(self, seq_id: int) -> None:
        """Recompute a running sequence's cache before its next token (the LongRoPE crossing)."""
        self._requeue(self.running[seq_id])
        self.stats["restarts"] += 1

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # -- the step -------------------------------------------------------------------------------
    def schedule(self) -> Step:
        preempted = self._extend_running()
        prefills: List[Prefill] = []
        copies: List[Tuple[int, int, int]] = []
        self._admit_waiting(prefills, copies)
        if not self.running and self.waiting and self.prefixes:
            # Nothing runs and the queue's head does not fit: the blocks held for groups that
            # wait behind it are needed now (their samples will prefill on their own).
            self._drop_prefixes(list(self.prefixes))
            self._admit_waiting(prefills, copies)
        self._drop_prefixes([k for k in self.prefixes if self._waiting_in_group[k[0]] <= 0])
        shards = len(self.pools)
        rows: List[List[int]] = [[] for _ in range(shards)]
        tables: List[List[List[int]]] = [[] for _ in range(shards)]
        for seq in self.running.values():
            rows[seq.shard].append(seq.seq_id)
            tables[seq.shard].append(list(seq.blocks))
        if not self.running and self.waiting:
            seq = self.waiting[0]
            raise PoolExhausted(
                f"sequence {seq.seq_id} needs {self._first_chunk_blocks(seq)} KV blocks of "
                f"{self.block_size} tokens for its prefill and first chunk; a pool holds "
                f"{self.pools[0].num_blocks - 1}: raise the KV memory or lower chunk_steps")
        return Step(prefills, copies, preempted, rows, tables)

    def _target(self, seq: Sequence) -> int:
        """Cached positions a sequence may reach by the end of the next chunk."""
        return min(seq.length - 1 + self.chunk_steps, seq.limit - 1)

    def _first_chunk_blocks(self, seq: Sequence) -> int:
        return self.pools[0].blocks_for(self._target(seq))

    def _extend_running(self) -> List[int]:
        preempted = []
        for seq in list(self.running.values()):
            if seq.seq_id not in self.running:
                continue  # preempted while extending an earlier one
            pool = self.pools[seq.shard]
            need = pool.blocks_for(self._target(seq)) - len(seq.blocks)
            while need > pool.free:
                held = [k for k, pre in self.prefixes.items() if pre.shard == seq.shard]
                if held:  # a waiting group's shared prompt costs less to redo than a row
                    self._drop_prefixes(held[:1])
                    continue
                victim = self._latest_on(seq.shard)
                if victim is seq and len(self._on_shard(seq.shard)) == 1:
                    raise PoolExhausted(
                        f"sequence {seq.seq_id} needs {need} more KV blocks and shard "
                        f"{seq.shard} has {pool.free} free with nothing left to preempt")
                preempted.append(victim.seq_id)
                self._requeue(victim)
                self.stats["preemptions"] += 1
                if victim is seq:
                    break
            else:
                if need > 0:
                    seq.blocks += pool.alloc(need)
        return preempted

    def _on_shard(self, shard: int) -> List[Sequence]:
        return [s for s in self.running.values() if s.shard == shard]

    def _latest_on(self, shard: int) -> Sequence:
        return max(self._on_shard(shard), key=lambda s: s.admitted_at)

    def _requeue(self, seq: Sequence) -> None:
        self._drop(seq)
        seq.fresh, seq.shard = False, -1
        self.waiting.appendleft(seq)

    def _drop(self, seq: Sequence) -> None:
        self.pools[seq.shard].release(seq.blocks)
        seq.blocks = []
        del self.running[seq.seq_id]

    def _rows_used(self, shard: int) -> int:
        return len(self._on_shard(shard))

    def _best_shard(self, seq: Sequence, cached: int, grouped: bool):
        """(score, shard, prefix, shared full blocks, copied tail blocks) or None if no shard
        has a free row and the blocks; prefers a shard holding the group's prefix, then the
        most free blocks."""
        bs = self.block_size
        best = None
        for shard, pool in enumerate(self.pools):
            if self._rows_used(shard) >= self.max_rows:
                continue
            prefix = self.prefixes.get((seq.share_key, shard)) if grouped else None
            full = cached // bs if grouped else 0
            tail = 1 if grouped and cached % bs else 0
            need = pool.blocks_for(self._target(seq)) - full
            if grouped and prefix is None:
                need += pool.blocks_for(cached)  # the prefix itself (its tail block copied)
            if need <= pool.free:
                score = (prefix is not None, pool.free)
                if best is None or score > best[0]:
                    best = (score, shard, prefix, full, tail)
        return best

    def _admit(self, seq: Sequence, prefills: List[Prefill], copies: list) -> bool:
        cached = seq.length - 1
        can_share = seq.fresh and seq.share_key is not None and (
            self._waiting_in_group[seq.share_key] > 1 or
            any(k == seq.share_key for k, _ in self.prefixes))
        # Sharing first; if the group's prefix does not fit beside the row, the row alone.
        for grouped in ([True, False] if can_share else [False]):
            best = self._best_shard(seq, cached, grouped)
            if best is not None:
                break
        if best is None:
            return False
        _, shard, prefix, full, tail = best
        pool = self.pools[shard]
        if grouped:
            if prefix is None:
                prefix = Prefix(seq.share_key, shard, cached, pool.alloc(pool.blocks_for(cached)))
                self.prefixes[(seq.share_key, shard)] = prefix
                if cached > 0:
                    prefills.append(Prefill(shard, cached, list(prefix.blocks), key=seq.share_key))
                    self.stats["prefill_tokens"] += cached
            pool.share(prefix.blocks[:full])
            seq.blocks = list(prefix.blocks[:full])
            if tail:
                (dst,) = pool.alloc(1)
                copies.append((shard, prefix.blocks[full], dst))
                seq.blocks.append(dst)
            self.stats["forked"] += 1
        elif cached > 0:
            seq.blocks = pool.alloc(pool.blocks_for(cached))
            prefills.append(Prefill(shard, cached, list(seq.blocks), seq_id=seq.seq_id))
            self.stats["prefill_tokens"] += cached
        if seq.fresh and seq.share_key is not None:
            self._waiting_in_group[seq.share_key] -= 1
        more = pool.blocks_for(self._target(seq)) - len(seq.blocks)
        seq.blocks += pool.alloc(max(more, 0))
        seq.shard, seq.fresh = shard, False
        seq.admitted_at = self._admissions
        self._admissions += 1
        self.running[seq.seq_id] = seq
        self.stats["peak_rows"] = max(self.stats["peak_rows"], len(self.running))
        self.stats["peak_used_blocks"] = max(self.stats["peak_used_blocks"],
                                             sum(p.used for p in self.pools))
        return True

    def _admit_waiting(self, prefills: List[Prefill], copies: list) -> None:
        while self.waiting and self._admit(self.waiting[0], prefills, copies):
            self.waiting.popleft()

    def _drop_prefixes(self, keys) -> None:
        for k in keys:
            prefix = self.prefixes.pop(k)
            self.pools[prefix.shard].release(prefix.blocks)


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                       dtype_bytes: int) -> int:
    """Keys and values of one block across all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * block_size * dtype_bytes


def blocks_for_memory(memory_bytes: int, bytes_per_block: int) -> int:
    """Pool size (blocks, scratch included) that fits in `memory_bytes`."""
    return max(int(memory_bytes) // int(bytes_per_block), 0)
