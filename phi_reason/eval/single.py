"""Grade one pair in the current process: what each sandboxed worker runs.

Call it directly only on trusted input or when you provide your own isolation; `GraderPool` /
`grade` add the killable-process deadline around it.
"""
from __future__ import annotations

from phi_reason.eval.equivalence import answers_equivalent
from phi_reason.eval.extract import extract_answer, gold_answer
from phi_reason.eval.result import GradeResult


def grade_in_process(prediction: str, gold, mode: str = "eval") -> GradeResult:
    try:
        extracted = extract_answer(prediction, mode)
    except (TypeError, ValueError) as e:
        return GradeResult(False, None, "error", f"{type(e).__name__}: {e}")
    if extracted is None:
        return GradeResult(False, None, "no_answer")
    try:
        correct = answers_equivalent(extracted, gold_answer(gold))
    except RecursionError:
        return GradeResult(False, extracted, "error", "expression nested too deeply")
    except Exception as e:  # noqa: BLE001 - a comparison failure is a wrong answer, not a crash
        return GradeResult(False, extracted, "error", f"{type(e).__name__}: {e}")
    return GradeResult(bool(correct), extracted, "ok")
