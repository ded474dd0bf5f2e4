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
_NUMBER_RE = re.compile(
    r"(?<![A-Za-z\d.])(?:-?(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+(?![\d.,])|\d+)(?:\.\d+)?"
    r"(?:/\d+)?|-?\.\d+)")
# `2,74` in prose (a comma, then one or two digits, nothing numeric after) is a decimal comma.
_DECIMAL_COMMA_RE = re.compile(r"(?<![\d,.])(-?\d+),(\d{1,2})$")
# Text between two boxes that makes them one multi-part answer: a connector (`,` `;` `&` and or),
# spacing, math delimiters, `\text{..}` and at most a few words (`\boxed{1} papers and
# \boxed{2} bins`, `x_1 = \boxed{a},\ x_2 = \boxed{b}`); a sentence end never joins.
_CONNECTOR_RE = re.compile(r"[,;&]|\b(?:and|or)\b")
_SEPARATOR_NOISE_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mbox)\{([^{}]*)\}|\\q?quad|\\[,;:! ]|\\[()\[\]]|\$|~")
_SENTENCE_END_RE = re.compile(r"[.!?:](?:\s|$)|\n\s*\n")
MAX_JOINED_BOXES = 50


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


def _box_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every balanced, non-empty `\\boxed{..}`/`\\fbox{..}`, in order
    (the unbraced `\\boxed 5` form included).  One pass over the text."""
    found = []
    for m in _BOX_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        found.append((m.start(), i))
    closing = _closing_braces(text, {i for _, i in found if i < len(text) and text[i] == "{"})
    spans = []
    for start, i in found:
        if i >= len(text):
            continue
        if text[i] == "{":
            if i in closing:
                content = text[i + 1:closing[i]].strip()
                if content:
                    spans.append((start, closing[i] + 1, content))
            continue
        j = i
        while j < len(text) and not text[j].isspace() and text[j] != "$":
            j += 1
        if j > i:
            spans.append((start, j, text[i:j]))
    return spans


def _joins(separator: str) -> bool:
    """Does this text between two boxes make them parts of one answer?"""
    if len(separator) > 80 or _SENTENCE_END_RE.search(separator):
        return False
    plain = _SEPARATOR_NOISE_RE.sub(lambda m: " %s " % (m.group(1) or ""), separator)
    if not _CONNECTOR_RE.search(plain) and plain.strip():
        return False
    words = re.findall(r"[A-Za-z]{2,}", _CONNECTOR_RE.sub(" ", plain))
    return len(words) <= 4


def final_boxed(text: str) -> str | None:
    """The answer the boxes at the end of `text` give: the last box, or, when it closes a run of
    boxes joined by connectors (`\\boxed{1}, \\boxed{2} and \\boxed{3}`), their contents as one
    comma-separated list.  An earlier box followed by a sentence is not part of the answer."""
    spans = _box_spans(text)
    if not spans:
        return None
    run = [spans[-1]]
    for prev in reversed(spans[:-1]):
        if len(run) >= MAX_JOINED_BOXES or prev[1] > run[-1][0]:
            break  # a box nested inside the next one is not a separate part
        if not _joins(text[prev[1]:run[-1][0]]):
            break
        run.append(prev)
    return ", ".join(content for _, _, content in reversed(run))


_MATH_DELIM_RE = re.compile(r"\\\$|\$\$|\$|\\\(|\\\)|\\\[|\\\]")
_CLOSE_OF = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}


def last_math_span(text: str) -> tuple[int, str] | None:
    """(end position, content) of the last non-empty `$..$`, `$$..$$`, `\\(..\\)` or `\\[..\\]`
    span.  One left-to-right pass; `\\$` is a dollar sign, not a delimiter."""
    last, open_delim, open_end = None, None, 0
    for m in _MATH_DELIM_RE.finditer(text):
        d = m.group(0)
        if d == "\\$":
            continue
        if open_delim is None:
            if d in _CLOSE_OF:
                open_delim, open_end = d, m.end()
        elif d == _CLOSE_OF[open_delim]:
            content = text[open_end:m.start()].strip()
            if content:
                last = (m.end(), content)
            open_delim = None
    return last


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
    ans = ans.strip()
    sentence = re.search(r"\.(?:\s|$)", ans)  # "12,000,023. I hope it is correct."
    if sentence and "$" not in ans[:sentence.start()]:
        ans = ans[:sentence.start()]
    ans = ans.strip().rstrip(".").strip()
    if ans.startswith("**") and ans.endswith("**"):
        ans = ans[2:-2].strip()
    return ans


def _last_final_answer(text: str):
    """The last "final answer is X" / "#### X" statement: (start, cleaned X), or None.  A
    statement whose X itself holds another statement ("Final Answer: The final answer is 5")
    gives the inner one."""
    for pattern in (_FINAL_ANSWER_RE, _GSM8K_RE):
        found = None
        for found in pattern.finditer(text):
            pass
        if found is None:
            continue
        start, ans = found.start(), found.group("ans")
        for _ in range(4):
            inner = pattern.search(ans)
            if inner is None:
                break
            ans = inner.group("ans")
        ans = _clean_inline(_statement_value(ans))
        if ans:
            return start, ans
    return None


_PROSE_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")


def _statement_value(ans: str) -> str:
    """The value a final-answer sentence states: "The volume of $V$ is 120." -> "120"; "Jane
    started 3 hours ago" -> "3" (its only number); a plain answer is returned unchanged."""
    line = ans.split(". ", 1)[0]
    outside = re.sub(r"\$[^$]*\$|\\text\{[^{}]*\}", " ", line)
    if len(_PROSE_WORD_RE.findall(outside)) < 2:
        return ans
    stated = None
    for stated in re.finditer(r"\s(?:is|are|equals|=)\s+(?P<x>.+)$", line):
        pass
    if stated is not None:
        return stated.group("x")
    numbers = _NUMBER_RE.findall(outside)
    return numbers[0] if len(numbers) == 1 and "$" not in line else ans


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


