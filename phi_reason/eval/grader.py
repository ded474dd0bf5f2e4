"""Public grading API: `grade`, `grade_many`, `GraderPool`, `extract_answer`, `GradeResult`.

Every comparison runs in a sandboxed worker process with a hard deadline (see `pool.py`).
One-off calls share a lazily started process-wide pool per (workers, timeout); long-running
callers (the RL loop) should hold their own `GraderPool`.
"""
from __future__ import annotations

import atexit
import threading

from phi_reason.eval.extract import extract_answer, gold_answer
from phi_reason.eval.pool import DEFAULT_TIMEOUT, GraderPool
from phi_reason.eval.result import GradeResult

__all__ = ["GradeResult", "GraderPool", "extract_answer", "gold_answer", "grade", "grade_many"]

_shared_pools: dict[tuple[int, float], GraderPool] = {}
_shared_lock = threading.Lock()


def _shared_pool(workers: int, timeout: float) -> GraderPool:
    key = (int(workers), float(timeout))
    with _shared_lock:
        pool = _shared_pools.get(key)
        if pool is None:
            pool = _shared_pools[key] = GraderPool(workers=workers, timeout=timeout)
        return pool


@atexit.register
def _close_shared_pools() -> None:
    with _shared_lock:
        for pool in _shared_pools.values():
            pool.close()
        _shared_pools.clear()


def grade(prediction: str, gold, mode: str = "eval", timeout: float = DEFAULT_TIMEOUT
          ) -> GradeResult:
    """Grade one prediction against a gold answer (`mode`: "eval" or "reward")."""
    return _shared_pool(1, timeout).grade(prediction, gold, mode)


def grade_many(pairs, mode: str = "eval", timeout: float = DEFAULT_TIMEOUT, workers: int = 2
               ) -> list[GradeResult]:
    """Grade (prediction, gold) pairs in parallel; results in input order."""
    return _shared_pool(workers, timeout).grade_many(list(pairs), mode)
