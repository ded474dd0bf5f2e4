"""Is a predicted answer mathematically the same as the gold answer?

Structure first (matrices, unions, sets, ordered tuples/intervals, bare lists, `a \\pm b`,
`x = 3`), then scalars: word answers by their letters, plain numbers with exact `Fraction`s, other
expressions through `safe_sympy` (exact rationals, then high-precision numerics, then random-point
identity testing).  A decimal only matches a non-terminating exact value when it is that value
rounded to the decimal's own places (and, for a predicted decimal, has >= 6 significant digits).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

import sympy

from phi_reason.eval import safe_sympy
from phi_reason.eval.normalize import normalize, strip_text_commands, text_key

MAX_ANSWER_CHARS = 2000      # longer answers (never a real gold) are compared verbatim only
MAX_ITEMS = 200               # a "list" with more elements is not an answer we compare
MIN_PREDICTED_SIG_DIGITS = 6  # precision a predicted decimal needs to stand in for an exact value
_MATRIX_ENVS = ("pmatrix", "bmatrix", "Bmatrix", "vmatrix", "matrix", "smallmatrix")
_SIMPLE_LHS_RE = re.compile(r"[a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+")
_OPENERS, _CLOSERS = "([{", ")]}"
# A label: what names an answer rather than computes it (`x`, `a_{37}`, `f(x)`, `(p,q)`, `|AB|`,
# `V_1:V_2`, `\frac{NO}{BO}`).  Function names written as commands (`\sin(x)`) are not labels.
_GREEK = (r"\\(?:alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|kappa|lambda|mu|"
          r"nu|xi|rho|sigma|tau|phi|varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Sigma|Phi|Psi|"
          r"Omega)(?![a-zA-Z])")
_ATOM = r"(?:[A-Za-z]+|%s)(?:_(?:\{[\w,]+\}|\w+))?'*" % _GREEK
_NAMED = (r"(?:\\overline\{{a}\}|\\angle{a}|\|{a}\||{a}(?:\({a}(?:,{a})*\))?|"
          r"\\frac\{{a}\}\{{a}\})").replace("{a}", _ATOM)
_LABEL_RE = re.compile(r"\({a}(?:,{a})+\)|{n}(?::{n})*".format(a=_ATOM, n=_NAMED))
_RELATION_RE = re.compile(r"<=|>=|!=|<|>")
# A side made of numbers and operators only: `5 \\times 6 \\times 4 = 120` states a result.
_NUMERIC_RE = re.compile(r"(?:[\d.+\-*/^(){} ]|\\(?:[dt]?frac|times|cdot|sqrt)(?![a-zA-Z]))+")


@dataclass(frozen=True)
class Node:
    kind: str                 # scalar | set | list | seq | union | matrix | relation
    text: str = ""
    items: tuple = field(default_factory=tuple)   # relation: (lhs, op, rhs) texts
    brackets: str = ""        # for seq: opening + closing bracket, e.g. "(]"
    label: str = ""           # for scalar: the stripped name in `x = 3`, `f(x) = 2x+3`


def split_top_level(s: str, sep: str) -> list[str]:
    """Split on `sep` outside any (), [], {} or \\{ \\} group."""
    parts, depth, start, i, n = [], 0, 0, 0, len(s)
    sep_is_command = sep[0] == "\\" and sep[1:].isalpha()  # `\pm` must not split `\pmatrix`
    while i < n:
        if s.startswith("\\{", i):
            depth += 1
            i += 2
            continue
        if s.startswith("\\}", i):
            depth -= 1
            i += 2
            continue
        c = s[i]
        if depth == 0 and s.startswith(sep, i) and not (
                sep_is_command and s[i + len(sep):i + len(sep) + 1].isalpha()):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        if c in _OPENERS:
            depth += 1
        elif c in _CLOSERS:
            depth -= 1
        elif c == "\\" and i + 1 < n and not s[i + 1].isalpha():
            i += 2  # escaped character (e.g. `\\` row break) is not a bracket
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _encloses(s: str) -> bool:
    """True when the bracket opening s[0] closes exactly at s[-1] (mixed `(]` allowed)."""
    depth = 0
    for i, c in enumerate(s):
        if c in _OPENERS:
            depth += 1
        elif c in _CLOSERS:
            depth -= 1
            if depth == 0:
                return i == len(s) - 1
    return False


def is_label(text: str) -> bool:
    return bool(_LABEL_RE.fullmatch(text.replace(" ", "")))


def _split_relations(s: str) -> tuple[list[str], list[str]]:
    """Split on `<`, `<=`, `>`, `>=`, `!=` outside brackets (normalize() spelled them so)."""
    parts, ops, depth, start, i = [], [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in _OPENERS:
            depth += 1
        elif c in _CLOSERS:
            depth -= 1
        elif depth == 0 and c in "<>!":
            m = _RELATION_RE.match(s, i)
            if m:
                parts.append(s[start:i])
                ops.append(m.group(0))
                i = start = m.end()
                continue
        i += 1
    parts.append(s[start:])
    return parts, ops


_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "!=": "!="}


def _relation(parts, ops) -> Node | None:
    """`a < x < b` (one direction) -> the interval; `lhs op rhs` -> a relation node."""
    if any(not p.strip() for p in parts):
        return None
    if len(ops) == 2 and "!=" not in ops:
        if ops[0][0] == ">" and ops[1][0] == ">":
            parts, ops = parts[::-1], [_FLIP[o] for o in ops[::-1]]
        if ops[0][0] == "<" and ops[1][0] == "<":
            return Node("seq", items=(parse_structure(parts[0]), parse_structure(parts[2])),
                        brackets=("(" if ops[0] == "<" else "[") + (")" if ops[1] == "<" else "]"))
        return None
    if len(ops) == 1:
        return Node("relation", items=(parts[0].strip(), ops[0], parts[1].strip()))
    return None


def relation_interval(node: Node) -> Node | None:
    """`x > 5` -> `(5, \\infty)`, `5 >= x` -> `(-\\infty, 5]` when one side is a label."""
    lhs, op, rhs = node.items
    if op == "!=":
        return None
    if is_label(rhs) and not is_label(lhs):
        lhs, op, rhs = rhs, _FLIP[op], lhs
    if not is_label(lhs):
        return None
    bound = parse_structure(rhs)
    if op in ("<", "<="):
        return Node("seq", items=(Node("scalar", "-\\infty"), bound),
                    brackets="(" + (")" if op == "<" else "]"))
    return Node("seq", items=(bound, Node("scalar", "\\infty")),
                brackets=("(" if op == ">" else "[") + ")")


def _flat_items(parts) -> tuple:
    """Parse set/list elements; an element `a \\pm b` contributes its two values."""
    items = []
    for part in parts:
        if not part.strip():
            continue
        node = parse_structure(part)
        items.extend(node.items if node.kind == "list" else (node,))
    return tuple(items)


def parse_structure(s: str) -> Node:
    s = s.strip()
    for env in _MATRIX_ENVS:
        head, tail = "\\begin{%s}" % env, "\\end{%s}" % env
        if s.startswith(head) and s.endswith(tail) and s.count(head) == 1 and s.count(tail) == 1:
            inner = s[len(head):len(s) - len(tail)]
            rows = [r for r in split_top_level(inner, "\\\\") if r.strip()]
            cells = tuple(tuple(parse_structure(c) for c in split_top_level(r, "&")) for r in rows)
            return Node("matrix", items=cells)
    parts = split_top_level(s, "\\cup")
    if len(parts) > 1:
        return Node("union", items=tuple(parse_structure(p) for p in parts))
    if s.startswith("\\{") and s.endswith("\\}"):
        return Node("set", items=_flat_items(split_top_level(s[2:-2], ",")))
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _encloses(s):
        items = split_top_level(s[1:-1], ",")
        if len(items) == 1:
            items = split_top_level(s[1:-1], ";")  # `(0;-2;6)`
        if len(items) >= 2:
            return Node("seq", items=tuple(parse_structure(p) for p in items),
                        brackets=s[0] + s[-1])
        if s[0] + s[-1] == "()":
            return parse_structure(s[1:-1])
    groups = [g for g in split_top_level(s, ";") if g.strip()]
    if len(groups) > 1:  # `;` separates answers whose parts are separated by `,`
        return Node("list", items=tuple(parse_structure(g) for g in groups))
    items = split_top_level(s, ",")
    if len(items) > 1:
        return Node("list", items=_flat_items(items))
    pm = split_top_level(s, "\\pm")
    if len(pm) == 2:
        a, b = pm[0].strip(), pm[1].strip()
        return Node("list", items=(Node("scalar", f"{a}+({b})" if a else b),
                                   Node("scalar", f"{a}-({b})" if a else f"-({b})")))
    parts, ops = _split_relations(s)
    if ops:
        node = _relation(parts, ops)
        if node is not None:
            return node
    sides = split_top_level(s, "=")
    if len(sides) >= 2 and sides[-1].strip() and (
            _SIMPLE_LHS_RE.fullmatch(sides[0].strip()) or is_label(sides[0])
            or (_NUMERIC_RE.fullmatch(sides[0].strip())
                and _NUMERIC_RE.fullmatch(sides[-1].strip()))):
        node = parse_structure(sides[-1])  # `x = 3`, `x = y = 3`, `f(x) = 2x+3`, `(p,q) = (3,2)`
        if node.kind == "scalar":
            return Node("scalar", node.text, label=sides[0].strip())
        return node
    return Node("scalar", s)


# ----------------------------------------------------------------- numbers

@dataclass(frozen=True)
class PlainNumber:
    value: Fraction
    places: int | None        # decimal places when written as a decimal, else None
    sig_digits: int = 0


_DECIMAL_RE = re.compile(r"([+-]?)(\d*)\.(\d+)|([+-]?)(\d+)")
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_SLASH_RE = re.compile(r"([+-]?)(\d+)/(\d+)")
_MIXED_RE = re.compile(r"([+-]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_SPACED_MIXED_RE = re.compile(r"([+-]?)(\d+) +(\d+)/(\d+)")  # `1 1/2`
_SCIENTIFIC_RE = re.compile(r"([+-]?\d*\.?\d+)(?:\\times|\\cdot|\*)10\^\{?([+-]?\d{1,3})\}?")


def plain_number(text: str) -> PlainNumber | None:
    """Integers, decimals, `\\frac{a}{b}`, `a/b` and mixed numbers as exact Fractions."""
    if len(text) > safe_sympy.MAX_DIGIT_RUN:
        return None
    m = _SPACED_MIXED_RE.fullmatch(text.strip())
    if m and int(m.group(4)) != 0:
        value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return PlainNumber(-value if m.group(1) == "-" else value, None)
    t = text.replace(" ", "")
    if not t:
        return None
    m = _SCIENTIFIC_RE.fullmatch(t)
    if m:
        mantissa, exponent = plain_number(m.group(1)), int(m.group(2))
        if mantissa is None:
            return None
        value = mantissa.value * Fraction(10) ** exponent
        places = None if mantissa.places is None else max(mantissa.places - exponent, 0)
        return PlainNumber(value, places, mantissa.sig_digits)
    m = _DECIMAL_RE.fullmatch(t)
    if m:
        if m.group(3) is not None:
            whole, frac = m.group(2) or "0", m.group(3)
            digits = (whole + frac).lstrip("0")
            value = Fraction(int(whole + frac), 10 ** len(frac))
            return PlainNumber(-value if m.group(1) == "-" else value, len(frac), len(digits))
        value = Fraction(int(m.group(5)))
        return PlainNumber(-value if m.group(4) == "-" else value, None)
    for regex in (_FRAC_RE, _SLASH_RE):
        m = regex.fullmatch(t)
        if m:
            if int(m.group(3)) == 0:
                return None
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return PlainNumber(-value if m.group(1) == "-" else value, None)
    m = _MIXED_RE.fullmatch(t)
    if m and int(m.group(4)) != 0:
        value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return PlainNumber(-value if m.group(1) == "-" else value, None)
    return None


def _rounds_to(value, decimal: PlainNumber) -> bool:
    """`value` (Fraction or numeric sympy expr) rounded to `decimal.places` equals `decimal`."""
    if isinstance(value, Fraction):
        exact = value
    else:
        real = safe_sympy.real_part(safe_sympy.numeric(value))
        if real is None:
            return False
        exact = Fraction(str(real))
    scale = 10 ** decimal.places
    return Fraction(round(exact * scale), scale) == decimal.value


def _decimal_rule(pred_value, pred_num: PlainNumber | None, gold_value,
                  gold_num: PlainNumber | None) -> bool:
    """Decimal vs exact: the gold's decimal fixes the rounding; a predicted decimal must be
    precise (>= MIN_PREDICTED_SIG_DIGITS significant digits)."""
    if gold_num is not None and gold_num.places is not None and (
            pred_num is None or pred_num.places is None):
        return _rounds_to(pred_value, gold_num)
    if pred_num is not None and pred_num.places is not None and (
            gold_num is None or gold_num.places is None):
        return pred_num.sig_digits >= MIN_PREDICTED_SIG_DIGITS and _rounds_to(gold_value, pred_num)
    return False


def _sympy_value(text: str, number: PlainNumber | None):
    if number is not None:
        return sympy.Rational(number.value.numerator, number.value.denominator)
    return safe_sympy.parse_latex(text)


def scalars_equal(pred: str, gold: str, pred_percent=False, gold_percent=False) -> bool:
    p, g = normalize(pred), normalize(gold)
    pred_percent, gold_percent = pred_percent or p.percent, gold_percent or g.percent
    if p.text.replace(" ", "") == g.text.replace(" ", ""):
        return True
    pk, gk = text_key(p.text), text_key(g.text)
    if gk is not None:
        # A word gold (`Evelyn`, `(C)`, `east`) is matched by its letters only: as mathematics
        # it would be a commutative product of symbols, and an anagram would "equal" it.
        return pk == gk
    ptext, gtext = strip_text_commands(p.text), strip_text_commands(g.text)
    pnum, gnum = plain_number(ptext), plain_number(gtext)
    scales = [Fraction(1)]
    if pred_percent != gold_percent:  # 50% may be answered as 50 or 0.5, and vice versa
        scales.append(Fraction(1, 100) if pred_percent else Fraction(100))
    if pnum is not None and gnum is not None:
        for scale in scales:
            scaled = PlainNumber(pnum.value * scale, pnum.places, pnum.sig_digits)
            if scaled.value == gnum.value or _decimal_rule(scaled.value, scaled, gnum.value, gnum):
                return True
        return False
    try:
        return _sympy_scalars_equal(ptext, pnum, gtext, gnum, scales)
    except safe_sympy.TooLarge:
        return False  # refusing to materialise a huge number: not a match


def _sympy_scalars_equal(ptext, pnum, gtext, gnum, scales) -> bool:
    pv, gv = _sympy_value(ptext, pnum), _sympy_value(gtext, gnum)
    if pv is None or gv is None:
        return False
    for scale in scales:
        candidate = pv * sympy.Rational(scale.numerator, scale.denominator) if scale != 1 else pv
        if safe_sympy.values_equal(candidate, gv):
            return True
        if (pnum is not None or gnum is not None) and _decimal_rule(
                candidate, pnum if scale == 1 else None, gv, gnum):
            return True
    return False


# ----------------------------------------------------------------- structure

def _distinct(items) -> tuple:
    """Items of a solution set without verbatim repeats (`(3,17,3,7)` listed twice is one)."""
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return tuple(out)


def _unordered_match(pred_items, gold_items) -> bool:
    pred_items, gold_items = _distinct(pred_items), _distinct(gold_items)
    if len(pred_items) != len(gold_items) or len(gold_items) > MAX_ITEMS:
        return False
    remaining = list(gold_items)
    for p in pred_items:
        for j, g in enumerate(remaining):
            if nodes_equal(p, g):
                del remaining[j]
                break
        else:
            return False
    return True


def _ordered_match(pred_items, gold_items) -> bool:
    return len(pred_items) == len(gold_items) and all(
        nodes_equal(p, g) for p, g in zip(pred_items, gold_items))


def _labelled_equation(node: Node) -> str | None:
    """`y = -x/2 + 3/4` as an equation again, for comparing with `2x + 4y - 3 = 0`."""
    return f"{node.label}={node.text}" if node.kind == "scalar" and node.label else None


def _is_equation(node: Node) -> bool:
    return node.kind == "scalar" and not node.label and len(split_top_level(node.text, "=")) == 2


def _all_labelled(node: Node) -> bool:
    return node.kind == "list" and all(i.kind == "scalar" and i.label for i in node.items)


def relations_equal(pred: Node, gold: Node) -> bool:
    """Same relation: after writing both as `lhs - rhs  op  0` with op in {<, <=} (or = / !=),
    the same operator and lhs - rhs proportional by a constant (positive for inequalities)."""
    (pl, pop, pr), (gl, gop, gr) = pred.items, gold.items
    if pop in (">", ">="):
        pl, pop, pr = pr, _FLIP[pop], pl
    if gop in (">", ">="):
        gl, gop, gr = gr, _FLIP[gop], gl
    if pop != gop:
        return False
    if (pl + pop + pr).replace(" ", "") == (gl + gop + gr).replace(" ", ""):
        return True
    sides = [safe_sympy.parse_latex(strip_text_commands(t)) for t in (pl, pr, gl, gr)]
    if any(not isinstance(v, sympy.Expr) for v in sides):
        return False
    return safe_sympy.proportional(sides[0] - sides[1], sides[2] - sides[3],
                                   positive=pop != "!=")


def nodes_equal(pred: Node, gold: Node, pred_percent=False, gold_percent=False) -> bool:
    if pred.kind == "scalar" and gold.kind == "scalar":
        if scalars_equal(pred.text, gold.text, pred_percent, gold_percent):
            return True
        # `y = -x/2 + 3/4` (a labelled value) against the equation `2x + 4y - 3 = 0`
        if pred.label and _is_equation(gold):
            return scalars_equal(_labelled_equation(pred), gold.text)
        if gold.label and _is_equation(pred):
            return scalars_equal(pred.text, _labelled_equation(gold))
        return False
    if pred.kind == "relation" and gold.kind == "relation":
        return relations_equal(pred, gold)
    if pred.kind == "relation" or gold.kind == "relation":
        pred = relation_interval(pred) if pred.kind == "relation" else pred
        gold = relation_interval(gold) if gold.kind == "relation" else gold
        return pred is not None and gold is not None and nodes_equal(pred, gold)
    if pred.kind == "union" or gold.kind == "union":
        return pred.kind == gold.kind and _unordered_match(pred.items, gold.items)
    if pred.kind in ("set", "list") and gold.kind in ("set", "list"):
        return _unordered_match(pred.items, gold.items)
    if pred.kind == "seq" and gold.kind == "seq":
        return pred.brackets == gold.brackets and _ordered_match(pred.items, gold.items)
    if gold.kind == "seq" and gold.brackets == "()" and pred.kind == "list":
        return _ordered_match(pred.items, gold.items)  # `3, 5` for the point `(3, 5)`
    if pred.kind == "seq" and pred.brackets == "()" and _all_labelled(gold):
        return _ordered_match(pred.items, gold.items)  # `(5, 2)` for `p = 5, q = 2`
    if (pred.kind == "matrix") != (gold.kind == "matrix") and "scalar" in (pred.kind, gold.kind):
        return _matrix_expression_equal(pred, gold)  # `A + B` written out against its sum
    if pred.kind == "matrix" and gold.kind == "matrix":
        return len(pred.items) == len(gold.items) and all(
            _ordered_match(pr, gr) for pr, gr in zip(pred.items, gold.items))
    return False


def _matrix_value(node: Node):
    if node.kind == "matrix":
        try:
            rows = [[safe_sympy.parse_latex(strip_text_commands(c.text)) if c.kind == "scalar"
                     else None for c in row] for row in node.items]
            return sympy.Matrix(rows) if all(v is not None for r in rows for v in r) else None
        except (ValueError, TypeError, sympy.SympifyError):
            return None
    value = safe_sympy.parse_latex(node.text)
    if not getattr(value, "is_Matrix", False):
        return None
    safe_sympy.size_bits(value)
    try:
        return sympy.Matrix(value.doit())  # `A + B`, `A B` written out
    except (ValueError, TypeError, sympy.ShapeError):
        return None


def _matrix_expression_equal(pred: Node, gold: Node) -> bool:
    a, b = _matrix_value(pred), _matrix_value(gold)
    if a is None or b is None or a.shape != b.shape:
        return False
    return all(safe_sympy.values_equal(x, y) for x, y in zip(a, b))


def answers_equivalent(pred: str, gold: str) -> bool:
    """True when the extracted prediction means the same answer as the gold answer."""
    if (len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS
            or safe_sympy.brace_depth(pred) > safe_sympy.MAX_BRACE_DEPTH):
        return pred.strip() == gold.strip()  # keeps every later step linear-time and bounded
    p, g = normalize(pred), normalize(gold)
    if p.text.replace(" ", "") == g.text.replace(" ", ""):
        return True
    return nodes_equal(parse_structure(p.text), parse_structure(g.text), p.percent, g.percent)
