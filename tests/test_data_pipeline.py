"""grain pipelines: deterministic shuffling, per-host sharding, length-policy counts, exact resume
(JSON round trip of the state) for packed, padded and DPO batches, and with worker processes."""
import collections
import json

import numpy as np
import pytest

from phi_reason.data.pipeline import dpo_batches, sft_batches
from phi_reason.data.synthetic import make_problems
from phi_reason.data.tokenizer import CharTokenizer

TOK = CharTokenizer()
PROBLEMS = make_problems(60, seed=3, difficulty="easy")
RECORDS = [{"messages": [{"role": "user", "content": p["problem"]},
                         {"role": "assistant", "content": p["solution"]}]} for p in PROBLEMS]
LENGTHS = {p["problem"]: len(TOK.encode(p["problem"] + "\n" + p["solution"])) + 1 for p in PROBLEMS}


def _problems_in(batch):
    """The problem text of every segment of a batch, in row-major order."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            out.append(TOK.decode(batch["tokens"][r][seg == s]).split("\n")[0])
    return out


def _sft(**kw):
    args = dict(seq_len=96, batch_size=4, seed=0, num_epochs=1, shard_index=0, shard_count=1)
    args.update(kw)
    return sft_batches(RECORDS, TOK, "plain", **args)


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_one_epoch_covers_every_record_once_and_seed_changes_order():
    for packed in (True, False):
        seen = [p for b in _sft(packed=packed) for p in _problems_in(b)]
        assert collections.Counter(seen) == collections.Counter(list(LENGTHS))  # each exactly once
    order = lambda seed: [p for b in _sft(seed=seed, packed=False) for p in _problems_in(b)]  # noqa: E731
    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0) != [p["problem"] for p in PROBLEMS]  # shuffled


def test_epochs_are_reshuffled():
    batches = list(_sft(packed=False, num_epochs=2))
    seen = [p for b in batches for p in _problems_in(b)]
    first, second = seen[:60], seen[60:]
    assert (collections.Counter(first) == collections.Counter(second)
            == collections.Counter(list(LENGTHS)))
    assert first != second


def test_host_shards_partition_the_stream():
    shards = [[p for b in _sft(packed=False, batch_size=4, shard_index=h, shard_count=2)
               for p in _problems_in(b)] for h in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert collections.Counter(shards[0] + shards[1]) == collections.Counter(list(LENGTHS))
    first = next(_sft(packed=False, batch_size=4, shard_index=1, shard_count=2))
    assert first["tokens"].shape == (2, 96)  # global batch 4 -> 2 rows per host
    endless = [_sft(packed=False, num_epochs=None, shard_index=h, shard_count=2) for h in range(2)]
    two_epochs = [p for _ in range(30) for it in endless for p in _problems_in(next(it))]
    assert collections.Counter(two_epochs) == collections.Counter(list(LENGTHS) * 2)
    with pytest.raises(ValueError, match="not divisible by 3 hosts"):
        _sft(batch_size=4, shard_index=0, shard_count=3)


def test_positions_of_two_hosts_map_onto_one_and_four():
    """Two hosts read 3 global batches of 8 rows (one example per row); their positions map onto
    one host, which continues with exactly the uninterrupted single host's 4th batch, and onto
    four hosts, whose rows together are that batch's rows. Packed rows read a different number of
    records per host: not mappable (None)."""
    kw = dict(packed=False, batch_size=8, num_epochs=None)
    hosts = [_sft(shard_index=h, shard_count=2, **kw) for h in range(2)]
    for it in hosts:
        for _ in range(3):
            next(it)
    saved = [it.get_state() for it in hosts]
    single = _sft(**kw)
    for _ in range(3):
        next(single)
    want = next(single)
    resumed = _sft(**kw)
    resumed.set_state(resumed.remap_positions(saved, 1, 0))
    assert _equal(next(resumed), want)
    quarters = []
    for h in range(4):
        it = _sft(shard_index=h, shard_count=4, **kw)
        it.set_state(it.remap_positions(saved, 4, h))
        quarters += _problems_in(next(it))
    assert sorted(quarters) == sorted(_problems_in(want))
    assert resumed.remap_positions(saved, 4, 1)["stats"]["examples"] == 0
    assert resumed.remap_positions(saved, 4, 0)["stats"]["examples"] == 24
    packed = [_sft(shard_index=h, shard_count=2, batch_size=2, num_epochs=None) for h in range(2)]
    for it, n in zip(packed, (3, 5)):
        for _ in range(n):
            next(it)
    assert resumed.remap_positions([it.get_state() for it in packed], 1, 0) is None


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_length_policy_counts(policy):
    seq_len = 40
    too_long = {p for p, n in LENGTHS.items() if n > seq_len}
    assert 0 < len(too_long) < len(LENGTHS)
    it = _sft(seq_len=seq_len, length_policy=policy)
    batches = list(it)
    seen = [p for b in batches for p in _problems_in(b)]
    assert it.stats["examples"] == 60
    if policy == "drop":
        assert it.stats == {"examples": 60, "dropped": len(too_long), "truncated": 0}
        assert set(seen) == set(LENGTHS) - too_long
    else:
        assert it.stats == {"examples": 60, "truncated": len(too_long), "dropped": 0}
        assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == \
            sum(min(n, seq_len) for n in LENGTHS.values())
    for b in batches:
        assert not any(k.startswith("stat_") for k in b)


def _check_resume(make, n_first, n_more):
    """Consume n_first batches, save the state (through JSON, as a checkpoint would), keep going for
    n_more batches (the uninterrupted run); a rebuilt pipeline restored from the state yields the
    same n_more batches and ends with the same stats."""
    run = make()
    for _ in range(n_first):
        next(run)
    state = json.loads(json.dumps(run.get_state()))
    reference = [next(run) for _ in range(n_more)]
    resumed = make()
    resumed.set_state(state)
    rest = [next(resumed) for _ in range(n_more)]
    assert all(_equal(a, b) for a, b in zip(rest, reference))
    assert resumed.stats == run.stats and run.stats["examples"] > 0
    run.close()
    resumed.close()


@pytest.mark.parametrize("packed", [True, False])
def test_resume_sft(packed):
    # 3 epochs of 60 examples: the resume point and later batches cross epoch boundaries
    _check_resume(lambda: _sft(packed=packed, num_epochs=None, seq_len=64, length_policy="drop"),
                  7, 20)


def test_resume_dpo():
    records = [{"prompt": [{"role": "user", "content": p["problem"]}], "chosen": p["solution"],
                "rejected": p["solution"].replace(p["answer"] + "}", "0}")} for p in PROBLEMS]
    make = lambda: dpo_batches(records, TOK, "plain", seq_len=96, batch_size=4, seed=5,  # noqa: E731
                               shard_index=0, shard_count=1)
    first = next(make())
    assert set(first) == {f"{side}_{k}" for side in ("chosen", "rejected")
                          for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    for r in range(4):
        chosen, rejected = (TOK.decode(first[f"{s}_tokens"][r][first[f"{s}_segment_ids"][r] > 0])
                            for s in ("chosen", "rejected"))
        assert chosen.split("\n")[0] == rejected.split("\n")[0]  # same prompt in the same row
    _check_resume(make, 5, 10)


@pytest.mark.slow
def test_resume_with_worker_processes():
    make = lambda: _sft(packed=True, num_epochs=None, seq_len=64, workers=2)  # noqa: E731
    _check_resume(make, 5, 8)
