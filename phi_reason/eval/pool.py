"""Sandboxed grading: a pool of killable worker processes with a hard wall-clock deadline per item.

Why processes and not `signal.alarm`: an alarm cannot interrupt one long C call (a big-integer
power inside sympy) and only works in the main thread.  Here each comparison runs in a `pebble`
worker; when it overruns its deadline the worker is killed and replaced and the item is marked
`timeout`.  Submitting works from any thread.

Workers are forked from a clean `forkserver` process (never from the caller, which may hold JAX
threads) that has already imported and warmed the parser, so a replacement starts in
milliseconds and the first item does not pay the import inside its deadline.  As with any
non-fork start method, a script that creates a pool must guard its entry point with
`if __name__ == "__main__":` (workers re-import the main module).  The forkserver starts once per
process, on the first pool, and pays the package import (~5 s) then.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
import signal

import pebble

from phi_reason.eval.result import GradeResult

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_MEMORY = 4 << 30  # bytes of address space per worker


def grade_in_worker(prediction: str, gold, mode: str) -> GradeResult:
    """What a worker runs (module-level so it pickles by reference; imports inside so the parent
    never needs sympy)."""
    from phi_reason.eval.single import grade_in_process
    return grade_in_process(prediction, gold, mode)


def _init_worker(max_bytes: int | None) -> None:
    # pebble installs a Python SIGTERM handler in workers; a handler cannot run while the worker
    # is inside one long C call, so pebble would wait 3 s more before SIGKILL.  The default
    # action makes the deadline hard.  (pebble stops a worker only while holding the channel
    # lock, so an abrupt exit never strands the lock.)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if max_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


def _context():
    ctx = multiprocessing.get_context("forkserver")
    # Preloading only takes effect when the forkserver is first started in this process.
    ctx.set_forkserver_preload(["phi_reason.eval.warm"])
    return ctx


class GraderPool:
    """Reusable pool of grading workers.

        with GraderPool(workers=4, timeout=5.0) as pool:
            results = pool.grade_many([(prediction, gold), ...], mode="reward")

    `grade_fn(prediction, gold, mode) -> GradeResult` is what each worker runs (default:
    extraction + math equivalence); it must be importable by name from a fresh process.
    Everything, extraction included, runs inside the worker under the deadline.
    """

    def __init__(self, workers: int = 2, timeout: float = DEFAULT_TIMEOUT,
                 grade_fn=grade_in_worker, max_memory: int | None = DEFAULT_MAX_MEMORY):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.workers = workers
        self.timeout = float(timeout)
        self._grade_fn = grade_fn
        self._pool = pebble.ProcessPool(max_workers=workers, context=_context(),
                                        initializer=_init_worker, initargs=(max_memory,))

    # -- lifecycle
    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join(timeout=10)
            self._pool = None

    def __enter__(self) -> "GraderPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; prefer `with` or close()
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- grading
    def submit(self, prediction: str, gold, mode: str = "eval") -> concurrent.futures.Future:
        """Future of the GradeResult; resolves to status `timeout` when the deadline passes."""
        if self._pool is None:
            raise RuntimeError("GraderPool is closed")
        if mode not in ("eval", "reward"):
            raise ValueError(f"mode must be 'eval' or 'reward', got {mode!r}")
        out: concurrent.futures.Future = concurrent.futures.Future()
        task = self._pool.schedule(self._grade_fn, args=(prediction, gold, mode),
                                   timeout=self.timeout)
        task.add_done_callback(lambda f: out.set_result(_to_result(f)))
        return out

    def grade_many(self, pairs, mode: str = "eval") -> list[GradeResult]:
        futures = [self.submit(prediction, gold, mode) for prediction, gold in pairs]
        return [f.result() for f in futures]

    def grade(self, prediction: str, gold, mode: str = "eval") -> GradeResult:
        return self.submit(prediction, gold, mode).result()


def _to_result(task: concurrent.futures.Future) -> GradeResult:
    try:
        return task.result()
    except concurrent.futures.TimeoutError:
        return GradeResult(False, None, "timeout")
    except pebble.ProcessExpired as e:  # the worker died (e.g. hit its memory limit)
        return GradeResult(False, None, "error", f"worker died: {e}")
    except concurrent.futures.CancelledError:
        return GradeResult(False, None, "error", "cancelled")
    except Exception as e:  # noqa: BLE001 - anything raised inside the worker
        return GradeResult(False, None, "error", f"{type(e).__name__}: {e}")
