"""The global example stream on every host of a multi-host run, each host reading only its share.

Host h of n reads (and tokenizes) the global stream's elements h, h + n, ... Batches are then
assembled from the *global* stream, identically on every host, by the same packer a single host
runs, and each host keeps its rows. So the global batch and its order are the same whatever the
process count, and the stream position (the global index of the next element) is one number that
resumes on any process count.

To see the other hosts' examples, hosts exchange them in rounds: each contributes its next
`per_round` examples and `exchange(mine) -> [host 0's, host 1's, ...]` (an all-gather; supplied by
the job layer) returns every host's; host p's j-th example of a round starting at global index b
is element b + p + n j. A round moves the tokens of about a batch: a few bytes per token, small
next to a train step. The exchange is a collective, so every host must read the same number of
batches (the trainer's lockstep steps do).
"""
from __future__ import annotations

import collections
from typing import Callable, Iterator, List

import grain

GLOBAL_INDEX = "global_index"  # the state key: positions in the global stream, any host count


class GlobalExamples(grain.DatasetIterator):
    """Examples of the global stream in global order, from `make_local(start, index, count)` (an
    iterator over elements start + index, start + index + count, ...) and `exchange`."""

    def __init__(self, make_local: Callable[[int, int, int], Iterator], exchange: Callable,
                 index: int, count: int, per_round: int):
        super().__init__()
        self._make_local, self._exchange = make_local, exchange
        self._index, self._count, self._per_round = index, count, max(1, per_round)
        self._reset(0)

    def _reset(self, start: int) -> None:
        self._local = self._make_local(start, self._index, self._count)
        self._base = start  # global index of the next round's first element
        self._next = start  # global index of the next element returned
        self._buffer: collections.deque = collections.deque()
        self._exhausted = False

    def _round(self) -> None:
        mine: List = []
        for _ in range(self._per_round):
            try:
                mine.append(next(self._local))
            except StopIteration:
                break
        parts = self._exchange(mine)
        if len(parts) != self._count:
            raise RuntimeError(f"exchange returned {len(parts)} parts for {self._count} hosts")
        got = sorted((self._base + p + self._count * j, ex)
                     for p, part in enumerate(parts) for j, ex in enumerate(part))
        if not got:
            self._exhausted = True  # every host's share is exhausted (a finite stream)
        self._buffer.extend(got)
        self._base += self._count * self._per_round

    def __next__(self):
        while not self._buffer:
            if self._exhausted:
                raise StopIteration
            self._round()
        index, example = self._buffer.popleft()
        self._next = index + 1
        return example

    def get_state(self) -> dict:
        return {GLOBAL_INDEX: self._next}

    def set_state(self, state: dict) -> None:
        self._reset(int(state[GLOBAL_INDEX]))


class GlobalStream(grain.IterDataset):
    """An IterDataset over `GlobalExamples` (the parent of the batch assembly)."""

    def __init__(self, make_local, exchange, index: int, count: int, per_round: int):
        super().__init__()
        self._args = (make_local, exchange, index, count, per_round)

    def __iter__(self):
        return GlobalExamples(*self._args)
