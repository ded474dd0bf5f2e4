"""The processes of one multi-controller run (`jax.distributed`): which one leads, barriers, and
agreeing on a value. With one process (or when JAX was never imported, as in a pure safetensors
conversion) every function is the trivial single-process answer and touches no runtime."""
from __future__ import annotations

import sys

import numpy as np


def _runtime():
    """jax, or None when it was never imported (then this cannot be one of several processes)."""
    return sys.modules.get("jax")


def process_count() -> int:
    jax = _runtime()
    return 1 if jax is None else jax.process_count()


def process_index() -> int:
    jax = _runtime()
    return 0 if jax is None else jax.process_index()


def is_lead() -> bool:
    """Process 0: the one that writes metrics, configs, logs and progress bars, and publishes
    exports."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (`name` must match across processes)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def agree(text: str, max_bytes: int = 256) -> str:
    """Process 0's `text`, returned on every process (e.g. one temp-dir name for a collective
    save)."""
    if process_count() == 1:
        return text
    from jax.experimental import multihost_utils
    raw = text.encode()
    if len(raw) > max_bytes:
        raise ValueError(f"agree: {len(raw)} bytes > {max_bytes}")
    buf = np.zeros(max_bytes + 1, np.uint8)
    buf[0] = len(raw)
    buf[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(got[1:1 + int(got[0])]).decode()


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (e.g. a signal that reached only some)."""
    if process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag]))).any())


def gather_bytes(data: bytes) -> list:
    """Every process's `data`, in process order, on every process (an all-gather)."""
    if process_count() == 1:
        return [data]
    from jax.experimental import multihost_utils
    raw = np.frombuffer(data, np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size]))).reshape(-1)
    buf = np.zeros(max(int(sizes.max()), 1), np.uint8)
    buf[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [bytes(row[:n]) for row, n in zip(rows, sizes)]


def gather_texts(text: str) -> list:
    """Every process's `text`, in process order, on every process."""
    return [b.decode() for b in gather_bytes(text.encode())]


def exchange_objects(obj) -> list:
    """Every process's `obj` (picklable; these are the job's own processes), in process order."""
    import pickle
    return [pickle.loads(b) for b in gather_bytes(pickle.dumps(obj))]
