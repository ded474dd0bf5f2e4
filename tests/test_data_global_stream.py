"""Global batches on several hosts (data/global_stream.py), simulated by threads that exchange
examples through a barrier (the jobs use an all-gather across processes; test_multiprocess.py
runs that for real): every host count gives the single host's batches, each host its rows; the
position is one global index that resumes on another host count; a host reads only its share."""
import threading

import numpy as np
import pytest

from phi_reason.data.pipeline import dpo_batches, sft_batches
from phi_reason.data.synthetic import make_problems
from phi_reason.data.tokenizer import CharTokenizer

TOK = CharTokenizer()
PROBLEMS = make_problems(60, seed=3, difficulty="easy")
CHAT = [{"messages": [{"role": "user", "content": p["problem"]},
                      {"role": "assistant", "content": p["solution"]}]} for p in PROBLEMS]
PAIRS = [{"prompt": [{"role": "user", "content": p["problem"]}], "chosen": p["solution"],
          "rejected": p["solution"][::-1]} for p in PROBLEMS]


class CountingRecords(list):
    """Records that count the reads of each one."""

    def __init__(self, items):
        super().__init__(items)
        self.read = []

    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)


class Exchange:
    def __init__(self, n):
        self.barrier, self.slots = threading.Barrier(n), [None] * n

    def for_host(self, h):
        def exchange(mine):
            self.slots[h] = mine
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out
        return exchange


def run_hosts(make, n, batches, state=None):
    """Each of n threads builds host h's iterator, optionally restores `state`, reads batches."""
    ex, out, states, errors = Exchange(n), [None] * n, [None] * n, []

    def work(h):
        try:
            it = make(h, n, ex.for_host(h))
            if state is not None:
                it.set_state(it.remap_positions(state, n, h))
            out[h] = [next(it) for _ in range(batches)]
            states[h] = it.get_state()
        except Exception as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)
            ex.barrier.abort()

    threads = [threading.Thread(target=work, args=(h,)) for h in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out, states


def merged(host_batches, b):
    return {k: np.concatenate([hb[b][k] for hb in host_batches]) for k in host_batches[0][b]}


def equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["packed", "padded", "dpo"])
def test_any_host_count_gives_the_single_hosts_batches_and_resumes_on_another(kind):
    kw = dict(seq_len=60, batch_size=6, seed=0, num_epochs=None, length_policy="drop")
    if kind == "dpo":
        def make(h, n, exchange=None):
            return dpo_batches(PAIRS, TOK, "plain", shard_index=h, shard_count=n,
                               exchange=exchange, **kw)
    else:
        def make(h, n, exchange=None):
            return sft_batches(CHAT, TOK, "plain", packed=kind == "packed", shard_index=h,
                               shard_count=n, exchange=exchange, **kw)
    single = make(0, 1)
    want = [next(single) for _ in range(5)]
    assert single.stats["dropped"] > 0  # seq_len 60 drops some examples: hosts must agree
    for n, then in ((2, 3), (3, 2)):
        got, states = run_hosts(make, n, 3)
        assert all(equal(merged(got, b), want[b]) for b in range(3)), (kind, n)
        assert all(s == states[0] for s in states)  # one global position
        more, _ = run_hosts(make, then, 2, state=states)  # resumed on another host count
        assert all(equal(merged(more, b), want[3 + b]) for b in range(2)), (kind, n, then)
    # and onto one host, which continues as the single host did
    one = make(0, 1)
    one.set_state(one.remap_positions(states, 1, 0))
    assert equal(next(one), want[3])


def test_each_host_reads_only_its_share_of_the_records():
    records = [CountingRecords(CHAT) for _ in range(2)]

    def make(h, n, exchange):
        return sft_batches(records[h], TOK, "plain", seq_len=96, batch_size=4, packed=True,
                           shuffle=False, num_epochs=1, shard_index=h, shard_count=n,
                           exchange=exchange)

    run_hosts(make, 2, 4)
    for h in range(2):
        assert records[h].read and all(i % 2 == h for i in records[h].read)
