"""Pieces shared by the HF and Orbax checkpoint code: the error type, atomic output directories,
size parsing and dtype names."""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import sys
import uuid
from typing import Iterator, Optional

import ml_dtypes
import numpy as np

from ..errors import UsageError
from ..host_allocator import libc_function
from ..sharding import processes


class CheckpointError(UsageError):
    """A checkpoint that cannot be read or written; the message names the file / tensor / key."""


DTYPE_NAMES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float16": np.dtype(np.float16)}


def resolve_dtype(dtype) -> Optional[np.dtype]:
    """None stays None (keep the stored dtype); names and numpy/jax dtypes become np.dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"dtype {dtype!r} not supported; choose one of "
                                  f"{sorted(DTYPE_NAMES)}")
        return DTYPE_NAMES[dtype]
    return np.dtype(dtype)


def dtype_name(dtype) -> str:
    d = np.dtype(dtype)
    for name, known in DTYPE_NAMES.items():
        if d == known:
            return name
    raise CheckpointError(f"dtype {d} not supported; choose one of {sorted(DTYPE_NAMES)}")


def release_freed_memory() -> None:
    """Hand memory that has been freed but kept by the C allocator back to the OS.

    TensorStore (under Orbax) stages each array it writes or reads in many small heap blocks;
    glibc keeps those arenas after they are freed, so without this the process's RSS after
    each leaf carries up to one more leaf of dead memory into the next. No-op off glibc.
    """
    malloc_trim = libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """'5GB' -> 5e9, '500MB' -> 5e8, '2GiB' -> 2**31, 1234 -> 1234 (decimal units, as HF)."""
    if isinstance(size, (int, np.integer)):
        n = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise CheckpointError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise CheckpointError(f"size must be positive, got {size!r}")
    return n


@contextlib.contextmanager
def atomic_output_dir(out, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temp dir beside `out`; on success rename it to `out`, on error delete it.

    The existence check happens before any work so that a refused run writes nothing. With
    `overwrite`, the old `out` is moved aside and deleted only after the new one is in place.
    Under several processes (a collective Orbax save) every process gets the same temp dir;
    process 0 creates it and publishes it once all have written their part.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not overwrite:
        raise CheckpointError(f"{out}: output already exists (pass overwrite=True / --overwrite "
                              "to replace it)")
    parent = os.path.dirname(out)
    lead = processes.is_lead()
    tag = processes.agree(f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{tag}")
    if lead:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(out)
        os.mkdir(tmp)
    processes.barrier(f"atomic_output_dir:start:{tag}")
    try:
        yield tmp
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    processes.barrier(f"atomic_output_dir:written:{tag}")
    if lead:
        _publish(tmp, out, parent, tag)
    processes.barrier(f"atomic_output_dir:published:{tag}")


def remove_stale_temps(out: str) -> list:
    """Delete the temp / set-aside dirs that killed runs left beside `out` (`.<name>.tmp-<host>-
    <pid>-<id>`, as large as the output): those of this host whose process is gone. Others (another
    host's, or a pid that is alive again) are left and named on stderr. Returns what was removed."""
    parent, name = os.path.split(os.path.abspath(out))
    removed = []
    for entry in glob.glob(os.path.join(parent, glob.escape(f".{name}") + ".*-*")):
        kind, _, tag = os.path.basename(entry)[len(name) + 2:].partition("-")
        if kind not in ("tmp", "old"):
            continue
        host, pid = _tag_owner(tag)
        if host in (None, socket.gethostname()) and pid is not None and not _alive(pid):
            if os.path.isdir(entry):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.unlink(entry)
            removed.append(entry)
        else:
            print(f"warning: {entry} is left from a run of pid {pid} on {host or 'this host'} "
                  "that may still be writing; delete it if that run is gone", file=sys.stderr)
    return removed


def _tag_owner(tag: str):
    """(host, pid) from `<host>-<pid>-<id>` (host None for the older `<pid>-<id>`)."""
    parts = tag.rsplit("-", 2)
    host = parts[0] if len(parts) == 3 else None
    pid = parts[-2] if len(parts) >= 2 else ""
    return host, int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _publish(tmp: str, out: str, parent: str, tag: str) -> None:
    _fsync_tree(tmp)  # the data is on disk before the name says the output is complete
    old = None
    if os.path.lexists(out):
        old = os.path.join(parent, f".{os.path.basename(out)}.old-{tag}")
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync_path(parent)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.unlink(old)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """fsync every file and directory under `root`. Our writers leave durability to this one
    pass (TensorStore's per-file sync is off during Orbax saves; safetensors shards, JSON and
    copied tokenizer files are plain writes)."""
    for d, _, files in os.walk(root):
        for f in files:
            if not os.path.islink(os.path.join(d, f)):
                _fsync_path(os.path.join(d, f))
        _fsync_path(d)
