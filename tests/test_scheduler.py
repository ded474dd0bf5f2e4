"""The paged engine's host scheduler on its own (no model): blocks, admission, preemption, sharing.

A simulated device advances every running sequence by a random number of tokens per chunk; after
every step the test checks the invariants the device relies on against its own bookkeeping.
"""
import collections

import numpy as np
import pytest

from phi_reason.engine.scheduler import BlockPool, PoolExhausted, Scheduler, kv_bytes_per_block


def test_pool_allocates_lowest_first_and_counts_references():
    pool = BlockPool(6, 4)
    assert pool.alloc(2) == [1, 2] and pool.free == 3  # block 0 is scratch
    pool.share([2])
    pool.release([1, 2])
    assert pool.refcount(2) == 1 and pool.free == 4
    assert pool.alloc(1) == [1]
    with pytest.raises(PoolExhausted):
        pool.alloc(4)
    assert pool.blocks_for(0) == 0 and pool.blocks_for(4) == 1 and pool.blocks_for(5) == 2


def test_group_prefills_once_and_copies_the_partial_block():
    # prompt 11 tokens: 10 cached (positions 0..9) = 2 full blocks of 4 + a partial one.
    s = Scheduler(num_blocks=64, block_size=4, max_rows=8, chunk_steps=4)
    for i in range(3):
        s.add(i, prompt_len=11, limit=20, share_key="p")
    step = s.schedule()
    assert [(p.tokens, p.seq_id, p.key) for p in step.prefills] == [(10, None, "p")]
    prefix = step.prefills[0].blocks
    assert len(prefix) == 3 and len(step.copies) == 3
    for sid, blocks in zip(step.rows[0], step.tables[0]):
        assert blocks[:2] == prefix[:2]  # shared full blocks
        assert blocks[2] not in prefix  # its own copy of the partial block ...
        assert (0, prefix[2], blocks[2]) in step.copies
        assert len(blocks) == s.pools[0].blocks_for(min(10 + 4, 19))  # ... and the next chunk
    assert s.stats["prefill_tokens"] == 10 and s.stats["forked"] == 3
    # the prefix is released once the group is admitted: 2 shared blocks + 3 x own blocks
    assert s.pools[0].refcount(prefix[0]) == 3 and s.pools[0].refcount(prefix[2]) == 0


def test_unshared_sequences_prefill_their_own_history():
    s = Scheduler(num_blocks=64, block_size=4, max_rows=8, chunk_steps=4)
    s.add(0, 11, 20)
    s.add(1, 11, 20)
    step = s.schedule()
    assert sorted((p.seq_id, p.tokens) for p in step.prefills) == [(0, 10), (1, 10)]
    assert not step.copies and s.stats["prefill_tokens"] == 20


def test_preemption_is_last_in_first_out_and_recomputes_the_history():
    # 9 usable blocks of 4 tokens; three rows of prompt 5 each need 2 blocks now and 1 per chunk.
    s = Scheduler(num_blocks=10, block_size=4, max_rows=3, chunk_steps=4)
    for i in range(3):
        s.add(i, 5, 40)
    step = s.schedule()
    assert step.rows == [[0, 1, 2]] and s.pools[0].free == 3
    for sid in (0, 1, 2):
        s.update(sid, 13, False)  # cached 12 -> the next chunk wants 16 positions = 4 blocks
    step = s.schedule()
    assert step.preempted == [2] and step.rows == [[0, 1]]
    assert s.waiting[0].seq_id == 2 and s.waiting[0].length == 13  # keeps its history
    for sid in (0, 1):
        s.update(sid, 40, True)
    step = s.schedule()
    assert step.rows == [[2]] and [(p.seq_id, p.tokens) for p in step.prefills] == [(2, 12)]


def test_a_row_too_long_for_the_pool_is_named():
    s = Scheduler(num_blocks=3, block_size=4, max_rows=2, chunk_steps=8)
    s.add(7, 2, 30)
    with pytest.raises(PoolExhausted, match="sequence 7 needs 3 KV blocks"):
        s.schedule()


