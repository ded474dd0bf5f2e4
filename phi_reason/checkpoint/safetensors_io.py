"""Streaming safetensors access with bounded memory.

Reading: `safetensors.safe_open` validates each file (header JSON, dtypes, offsets covering the
file exactly: a truncated or corrupt file fails here, before anything is written). Tensor bytes
are then read with `os.preadv` straight into the destination buffer. We do not read through
safe_open's memory map on purpose: every mapped page touched stays in the process's resident set
until the file is closed, which would count the whole checkpoint against peak RSS.

Writing: the header (names, dtypes, shapes, offsets) is known before any data exists, so a file is
created at its final size and filled piece by piece with `os.pwrite` (a layer of a fused tensor at a
time); `close` checks that every byte was written exactly once.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterable, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from .common import CheckpointError

ST_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
             "F32": np.dtype(np.float32), "F64": np.dtype(np.float64)}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def st_dtype_name(dtype) -> str:
    d = np.dtype(dtype)
    if d not in _ST_NAMES:
        raise CheckpointError(f"dtype {d} cannot be written to safetensors here "
                              f"(supported: {sorted(_ST_NAMES.values())})")
    return _ST_NAMES[d]


class TensorEntry:
    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name, dtype, shape, begin, end):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end


class SafetensorsFile:
    """An opened, validated safetensors file: header entries plus positional reads."""

    def __init__(self, path: str):
        self.path = path
        try:
            with safe_open(path, framework="numpy") as f:
                names = set(f.keys())
                self.metadata = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        except Exception as e:  # the Rust side raises other types for some malformed headers
            raise CheckpointError(f"{path}: not a readable safetensors file "
                                  f"({type(e).__name__}: {e})") from None
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.data_start = 8 + n
        self.entries: Dict[str, TensorEntry] = {}
        for name, h in header.items():
            if name == "__metadata__":
                continue
            if h["dtype"] not in ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has dtype {h['dtype']}; expected one "
                                      f"of {sorted(ST_DTYPES)}")
            begin, end = h["data_offsets"]
            self.entries[name] = TensorEntry(name, ST_DTYPES[h["dtype"]], tuple(h["shape"]),
                                             begin, end)
        assert set(self.entries) == names, "our header parse disagrees with safetensors"
        self._fd: Optional[int] = None

    def read_rows(self, name: str, start: int, stop: int,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows [start, stop) of tensor `name` (first axis), read without mapping the file;
        into `out` when given (C-contiguous, the stored dtype, the rows' shape)."""
        e = self.entries[name]
        row_elems = int(np.prod(e.shape[1:])) if len(e.shape) > 1 else 1
        if len(e.shape) == 0:
            start, stop = 0, 1
        shape = (stop - start,) + tuple(e.shape[1:])
        if out is None:
            out = np.empty(shape, e.dtype)
        elif out.shape != shape or out.dtype != e.dtype or not out.flags.c_contiguous:
            raise ValueError(f"read_rows({name}): destination {out.shape} {out.dtype} is not a "
                             f"contiguous {shape} {e.dtype} buffer")
        offset = self.data_start + e.begin + start * row_elems * e.dtype.itemsize
        _pread_into(self._fileno(), memoryview(out.reshape(-1).view(np.uint8)), offset,
                    self.path, name)
        return out

    def read(self, name: str) -> np.ndarray:
        e = self.entries[name]
        return self.read_rows(name, 0, e.shape[0] if e.shape else 1).reshape(e.shape)

    def _fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pread_into(fd: int, buf: memoryview, offset: int, path: str, name: str):
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path}: file ended while reading tensor {name} (truncated?)")
        done += n


class SafetensorsWriter:
    """Write one safetensors file whose tensor list is fixed up front; data arrives in pieces."""

    def __init__(self, path: str, tensors: Iterable[Tuple[str, np.dtype, Tuple[int, ...]]],
                 metadata: Optional[Mapping[str, str]] = None):
        self.path = path
        header: dict = {"__metadata__": dict(metadata or {})}
        self._layout: Dict[str, Tuple[int, int, np.dtype, Tuple[int, ...]]] = {}
        pos = 0
        for name, dtype, shape in tensors:
            dtype = np.dtype(dtype)
            size = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": st_dtype_name(dtype), "shape": list(shape),
                            "data_offsets": [pos, pos + size]}
            self._layout[name] = (pos, size, dtype, tuple(shape))
            pos += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
        self.data_start = 8 + len(blob)
        self.nbytes = pos
        self._written = {name: 0 for name in self._layout}
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(blob)) + blob, 0)
        os.ftruncate(self._fd, self.data_start + pos)

    def write(self, name: str, row_start: int, block: np.ndarray):
        """Write `block` as rows [row_start, row_start + len(block)) of tensor `name`."""
        begin, size, dtype, shape = self._layout[name]
        if block.dtype != dtype:
            raise CheckpointError(f"{self.path}: tensor {name} expects {dtype}, got {block.dtype}")
        row_bytes = (int(np.prod(shape[1:])) if len(shape) > 1 else 1) * dtype.itemsize
        data = memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
        offset = begin + row_start * row_bytes
        if offset + len(data) > begin + size or block.shape[1:] != shape[1:]:
            raise CheckpointError(f"{self.path}: block {block.shape} at row {row_start} does not "
                                  f"fit tensor {name} {shape}")
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], self.data_start + offset + done)
        self._written[name] += len(data)

    def abort(self):
        """Close without the completeness check (the caller is discarding the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self):
        self.abort()
        missing = {n: (w, self._layout[n][1]) for n, w in self._written.items()
                   if w != self._layout[n][1]}
        if missing:
            raise CheckpointError(f"{self.path}: tensors not fully written "
                                  f"(bytes written, expected): {missing}")
