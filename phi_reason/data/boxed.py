"""Final-answer extraction from reference solutions: the last balanced ``\\boxed{...}`` (MATH) and
the text after ``####`` (GSM8K). Pure string scanning, no regex over nested braces (a regex such as
``\\boxed{([^}]+)}`` stops at the first ``}`` and breaks on ``\\frac{a}{b}``)."""
from __future__ import annotations

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _balanced_group(text: str, open_index: int) -> tuple[str, int] | None:
    """Contents of the brace group opening at ``text[open_index] == "{"`` and the index after its
    closing brace; None when the braces never balance. Escaped braces ``\\{`` ``\\}`` are content."""
    depth = 0
    i = open_index
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1:i], i + 1
        i += 1
    return None


def _boxed_at(text: str, start: int, command: str) -> str | None:
    """The argument of ``command`` starting at ``start``: ``\\boxed{...}`` (balanced) or the short
    form ``\\boxed 5`` (up to the next ``$`` or whitespace)."""
    i = start + len(command)
    if i < len(text) and text[i] == "{":
        group = _balanced_group(text, i)
        return None if group is None else group[0]
    if i < len(text) and text[i] == " ":
        rest = text[i + 1:]
        end = len(rest)
        for stop in ("$", " ", "\n"):
            k = rest.find(stop)
            if k != -1:
                end = min(end, k)
        return rest[:end] or None
    return None


def last_boxed(text: str) -> str | None:
    """Contents of the last well-formed ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, else None."""
    candidates = []
    for command in _BOX_COMMANDS:
        start = text.rfind(command)
        while start != -1:
            value = _boxed_at(text, start, command)
            if value is not None:
                candidates.append((start, value))
                break
            start = text.rfind(command, 0, start)
    if not candidates:
        return None
    return max(candidates)[1].strip()


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K solution: the text after the last ``####``, thousands commas
    removed (GSM8K writes ``#### 1,000``)."""
    k = text.rfind("####")
    if k == -1:
        return None
    answer = text[k + 4:].strip().replace(",", "")
    return answer or None
