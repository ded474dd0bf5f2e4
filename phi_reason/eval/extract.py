"""Answer extraction: find the final answer inside a model response or a gold field.

Pure string scanning (no regex backtracking over the whole text, no parsing of maths), so it is
safe and linear-time on megabyte-long responses and arbitrarily deep braces.
"""
from __future__ import annotations

import re

BOX_COMMANDS = ("\\boxed", "\\fbox")
THINK_CLOSE = "</think>"

_FINAL_ANSWER_RE = re.compile(
    r"(?:final answer|the answer)\b\s*(?:is\b|:|=)\s*:?\s*(?P<ans>[^\n]{1,400})", re.IGNORECASE)
_GSM8K_RE = re.compile(r"####\s*(?P<ans>[^\n]{1,200})")
# A number: optional sign, digits with optional thousands separators, optional decimals or a
# simple fraction.  Bounded repetition keeps this linear.
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def matching_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at `open_index` (escaped braces `\\{` `\\}` skipped), or
    None when the text ends first (a truncated response)."""
    depth = 0
    i, n = open_index, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # `\{`, `\}` and `\\` never open or close a group
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_BRACE_TOKEN_RE = re.compile(r"\\\\|\\[{}]|[{}]")  # `\\`, escaped braces, braces


def _closing_braces(text: str, wanted: set[int]) -> dict[int, int]:
    """For each `{` position in `wanted`, the position of its closing `}` (absent when the text
    ends first).  One pass with a stack, so many unbalanced boxes cost O(len(text)), not O(n^2)."""
    found, stack = {}, []
    for m in _BRACE_TOKEN_RE.finditer(text):
        c = m.group(0)
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            start = stack.pop()
            if start in wanted:
                found[start] = m.start()
    return found


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def _box_starts(text: str) -> list[int]:
    """Index just after every box command, last first."""
    return [m.end() for m in _BOX_RE.finditer(text)][::-1]


def last_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` / `\\fbox{...}` (nested braces kept)."""
    starts = []
    for end in _box_starts(text):
        i = end
        while i < len(text) and text[i] == " ":
            i += 1
        starts.append(i)
    closing = _closing_braces(text, {i for i in starts if i < len(text) and text[i] == "{"})
    for i in starts:
        if i >= len(text):
            continue
        if text[i] == "{":
            if i in closing:
                content = text[i + 1:closing[i]].strip()
                if content:
                    return content
            continue
        # `\\boxed 5` form: one token up to whitespace or `$`.
        j = i
        while j < len(text) and not text[j].isspace() and text[j] != "$":
            j += 1
        if j > i:
            return text[i:j]
    return None


def _clean_inline(ans: str) -> str:
    """Strip math delimiters and trailing punctuation from a free-text answer phrase."""
    ans = ans.strip()
    if "$" in ans:
        parts = ans.split("$")
        # "$5$." -> the first delimited span; "5 $ cm" style stays whole.
        if len(parts) >= 3 and parts[1].strip():
            ans = parts[1]
    for wrap in (("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(wrap[0]) and wrap[1] in ans:
            ans = ans[len(wrap[0]):ans.index(wrap[1])]
    ans = ans.strip().rstrip(".").strip()
    if ans.startswith("**") and ans.endswith("**"):
        ans = ans[2:-2].strip()
    return ans


def last_number(text: str) -> str | None:
    """The last number written in `text` (thousands separators and a trailing period dropped).
    Searches a tail window first so a megabyte response costs no more than a short one."""
    for window in (2048, len(text)):
        start = max(0, len(text) - window)
        last = None
        for last in _NUMBER_RE.finditer(text, start):
            pass
        if last is not None and (last.start() > start or start == 0):
            return last.group(0)
        if start == 0:
            break
    return None


def extract_answer(text: str, mode: str = "eval") -> str | None:
    """The final answer a response commits to, or None.

    eval:   last balanced \\boxed{}/\\fbox{}; else "final answer is X" / "#### X"; else last number.
    reward: only the last \\boxed{} after the last `</think>`; a response whose think block never
            closes has no answer (the policy must finish thinking to earn reward).
    """
    if mode not in ("eval", "reward"):
        raise ValueError(f"mode must be 'eval' or 'reward', got {mode!r}")
    if not isinstance(text, str):
        raise TypeError(f"prediction must be a string, got {type(text).__name__}")
    if mode == "reward":
        cut = text.rfind(THINK_CLOSE)
        if cut == -1:
            return None
        return last_boxed(text[cut + len(THINK_CLOSE):])
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_FINAL_ANSWER_RE, _GSM8K_RE):
        found = None
        for found in pattern.finditer(text):
            pass
        if found is not None:
            ans = _clean_inline(found.group("ans"))
            if ans:
                return ans
    return last_number(text)


def gold_answer(gold: str) -> str:
    """The answer inside a gold field: GSM8K `... #### 72` -> `72`; a full solution with a box ->
    its last box; otherwise the field itself."""
    if not isinstance(gold, str):
        gold = str(gold)  # AMC golds are floats in the JSONL (27.0)
    if "####" in gold:
        return gold.rsplit("####", 1)[1].strip().replace(",", "")
    if any(c in gold for c in BOX_COMMANDS):
        boxed = last_boxed(gold)
        if boxed is not None:
            return boxed
    return gold.strip()
