"""String-level normalisation of an extracted LaTeX answer (pure text rewriting, nothing parsed).

`normalize(s)` returns a `Normalized` with the canonical text plus the presentation flags that
were stripped (percent, degrees), so the comparison can decide how much they matter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from phi_reason.eval.extract import matching_brace

# Spacing commands, but not the second backslash of a `\\` row break (`\\ 3` keeps its break).
_SPACING_RE = re.compile(r"(?<!\\)\\(?:[!,;: ]|q?quad)|~")  # `\quadx`: no other command
_DROP = ("\\left", "\\right", "\\displaystyle", "\\big", "\\Big", "\\bigl", "\\bigr", "\\Bigl",
         "\\Bigr")
_FRAC_ALIASES = ("\\dfrac", "\\tfrac", "\\cfrac")
_TEXT_COMMANDS = ("\\text", "\\textbf", "\\textit", "\\textnormal", "\\textrm", "\\textsf",
                  "\\texttt", "\\mbox", "\\mathrm", "\\mathbf", "\\operatorname")
_STYLE_COMMANDS = ("\\textbf", "\\textit", "\\mathbf", "\\boldsymbol", "\\bm", "\\emph")
_UNIT_COMMANDS = ("\\text", "\\textbf", "\\textit", "\\textnormal", "\\textrm", "\\mbox",
                  "\\mathrm")
# `\\frac` for `\frac`: an answer serialised with doubled backslashes (a row break `\\` is never
# directly followed by one of these command names).
_DOUBLED_COMMAND_RE = re.compile(
    r"(?<!\\)\\\\(?=(?:[dtc]?frac|sqrt|begin|end|pi|cdot|times|text|infty|leq?|geq?|neq|left|right|"
    r"boxed)(?![a-zA-Z]))")
_RELATION_TOKENS = ((re.compile(r"\\leqslant|\\leq|\\le(?![a-zA-Z])|≤"), "<="),
                    (re.compile(r"\\geqslant|\\geq|\\ge(?![a-zA-Z])|≥"), ">="),
                    (re.compile(r"\\neq|\\ne(?![a-zA-Z])|≠"), "!="),
                    (re.compile(r"\\lt(?![a-zA-Z])"), "<"), (re.compile(r"\\gt(?![a-zA-Z])"), ">"))
_PERCENT_WORD_RE = re.compile(r"(?<=\d)\s*(?:\\text\{\s*)?(?:percentage|percent|pct)\s*\}?\s*$")
# `(11,7)or(7,11)`, `1orW(x)`: a connector glued between two answers.
_GLUED_CONNECTOR_RE = re.compile(r"(?<=[)\]}\d])\s*(?:or|and)\s*(?=[(\[{A-Z\\-])")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d+)?")  # 1,000 / 1\,000
_UNIT_WORDS = {
    "degree", "degrees", "cm", "m", "km", "mm", "inch", "inches", "in", "ft", "feet", "foot",
    "yard", "yards", "mile", "miles", "meter", "meters", "cents", "cent", "dollar", "dollars",
    "units", "unit", "sq", "square", "cubic", "hour", "hours", "minute", "minutes", "second",
    "seconds", "day", "days", "week", "weeks", "year", "years", "mph", "kg", "g", "pounds",
    "pound", "lb", "lbs", "ounces", "oz", "liters", "l", "ml", "gallons", "people", "students",
    "ways", "points", "times", "percent",
}
_LEADING_VAR_IN_RE = re.compile(r"^[a-zA-Z]\s*\\in\s*")


@dataclass(frozen=True)
class Normalized:
    text: str
    percent: bool = False
    degrees: bool = False


def _unwrap_command(s: str, command: str) -> str:
    """`\\cmd{X}` -> `X` everywhere (balanced braces)."""
    out, i = [], 0
    while True:
        j = s.find(command + "{", i)
        if j == -1:
            out.append(s[i:])
            return "".join(out)
        end = matching_brace(s, j + len(command))
        if end is None:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        out.append(s[j + len(command) + 1:end])
        i = end + 1


def _brace_arg(s: str, i: int) -> tuple[str, int] | None:
    """Argument of a LaTeX command at s[i:]: `{...}` or one character; returns (arg, next index)."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        end = matching_brace(s, i)
        if end is None:
            return None
        return s[i + 1:end], end + 1
    if s[i] == "\\":
        return None
    return s[i], i + 1


def brace_command_args(s: str, command: str, nargs: int) -> str:
    """Give every argument of `command` explicit braces: `\\frac12` -> `\\frac{1}{2}`."""
    out, i = [], 0
    while True:
        j = s.find(command, i)
        if j == -1:
            out.append(s[i:])
            return "".join(out)
        k = j + len(command)
        if k < len(s) and s[k].isalpha():  # a longer command name
            out.append(s[i:k])
            i = k
            continue
        out.append(s[i:k])
        args = []
        pos = k
        if command == "\\sqrt" and pos < len(s) and s[pos] == "[":
            close = s.find("]", pos)
            if close == -1:
                out.append(s[k:])
                return "".join(out)
            out.append(s[pos:close + 1])
            pos = close + 1
        for _ in range(nargs):
            got = _brace_arg(s, pos)
            if got is None:
                break
            args.append(got[0])
            pos = got[1]
        if len(args) < nargs:
            i = k
            continue
        out.append("".join("{" + a + "}" for a in args))
        i = pos


