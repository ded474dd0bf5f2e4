"""`phi-reason grade`: grade a JSONL of {"prediction", "gold", ...} lines in the sandbox."""
from __future__ import annotations

import json
import sys

from phi_reason.eval.pool import GraderPool
from phi_reason.files import atomic_open, read_jsonl


def grade_records(records: list[dict], mode: str = "eval", timeout: float = 5.0,
                  workers: int = 2) -> list[dict]:
    """Each record plus `correct`, `extracted`, `status` (input keys of the same name replaced)."""
    with GraderPool(workers=workers, timeout=timeout) as pool:
        results = pool.grade_many([(r["prediction"], r["gold"]) for r in records], mode)
    return [{**r, "correct": res.correct, "extracted": res.extracted, "status": res.status}
            for r, res in zip(records, results)]


def main(input, output=None, mode="eval", timeout=5.0, workers=2) -> int:
    records = read_jsonl(input, required=("prediction", "gold"))
    for lineno, r in enumerate(records, 1):
        if not isinstance(r["prediction"], str):
            raise ValueError(f"{input}: record {lineno}: 'prediction' must be a string")
    graded = grade_records(records, mode=mode, timeout=timeout, workers=workers)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in graded]
    if output is None:
        sys.stdout.writelines(lines)
    else:
        with atomic_open(output) as f:
            f.writelines(lines)
    correct = sum(r["correct"] for r in graded)
    print(f"graded {len(graded)}: {correct} correct "
          f"({100.0 * correct / max(len(graded), 1):.1f}%)", file=sys.stderr)
    return 0