def test_kv_bytes_per_block_phi4_mini():
    # Phi-4-mini: 32 layers, 8 KV heads of 128: 128 KiB per token in bf16 (PHI4_FACTS).
    assert kv_bytes_per_block(32, 8, 128, 1, 2) == 128 * 1024


def _check(s: Scheduler, step):
    """The invariants the device relies on, recomputed from scratch."""
    refs = [collections.Counter() for _ in s.pools]
    for shard, (ids, tabs) in enumerate(zip(step.rows, step.tables)):
        assert len(ids) <= s.max_rows
        for sid, blocks in zip(ids, tabs):
            seq = s.running[sid]
            assert seq.shard == shard and blocks == seq.blocks and 0 not in blocks
            assert len(blocks) >= s.pools[shard].blocks_for(s._target(seq))  # chunk covered
            refs[shard].update(blocks)
    for prefix in s.prefixes.values():
        refs[prefix.shard].update(prefix.blocks)
    for shard, pool in enumerate(s.pools):
        for b in range(1, pool.num_blocks):
            assert pool.refcount(b) == refs[shard][b], f"shard {shard} block {b}"
        assert pool.free == pool.num_blocks - 1 - len(refs[shard])
    # a block held by two rows is a shared full prompt block: rows of one group, in one shard
    for shard in range(len(s.pools)):
        holders = collections.defaultdict(set)
        for sid, blocks in zip(step.rows[shard], step.tables[shard]):
            for j, b in enumerate(blocks):
                holders[b].add((sid, j))
        for b, hs in holders.items():
            if len(hs) > 1:
                keys = {s.running[sid].share_key for sid, _ in hs}
                assert len(keys) == 1 and None not in keys
                j = {j for _, j in hs}
                assert len(j) == 1  # the same position range in every holder
                sid = next(iter(hs))[0]
                assert (j.pop() + 1) * s.block_size <= s.running[sid].prompt_len - 1


def _random_workload(seed) -> collections.Counter:
    rng = np.random.default_rng(seed)
    bs = int(rng.choice([2, 4, 8]))
    groups = []
    for g in range(int(rng.integers(3, 10))):
        prompt, size = int(rng.integers(1, 12)), int(rng.integers(1, 4))
        groups.append((prompt, [prompt + int(rng.integers(1, 14)) for _ in range(size)]))
    longest = max(-(-(limit - 1) // bs) for _, limits in groups for limit in limits)
    # tight pools (down to one longest row) so that rows are preempted and recomputed
    s = Scheduler(num_blocks=longest + 1 + int(rng.integers(0, 2 * longest)), block_size=bs,
                  max_rows=int(rng.integers(1, 6)), chunk_steps=int(rng.integers(1, 6)),
                  num_shards=int(rng.integers(1, 3)))
    limits = {}
    for g, (prompt, group) in enumerate(groups):
        for limit in group:
            sid = len(limits)
            s.add(sid, prompt, limit, share_key=("g", g) if len(group) > 1 else None)
            limits[sid] = limit
    finished = set()
    first_admission = {}
    for _ in range(5000):
        if s.idle:
            break
        step = s.schedule()
        _check(s, step)
        for ids in step.rows:
            for i in ids:
                first_admission.setdefault(i, s.running[i].admitted_at)
        for ids in step.rows:
            for i in list(ids):
                seq = s.running[i]
                grown = min(seq.length + int(rng.integers(0, s.chunk_steps + 1)), seq.limit)
                stop = bool(rng.random() < 0.1)
                s.update(i, grown, stop)
                if stop or grown >= seq.limit:
                    finished.add(i)
    assert s.idle and finished == set(limits)
    assert all(p.used == 0 for p in s.pools) and not s.prefixes
    order = sorted(first_admission, key=first_admission.get)
    assert order == sorted(order)  # FIFO admission
    return s.stats


def test_random_workloads_keep_the_invariants_and_finish():
    totals = collections.Counter()
    for seed in range(24):
        totals.update(_random_workload(seed))
    assert totals["preemptions"] > 0 and totals["forked"] > 0, totals
