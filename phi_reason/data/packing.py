"""Fixed-shape batches from variable-length examples: first-fit packing and padded rows.

Pure numpy; no I/O. An example is {"tokens": int array [L], "loss_mask": int array [L]}. A batch is
{"tokens", "positions", "segment_ids", "loss_mask"}, each int32 [rows, seq_len]:
  - a row holds whole examples one after another (never split across rows);
  - segment_ids are 1..n in placement order within a row, 0 on padding;
  - positions restart at 0 for every segment, 0 on padding;
  - loss_mask is the example's own mask (0 on padding); tokens are pad_id on padding.
"""
from __future__ import annotations

import numpy as np

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def empty_batch(rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    batch = {k: np.zeros((rows, seq_len), np.int32) for k in BATCH_KEYS}
    batch["tokens"].fill(pad_id)
    return batch


class FirstFitBins:
    """`rows` bins of `seq_len` tokens, filled online: an example goes into the first row with room
    for all of it. `add` returns False (and changes nothing) when no row has room, which is when the
    caller emits `batch` and starts a new one with that example."""

    def __init__(self, rows: int, seq_len: int, pad_id: int):
        if rows < 1 or seq_len < 1:
            raise ValueError("rows and seq_len must be positive, "
                             f"got rows={rows} seq_len={seq_len}")
        self.seq_len = seq_len
        self.batch = empty_batch(rows, seq_len, pad_id)
        self.fill = np.zeros(rows, np.int64)       # first free cell per row
        self.segments = np.zeros(rows, np.int32)   # segments placed per row
        self.num_examples = 0

    def add(self, example: dict) -> bool:
        length = len(example["tokens"])
        if length > self.seq_len:
            raise ValueError(f"example of {length} tokens exceeds seq_len {self.seq_len}: "
                             "apply the length policy (truncate or drop) before packing")
        if length == 0:
            raise ValueError("cannot pack an empty example")
        fits = np.flatnonzero(self.fill + length <= self.seq_len)
        if fits.size == 0:
            return False
        row = int(fits[0])
        start, end = int(self.fill[row]), int(self.fill[row]) + length
        self.segments[row] += 1
        self.batch["tokens"][row, start:end] = example["tokens"]
        self.batch["loss_mask"][row, start:end] = example["loss_mask"]
        self.batch["segment_ids"][row, start:end] = self.segments[row]
        self.batch["positions"][row, start:end] = np.arange(length, dtype=np.int32)
        self.fill[row] = end
        self.num_examples += 1
        return True


def pack_first_fit(examples, rows: int, seq_len: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """All `examples` (in order) packed into batches of `rows` rows; the last batch may have empty
    rows."""
    batches = []
    bins = FirstFitBins(rows, seq_len, pad_id)
    for example in examples:
        if not bins.add(example):
            batches.append(bins.batch)
            bins = FirstFitBins(rows, seq_len, pad_id)
            bins.add(example)
    if bins.num_examples:
        batches.append(bins.batch)
    return batches


def pad_rows(examples, rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per row, left-aligned and padded to `seq_len` (unpacked SFT, DPO); rows beyond
    len(examples) are all padding."""
    if len(examples) > rows:
        raise ValueError(f"{len(examples)} examples do not fit {rows} rows")
    batch = empty_batch(rows, seq_len, pad_id)
    for row, example in enumerate(examples):
        length = len(example["tokens"])
        if length > seq_len:
            raise ValueError(f"example of {length} tokens exceeds seq_len {seq_len}")
        batch["tokens"][row, :length] = example["tokens"]
        batch["loss_mask"][row, :length] = example["loss_mask"]
        batch["segment_ids"][row, :length] = 1
        batch["positions"][row, :length] = np.arange(length, dtype=np.int32)
    return batch


def apply_length_policy(example: dict, seq_len: int, policy: str) -> tuple[dict | None, str | None]:
    """(example, event) for an example whose array fields are sequences (other fields ride along):
    unchanged and None when every sequence fits `seq_len`; each sequence cut to `seq_len` and
    "truncated" under "truncate"; None and "dropped" under "drop"."""
    if policy not in ("truncate", "drop"):
        raise ValueError(f"length policy must be 'truncate' or 'drop', got {policy!r}")
    length = max(len(v) for v in example.values() if isinstance(v, np.ndarray))
    if length <= seq_len:
        return example, None
    if policy == "drop":
        return None, "dropped"
    return ({k: v[:seq_len] if isinstance(v, np.ndarray) else v for k, v in example.items()},
            "truncated")
