"""Final-answer extraction from reference solutions: the last balanced ``\\boxed{...}`` (MATH) and
the text after ``####`` (GSM8K). Pure string scanning, no regex over nested braces (a regex such as
``\\boxed{([^}]+)}`` stops at the first ``}`` and breaks on ``\\frac{a}{b}``)."""
from __future__ import annotations

# One implementation of balanced-brace box extraction for the whole package: the grader's
# (linear-time, hardened against adversarial model output).
from ..eval.extract import last_boxed  # noqa: E402,F401  (re-exported for data adapters)


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K solution: the text after the last ``####``, thousands commas
    removed (GSM8K writes ``#### 1,000``)."""
    k = text.rfind("####")
    if k == -1:
        return None
    answer = text[k + 4:].strip().replace(",", "")
    return answer or None
