"""Wall time per named phase of a step (the RL loop's breakdown: sampling, waiting for the grader,
log-prob passes, updates). Each phase ends with its results on the host (the sampler returns host
arrays, the passes and the step's metrics are read back), so JAX's asynchronous dispatch does not
move time from one phase into the next."""
from __future__ import annotations

import contextlib
import time
from typing import Dict


class PhaseTimer:
    def __init__(self):
        self.totals: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def take(self) -> Dict[str, float]:
        """`time/<phase>_s` for every phase since the last take, and reset."""
        out = {f"time/{k}_s": v for k, v in self.totals.items()}
        self.totals = {}
        return out
