"""grain input pipelines for SFT (packed or padded), DPO pairs and RL prompts.

    records -> shuffle(seed) -> repeat(epochs) -> this host's shard -> tokenize -> [per worker:]
    length policy -> first-fit packing / padded rows -> batch

Every stage is a grain `MapDataset`/`IterDataset`, so the iterator state is a small dict that goes
into training checkpoints (`BatchIterator.get_state()` / `set_state()`), and a restored pipeline
yields exactly the batches the uninterrupted one would have. Shuffling is grain's index shuffle
(a different permutation per epoch), so no buffer is involved.

Batches are dicts of int32 numpy arrays [rows, seq_len] (see packing.py); `batch_size` is the
global batch and each of `shard_count` hosts gets `batch_size // shard_count` rows. Length-policy
events (examples truncated or dropped) are counted per batch inside the workers and summed by
`BatchIterator.stats`, so the counts are exact with any number of workers and across resumes.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import grain
import numpy as np

from .chat import render_completion, render_conversation, render_prompt
from .global_stream import GLOBAL_INDEX
from .packing import FirstFitBins, apply_length_policy, pad_rows

STAT_PREFIX = "stat_"
STAT_NAMES = ("examples", "truncated", "dropped")


# ------------------------------------------------------------------------------ record -> example
@dataclasses.dataclass
class SFTExample:
    """{"messages"} -> {"tokens", "loss_mask"} int32 arrays."""
    tokenizer: object
    fmt: str

    def __call__(self, record):
        ids, mask = render_conversation(record["messages"], self.tokenizer, self.fmt)
        return {"tokens": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}


@dataclasses.dataclass
class DPOExample:
    """{"prompt", "chosen", "rejected"} -> chosen_/rejected_ tokens and loss_mask arrays."""
    tokenizer: object
    fmt: str

    def __call__(self, record):
        prompt = render_prompt(record["prompt"], self.tokenizer, self.fmt)
        out = {}
        for side in ("chosen", "rejected"):
            ids, mask = render_completion(prompt, record[side], self.tokenizer, self.fmt)
            out[f"{side}_tokens"] = np.asarray(ids, np.int32)
            out[f"{side}_loss_mask"] = np.asarray(mask, np.int32)
        return out


# ------------------------------------------------------------------------------ batch assembly
class PackedRows:
    """First-fit packing into `rows` x `seq_len`; a batch is complete when an example fits no
    row."""

    def __init__(self, rows, seq_len, pad_id):
        self.rows, self.seq_len, self.pad_id = rows, seq_len, pad_id

    def start(self):
        return FirstFitBins(self.rows, self.seq_len, self.pad_id)

    def add(self, acc, example) -> bool:
        return acc.add(example)

    def full(self, acc) -> bool:
        return False

    def finish(self, acc):
        return acc.batch


class PaddedRows:
    """One example per row padded to `seq_len`; `sides` ("chosen", "rejected") pads each side of a
    preference pair into its own prefixed set of arrays."""

    def __init__(self, rows, seq_len, pad_id, sides=None):
        self.rows, self.seq_len, self.pad_id, self.sides = rows, seq_len, pad_id, sides

    def start(self):
        return []

    def add(self, acc, example) -> bool:
        acc.append(example)
        return True

    def full(self, acc) -> bool:
        return len(acc) == self.rows

    def finish(self, acc):
        if self.sides is None:
            return pad_rows(acc, self.rows, self.seq_len, self.pad_id)
        batch = {}
        for side in self.sides:
            examples = [{"tokens": e[f"{side}_tokens"], "loss_mask": e[f"{side}_loss_mask"]}
                        for e in acc]
            for k, v in pad_rows(examples, self.rows, self.seq_len, self.pad_id).items():
                batch[f"{side}_{k}"] = v
        return batch


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, parent, seq_len, policy, drop_remainder):
        super().__init__(parent)
        self._seq_len, self._policy, self._drop_remainder = seq_len, policy, drop_remainder
        # An example read but not placed (it fit no row of the previous packed batch), with its
        # length-policy event and the parent state from just before it was read.
        self._pending = None

    def _read(self):
        """(example or None if dropped, event, parent state before reading) or None at the end."""
        before = self._parent.get_state()
        try:
            example = next(self._parent)
        except StopIteration:
            return None
        example, event = apply_length_policy(example, self._seq_len, self._policy.length_policy)
        return example, event, before

    def __next__(self):
        strategy = self._policy.strategy
        acc = strategy.start()
        stats = collections.Counter()
        placed, exhausted = 0, False
        while not strategy.full(acc):
            if self._pending is not None:
                item, self._pending = self._pending, None
            else:
                item = self._read()
                if item is None:
                    exhausted = True
                    break
            example, event, _ = item
            if example is not None and not strategy.add(acc, example):
                self._pending = item  # starts the next batch and is counted there
                break
            stats["examples"] += 1
            if event:
                stats[event] += 1
            placed += example is not None
        if placed == 0 or (exhausted and self._drop_remainder):
            raise StopIteration
        batch = strategy.finish(acc)
        for name in STAT_NAMES:
            batch[STAT_PREFIX + name] = np.int64(stats[name])
        return batch

    def get_state(self):
        # With a pending example, resume must re-read it: restore the parent to just before it.
        parent = self._pending[2] if self._pending is not None else self._parent.get_state()
        return {"parent": parent}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending = None


@dataclasses.dataclass
class _Policy:
    strategy: object
    length_policy: str


class BatchIterDataset(grain.IterDataset):
    """Examples -> fixed-shape batches under a length policy (see `_BatchIterator`)."""

    def __init__(self, parent, strategy, seq_len, length_policy="truncate", drop_remainder=False):
        super().__init__(parent)
        if length_policy not in ("truncate", "drop"):
            raise ValueError(f"length_policy must be 'truncate' or 'drop', got {length_policy!r}")
        self._policy = _Policy(strategy, length_policy)
        self._seq_len = seq_len
        self._drop_remainder = drop_remainder

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), self._seq_len, self._policy,
                              self._drop_remainder)


# ------------------------------------------------------------------------------ the iterator
class BatchIterator:
    """The pipeline's iterator for training loops: batches without the per-batch stat entries,
    cumulative `stats`, and a checkpointable state {"pipeline": grain state, "stats": counts}."""

    def __init__(self, dataset: grain.IterDataset, global_positions: bool = False):
        self._iterator = iter(dataset)
        self.stats = collections.Counter({name: 0 for name in STAT_NAMES})
        self.global_positions = global_positions  # positions are global stream indices

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._iterator)
        for key in [k for k in batch if k.startswith(STAT_PREFIX)]:
            self.stats[key[len(STAT_PREFIX):]] += int(batch.pop(key))
        return batch

    def get_state(self) -> dict:
        return {"pipeline": self._iterator.get_state(), "stats": dict(self.stats)}

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state["pipeline"])
        self.stats = collections.Counter(state["stats"])

    def remap_positions(self, saved: list, count: int, index: int) -> Optional[dict]:
        """This iterator's position (process `index` of `count`) from the positions `saved` by
        another process count, or None where they fix no global stream position.

        A global stream position: the global batches' index (`global_stream.py`), or a single
        host's position (its stream is the global one), or, from hosts that each read their own
        shard (host h: elements h, h + n, ...), k n when every host had read the same number k
        of its shard (one example per row, none dropped; packed rows and dropped examples read a
        different number per host). Cumulative stats: the global ones on every host of a global
        iterator, else on process 0."""
        parents = [s["pipeline"]["parent"] for s in saved]
        if all(set(p) == {GLOBAL_INDEX} for p in parents) and all(s == saved[0] for s in saved):
            position, totals = parents[0][GLOBAL_INDEX], collections.Counter(saved[0]["stats"])
        elif all(set(p) == {"next_index"} for p in parents) and len(
                {p["next_index"] for p in parents}) == 1:
            position = parents[0]["next_index"] * len(saved)
            totals = collections.Counter()
            for s in saved:
                totals.update(s["stats"])
        else:
            return None
        if self.global_positions:
            return {"pipeline": {"parent": {GLOBAL_INDEX: position}}, "stats": dict(totals)}
        if position % count:
            return None
        stats = dict(totals) if index == 0 else {k: 0 for k in totals}
        return {"pipeline": {"parent": {"next_index": position // count}}, "stats": stats}

    def close(self):
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def _local_rows(batch_size, shard_count):
    if batch_size % shard_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by {shard_count} hosts")
    return batch_size // shard_count


def _host_shard(shard_index, shard_count):
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} outside [0, {shard_count})")
    return shard_index, shard_count


def example_dataset(records, to_example, *, seed=0, shuffle=True, num_epochs=None, shard_index=None,
                    shard_count=None) -> grain.MapDataset:
    """records -> shuffled (new permutation each epoch) -> repeated -> this host's shard ->
    examples. Sharding after shuffle and repeat splits the one global stream: host h takes its
    elements h, h + hosts, ... so hosts never see the same element of an epoch."""
    shard_index, shard_count = _host_shard(shard_index, shard_count)
    ds = _global_records(records, seed, shuffle, num_epochs)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    return ds.map(to_example)


def _global_records(records, seed, shuffle, num_epochs) -> grain.MapDataset:
    """The one global stream of records: shuffled (a new permutation each epoch), repeated."""
    records = getattr(records, "records", records)  # a sources.Records, an index or a list
    if len(records) == 0:
        raise ValueError("no records")
    ds = grain.MapDataset.source(records)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


def _global_batches(records, to_example, strategy, *, seed, shuffle, num_epochs, seq_len,
                    length_policy, workers, drop_remainder, shard_index, shard_count, exchange):
    """Batches of the global stream assembled identically on every host (global_stream.py);
    this host keeps rows shard_index * rows / shard_count onward of each."""
    from .global_stream import GlobalStream

    if workers > 0:
        raise ValueError("data.workers > 0 with several processes: examples are exchanged "
                         "between hosts in the training loop's thread; set data.workers=0")
    stream = _global_records(records, seed, shuffle, num_epochs)

    def make_local(start, index, count):
        return iter(stream[start + index::count].map(to_example).to_iter_dataset(INLINE_READ))

    rows = strategy.rows // shard_count
    lo, hi = shard_index * rows, (shard_index + 1) * rows

    def own_rows(batch):
        return {k: v if k.startswith(STAT_PREFIX) else v[lo:hi] for k, v in batch.items()}

    parent = GlobalStream(make_local, exchange, shard_index, shard_count,
                          per_round=-(-strategy.rows // shard_count))
    ds = BatchIterDataset(parent, strategy, seq_len, length_policy, drop_remainder)
    return BatchIterator(ds.map(own_rows), global_positions=True)


def _allow_unparsed_absl_flags():
    """grain 0.2.x's mp_prefetch reads an absl flag that raises UnparsedFlagAccessError in programs
    that do not run under absl.app (google/grain#1355, fixed upstream by #1362); marking the flags
    parsed makes every flag read its default, which is what such programs get anyway."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# Examples are read in the training loop's thread: grain's default read-ahead (16 threads, 500
# buffered elements) polls every buffered future on each read and its threads compete with the
# step for the host's cores (17 ms of an 85 ms CPU step,
# benchmarks/results/trainer_overhead_cpu.md). Reading inline still overlaps the device (steps are
# dispatched asynchronously); pipelines too heavy for that use `workers` (separate processes).
INLINE_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _finish(examples: grain.MapDataset, strategy, seq_len, length_policy, workers, drop_remainder):
    ds = BatchIterDataset(examples.to_iter_dataset(INLINE_READ), strategy, seq_len, length_policy,
                          drop_remainder)
    if workers > 0:
        _allow_unparsed_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return BatchIterator(ds)


def _batches(records, to_example, make_strategy, *, seq_len, batch_size, seed, shuffle, num_epochs,
             length_policy, shard_index, shard_count, workers, drop_remainder, exchange):
    shard_index, shard_count = _host_shard(shard_index, shard_count)
    rows = _local_rows(batch_size, shard_count)
    kw = dict(seed=seed, shuffle=shuffle, num_epochs=num_epochs)
    if exchange is not None and shard_count > 1:
        return _global_batches(records, to_example, make_strategy(batch_size), seq_len=seq_len,
                               length_policy=length_policy, workers=workers,
                               drop_remainder=drop_remainder, shard_index=shard_index,
                               shard_count=shard_count, exchange=exchange, **kw)
    examples = example_dataset(records, to_example, shard_index=shard_index,
                               shard_count=shard_count, **kw)
    return _finish(examples, make_strategy(rows), seq_len, length_policy, workers, drop_remainder)


def sft_batches(records, tokenizer, fmt, *, seq_len, batch_size, packed=True, seed=0, shuffle=True,
                num_epochs=None, length_policy="truncate", shard_index=None, shard_count=None,
                workers=0, drop_remainder=False, exchange=None) -> BatchIterator:
    """SFT batches from chat records ({"messages"}): packed first-fit rows (mid-training) or one
    conversation per padded row (`packed=False`, so the model sees each end-of-turn in place).

    With `exchange` (an all-gather across the `shard_count` hosts) every host assembles the
    global batches and keeps its rows (global_stream.py): the same batches for any host count;
    without it each host assembles its rows from its own share."""
    def strategy(rows):
        return (PackedRows if packed else PaddedRows)(rows, seq_len, tokenizer.pad_id)

    return _batches(records, SFTExample(tokenizer, fmt), strategy, seq_len=seq_len,
                    batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                    length_policy=length_policy, shard_index=shard_index,
                    shard_count=shard_count, workers=workers, drop_remainder=drop_remainder,
                    exchange=exchange)


def dpo_batches(records, tokenizer, fmt, *, seq_len, batch_size, seed=0, shuffle=True,
                num_epochs=None, length_policy="truncate", shard_index=None, shard_count=None,
                workers=0, drop_remainder=False, exchange=None) -> BatchIterator:
    """Preference batches: row i of chosen_* and rejected_* is one pair (prompt + response);
    `exchange` as in `sft_batches`."""
    def strategy(rows):
        return PaddedRows(rows, seq_len, tokenizer.pad_id, sides=("chosen", "rejected"))

    return _batches(records, DPOExample(tokenizer, fmt), strategy, seq_len=seq_len,
                    batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                    length_policy=length_policy, shard_index=shard_index,
                    shard_count=shard_count, workers=workers, drop_remainder=drop_remainder,
                    exchange=exchange)