def _last_number_end(text: str):
    for window in (2048, len(text)):
        start = max(0, len(text) - window)
        last = None
        for last in _NUMBER_RE.finditer(text, start):
            pass
        if last is not None and (last.start() > start or start == 0):
            comma = _DECIMAL_COMMA_RE.search(text, max(0, last.start() - 64), last.end())
            if comma and not re.match(r"[\d,]", text[last.end():last.end() + 1]):
                return last.end(), f"{comma.group(1)}.{comma.group(2)}"
            return last.end(), last.group(0)
        if start == 0:
            break
    return None


def extract_answer(text: str, mode: str = "eval") -> str | None:
    """The final answer a response commits to, or None.

    eval:   the final box (a run of boxes joined by connectors is one list answer), unless a
            "final answer is X" / "#### X" statement comes after it; with neither, whichever of
            the last math span (`$..$`, `\\(..\\)`, ...) and the last bare number comes later.
    reward: only the final box after the last `</think>`; a response whose think block never
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
        return final_boxed(text[cut + len(THINK_CLOSE):])
    spans = _box_spans(text)
    statement = _last_final_answer(text)
    if spans and (statement is None or statement[0] < spans[-1][1]):
        return final_boxed(text)
    if statement is not None:
        return statement[1]
    bare = text.strip()
    if (len(bare) <= 200 and "$" not in bare and "\n" not in bare and "\\" in bare
            and not _PROSE_WORD_RE.search(re.sub(r"\\[a-zA-Z]+(?:\{[^{}]*\})?", " ", bare))):
        return bare  # the whole response is one LaTeX expression (`-\frac{10}{9}`)
    span, number = last_math_span(text), _last_number_end(text)
    if span is not None and (number is None or number[0] <= span[0]):
        return span[1]
    return number[1] if number is not None else None


def gold_answer(gold: str) -> str:
    """The answer inside a gold field: GSM8K `... #### 72` -> `72`; a full solution with a box ->
    its last box; otherwise the field itself."""
    if not isinstance(gold, str):
        gold = str(gold)  # AMC golds are floats in the JSONL (27.0)
    if "####" in gold:
        return gold.rsplit("####", 1)[1].strip().replace(",", "")
    if any(c in gold for c in BOX_COMMANDS):
        boxed = final_boxed(gold)
        if boxed is not None:
            return boxed
        opened = None
        for opened in _BOX_RE.finditer(gold):
            pass
        rest = gold[opened.end():].strip() if opened else ""
        if rest.startswith("{") and matching_brace(rest, 0) is None and rest[1:].strip():
            return rest[1:].strip()  # a gold whose last box was cut off: its remaining text
    if _is_prose(gold):
        found = extract_answer(gold, "eval")
        if found is not None:
            return found
    return gold.strip()


def _is_prose(text: str) -> bool:
    """A worked solution rather than an answer: math spans with sentences around them."""
    if len(text) > 20_000 or ("$" not in text and "\\(" not in text and "\\[" not in text):
        return False
    outside = re.sub(r"\$\$.*?\$\$|\$.*?\$|\\\(.*?\\\)|\\\[.*?\\\]", " ", text, flags=re.S)
    return len(re.findall(r"[A-Za-z]{2,}", outside)) >= 3
