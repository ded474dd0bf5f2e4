"""The outcome of grading one (prediction, gold) pair."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GradeResult:
    correct: bool
    extracted: str | None
    status: str          # ok | no_answer | timeout | error (only `ok` can be correct)
    detail: str = ""     # why, for `error`

    def to_dict(self) -> dict:
        return asdict(self)
