"""Step-indexed RL schedules. Each is a pure function of the RL step, so restoring the step from a
checkpoint restores the schedule position exactly."""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class TemperatureSchedule:
    """Sampling temperature annealed from `start` to `end` over the first `anneal_steps` RL steps,
    then held at `end` (Phi-4-mini-reasoning: 1.0 -> 0.6 early in RL). `kind` is "linear" or
    "cosine"; anneal_steps = 0 means a constant `start`."""
    start: float = 1.0
    end: float = 1.0
    anneal_steps: int = 0
    kind: str = "linear"

    def __post_init__(self):
        if self.kind not in ("linear", "cosine"):
            raise ValueError("temperature schedule kind must be 'linear' or 'cosine', "
                             f"got {self.kind!r}")
        if self.anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {self.anneal_steps}")
        if self.start < 0 or self.end < 0:
            raise ValueError(f"temperatures must be >= 0, got start={self.start}, end={self.end}")

    def __call__(self, step: int) -> float:
        if self.anneal_steps == 0:
            return float(self.start)
        frac = min(max(step, 0) / self.anneal_steps, 1.0)
        if self.kind == "cosine":
            frac = 0.5 * (1.0 - math.cos(math.pi * frac))
        return float(self.start + (self.end - self.start) * frac)