def _strip_trailing_units(s: str) -> str:
    """Drop a trailing `\\text{ cm}^2`-style unit, keeping an answer that is only text."""
    for command in _UNIT_COMMANDS:
        j = s.rfind(command + "{")
        if j <= 0:
            continue
        end = matching_brace(s, j + len(command))
        if end is None:
            continue
        tail = s[end + 1:].strip()
        if tail and not re.fullmatch(r"\^\s*\{?\s*[23]\s*\}?", tail):
            continue
        head = s[:j].strip()
        if head and re.search(r"[\d}]\s*$|[a-zA-Z]\s*$", head):
            return head
    return s


def _strip_unit_words(s: str) -> str:
    """`5 cm` / `12 inches^2` / `\\frac{1}{3} meters` -> the number (only known unit words, only
    after a number or a closing brace)."""
    m = re.fullmatch(r"(.*?[\d}])(\s*)([a-zA-Z ]+)(\^\s*\{?[23]\}?)?", s)
    if m and all(w.lower() in _UNIT_WORDS for w in m.group(3).split()):
        if not m.group(2) and len(m.group(3).split()[0]) <= 2:
            return s  # `10m` reads as 10 times m; a short unit needs its space (`10 m`)
        return m.group(1).strip()
    return s


def normalize(answer: str) -> Normalized:
    """Canonical text of an extracted answer (see module docstring)."""
    s = answer.strip()
    # math delimiters
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left):len(s) - len(right)].strip()
    s = s.replace("\n", " ")
    s = _DOUBLED_COMMAND_RE.sub(lambda m: "\\", s)
    for command in _STYLE_COMMANDS:  # bold / italic only restyle what they wrap
        s = _unwrap_command(s, command)
    s = re.sub(r"(?<!\\)\\\s*$", "", s)  # a stray trailing backslash (`185\`)
    approx = s.find("\\approx")
    if approx > 0 and s[:approx].strip():
        head = s[:approx].strip()
        # `x = 1/3 \approx 0.33`: the exact value is the answer; `x \approx 11`: 11 is
        s = s[approx + len("\\approx"):] if re.fullmatch(r"[A-Za-z](?:_\w+)?", head) else head
    s = re.sub(r",\\!\s*", ",", s)  # 10,\! 080: LaTeX thousands spacing
    s = _SPACING_RE.sub(" ", s)
    for token in _DROP:
        s = re.sub(re.escape(token) + r"(?![a-zA-Z])", "", s)
    for alias in _FRAC_ALIASES:
        s = s.replace(alias, "\\frac")
    s = re.sub(r"\s*\{\s*,\s*\}\s*", ",", s).replace("\\$", "").replace("$", "")
    percent = "%" in s or bool(_PERCENT_WORD_RE.search(s))
    s = s.replace("\\%", "").replace("%", "")
    s = _PERCENT_WORD_RE.sub("", s)
    s = re.sub(r"\\text\{\s*percent\s*\}", "", s)
    degrees = bool(_DEGREE_RE.search(s))
    s = _DEGREE_RE.sub("", s)
    s = re.sub(r"\\text\{\s*(?:and|or)\s*\}|\s+(?:and|or)\s+", ",", s)  # "1 and 2" lists
    s = _GLUED_CONNECTOR_RE.sub(",", s)
    s = re.sub(r",\s*(?:,\s*)+", ", ", s)  # "19, 46, and 82" -> one separator
    for pattern, op in _RELATION_TOKENS:
        s = pattern.sub(op, s)
    s = _strip_trailing_units(s.strip())
    s = _strip_unit_words(s.strip())
    s = _LEADING_VAR_IN_RE.sub("", s)
    s = brace_command_args(s, "\\frac", 2)
    s = brace_command_args(s, "\\sqrt", 1)
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)  # 52_{8} -> 52_8
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    s = _ARRAY_RE.sub(r"\\begin{pmatrix}\1\\end{pmatrix}", s)
    wrapped = _WRAPPED_ENV_RE.fullmatch(s)
    if wrapped and _one_environment(wrapped.group(1)):
        s = wrapped.group(1)  # brackets around a matrix are its delimiters, not a tuple
    if s.startswith("{") and matching_brace(s, 0) == len(s) - 1:
        s = s[1:-1].strip()  # plain braces group, they do not make a set (`{1,3}`)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    return Normalized(s, percent, degrees)


_ARRAY_RE = re.compile(r"\\begin\{array\}\{[lcr| ]*\}(.*)\\end\{array\}")
_WRAPPED_ENV_RE = re.compile(r"[(\[]\s*(\\begin\{(\w+)\}.*\\end\{\2\})\s*[)\]]")


def _one_environment(s: str) -> bool:
    return s.count("\\begin{") == 1 and s.endswith("}") and s.count("\\end{") == 1


def text_key(s: str) -> str | None:
    """For word answers (`\\text{(C)}`, `Evelyn`, `east`): lowercase letters only; None when the
    answer is mathematics rather than words."""
    t = s
    for command in _TEXT_COMMANDS:
        t = _unwrap_command(t, command)
    t = t.replace("{", "").replace("}", "").strip()
    if t.startswith("(") and t.endswith(")"):
        t = t[1:-1]
    if not re.fullmatch(r"[A-Za-z][A-Za-z ]*", t.strip()):
        return None
    return t.strip().lower().replace(" ", "")


def strip_text_commands(s: str) -> str:
    """Remove `\\text{...}` wrappers around mathematical content."""
    for command in _TEXT_COMMANDS:
        s = _unwrap_command(s, command)
    return s
