"""LaTeX -> sympy without eval, with size guards, and bounded comparison of sympy values.

Safety: `latex2sympy2_extended` parses with an ANTLR grammar and builds sympy objects directly,
with two exceptions that reach sympy's `eval`-based `parse_expr`: `variable_values` (never passed
here) and `parse_number`, which calls `sympy.Number(token_text)` -> `sympify(str)` -> `eval`.  The
token is lexer-restricted to digits, but we still replace that method (`_EvalFreeConverter`) with
exact integer/Fraction construction, so no text from a model ever reaches `eval`; the
`test_no_eval_or_exec_reaches_model_text` test traps `eval`/`exec` to prove it.

Hangs: a size bound is computed bottom-up over the *unevaluated* tree before anything is
evaluated, so `5^{5^{5^{5^5}}}` or `(10^{10^{10}})!` are refused instead of computed.  The worker
pool's wall-clock deadline is the backstop for anything this misses.
"""
from __future__ import annotations

import math
import random
import re
from fractions import Fraction
from functools import lru_cache

import sympy

MAX_PARSE_CHARS = 300      # longer answers are compared as strings only (MATH golds are <= ~80);
#                            the ANTLR parser's error recovery is super-linear on long garbage
MAX_BRACE_DEPTH = 24       # deeper nesting is not a real answer; refuse before the parser recurses
MAX_BITS = 1 << 16         # largest number (in bits) we let sympy materialise
MAX_DIGIT_RUN = 400        # longest literal digit string handed to the parser
NUMERIC_DIGITS = 60        # working precision for numeric comparison of exact values
RELATIVE_TOL = sympy.Float("1e-40", NUMERIC_DIGITS)
TINY = sympy.Float("1e-45", NUMERIC_DIGITS)

_FACTORIAL_LIKE = {"factorial", "factorial2", "subfactorial", "gamma", "binomial",
                   "RisingFactorial", "FallingFactorial", "fibonacci", "lucas", "catalan",
                   "bell", "harmonic"}
_BIG_BINOM_RE = re.compile(r"\\[dt]?binom\s*\{[^{}]*(?:\^|\d{7,})")


class TooLarge(ValueError):
    """The expression would materialise a number beyond MAX_BITS."""


def brace_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "{([":
            depth += 1
            best = max(best, depth)
        elif c in "})]":
            depth -= 1
    return best


def parse_guard(latex: str) -> str | None:
    """Why this string must not reach the parser, or None when it may."""
    if len(latex) > MAX_PARSE_CHARS:
        return f"answer longer than {MAX_PARSE_CHARS} characters"
    if latex.count("{") != latex.count("}") or (
            latex.count("(") + latex.count("[") != latex.count(")") + latex.count("]")):
        return "unbalanced brackets"
    if brace_depth(latex) > MAX_BRACE_DEPTH:
        return f"nesting deeper than {MAX_BRACE_DEPTH}"
    if re.search(r"\d{%d}" % (MAX_DIGIT_RUN + 1), latex):
        return f"literal with more than {MAX_DIGIT_RUN} digits"
    if _BIG_BINOM_RE.search(latex):
        return "binomial with a huge argument"  # latex2sympy evaluates \binom while parsing
    if "__" in latex or "import" in latex:
        return "not mathematics"  # defence in depth only: nothing below evaluates text
    return None


@lru_cache(maxsize=1)
def _converter_class():
    """latex2sympy's converter with its eval-based number parsing replaced (imported lazily:
    the parser is heavy and only workers need it)."""
    from latex2sympy2_extended import latex2sympy2
    base = getattr(latex2sympy2, "_Latex2Sympy", None)
    if base is None or not hasattr(base, "parse_number"):
        raise ImportError("latex2sympy2_extended changed: _Latex2Sympy.parse_number not found; "
                          "refusing to parse without the eval-free number override")

    class _EvalFreeConverter(base):
        def parse_number(self, text):
            text = text.replace(",", "")
            if len(text) > MAX_DIGIT_RUN + 20:
                raise ValueError("number literal too long")
            value = Fraction(text)  # digits, decimals and e-notation; never eval
            return sympy.Integer(value.numerator) if value.denominator == 1 else sympy.Rational(
                value.numerator, value.denominator)

    return _EvalFreeConverter, latex2sympy2.ConversionConfig


@lru_cache(maxsize=4096)
def parse_latex(latex: str):
    """sympy object for a normalised LaTeX scalar, or None when unparseable or refused."""
    if parse_guard(latex) is not None:
        return None
    converter_class, conversion_config = _converter_class()
    try:
        expr = converter_class(None, False, False, config=conversion_config()).parse(latex)
    except Exception:  # noqa: BLE001 - the ANTLR parser raises bare Exception (and RecursionError)
        return None
    if isinstance(expr, sympy.Basic):
        imaginary = [s for s in expr.free_symbols if getattr(s, "name", "") == "i"]
        if imaginary:
            expr = expr.xreplace({imaginary[0]: sympy.I})
    return expr


def _value_bound(bits: float) -> float:
    """Upper bound of |x| for a number of at most `bits` bits (capped to stay a float)."""
    return 2.0 ** min(bits, 1000.0)


def size_bits(expr) -> float:
    """Upper bound on the bits needed to write `expr` once evaluated; raises TooLarge early."""
    if isinstance(expr, sympy.MatrixBase):
        return max((size_bits(e) for e in expr), default=0.0)
    if not isinstance(expr, sympy.Basic):
        return 1.0
    if isinstance(expr, sympy.Integer):
        return float(max(int(expr).bit_length(), 1))
    if isinstance(expr, sympy.Rational):
        return float(int(expr.p).bit_length() + int(expr.q).bit_length())
    if isinstance(expr, sympy.Float):
        return 1.0 + math.log2(abs(float(expr)) + 1.0)  # magnitude only; precision is fixed
    if expr.is_Atom:
        return 2.0
    args = [size_bits(a) for a in expr.args]
    if isinstance(expr, sympy.Pow):
        base_bits, exp_bits = args
        if exp_bits > 64:
            raise TooLarge("exponent too large")
        exponent = expr.args[1]
        magnitude = (abs(float(exponent)) if isinstance(exponent, (sympy.Rational, sympy.Float))
                     else _value_bound(exp_bits))
        bits = max(base_bits, 2.0) * max(magnitude, 1.0)
    elif isinstance(expr, sympy.Mul):
        bits = sum(args)
    elif isinstance(expr, sympy.Add):
        bits = max(args) + math.log2(len(args)) + 1
    elif type(expr).__name__ in _FACTORIAL_LIKE or isinstance(expr, sympy.factorial):
        if max(args) > 40:
            raise TooLarge("factorial argument too large")
        n = max((abs(float(a)) if isinstance(a, sympy.Rational) else _value_bound(b))
                for a, b in zip(expr.args, args))
        bits = n * math.log2(n + 2) + max(args)
    else:
        bits = max(args, default=1.0) + 1
    if bits > MAX_BITS:
        raise TooLarge(f"{type(expr).__name__} would exceed {MAX_BITS} bits")
    return bits


def exact(expr):
    """Replace decimal Floats by the Rational they spell (0.1 -> 1/10), so that comparisons of
    decimals with fractions are exact rather than binary-rounded."""
    if not isinstance(expr, sympy.Basic):
        return expr
    floats = expr.atoms(sympy.Float)
    if not floats:
        return expr
    return expr.xreplace({f: sympy.Rational(str(f)) for f in floats})


def numeric(expr, subs=None):
    """(real, imag) sympy Floats at NUMERIC_DIGITS precision, or None when `expr` does not
    evaluate to a finite number."""
    try:
        value = sympy.N(expr, NUMERIC_DIGITS, subs=subs)
        if not value.is_number or value.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
            return None
        re_part, im_part = value.as_real_imag()
        re_part = sympy.Float(re_part, NUMERIC_DIGITS)
        im_part = sympy.Float(im_part, NUMERIC_DIGITS)
    except Exception:  # noqa: BLE001 - sympy raises many types on odd input
        return None
    return re_part, im_part


def real_part(value):
    """The real part of a `_numeric` pair when its imaginary part is negligible, else None.
    (sympy 1.13+: Float(0.0) != 0, so never test the imaginary part with `!= 0`.)"""
    if value is None or abs(value[1]) > TINY * (1 + abs(value[0])):
        return None
    return value[0]


def _close(a, b) -> bool:
    """|a - b| <= RELATIVE_TOL * max(|a|, |b|) for (real, imag) pairs from `_numeric`."""
    diff = abs(a[0] - b[0]) + abs(a[1] - b[1])
    scale = max(abs(a[0]) + abs(a[1]), abs(b[0]) + abs(b[1]))
    if scale < TINY:
        return True  # both zero to working precision
    return bool(diff <= RELATIVE_TOL * scale)


def as_rational(expr):
    """`expr` evaluated to a sympy Rational when it is one (after the size guard), else None."""
    if not isinstance(expr, sympy.Basic) or expr.free_symbols:
        return None
    size_bits(expr)
    value = exact(expr).doit()
    return value if isinstance(value, sympy.Rational) else None


def values_equal(a, b) -> bool:
    """Mathematical equality of two parsed scalars: exact for rationals, high-precision numeric
    (relative 1e-40) for other constants, random-point identity testing with symbols."""
    size_bits(a)
    size_bits(b)
    a, b = exact(a), exact(b)
    if isinstance(a, sympy.Eq) or isinstance(b, sympy.Eq):
        return equations_equal(a, b)
    if not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return a == b
    ra, rb = as_rational(a), as_rational(b)
    if ra is not None and rb is not None:
        return ra == rb
    symbols = sorted(a.free_symbols | b.free_symbols, key=lambda s: s.name)
    if {s.name for s in a.free_symbols} != {s.name for s in b.free_symbols}:
        return False
    return _same_function(a, b, symbols)


def _sample_points(symbols, count=4, seed=1234):
    rng = random.Random(seed)
    for _ in range(count):
        yield {s: sympy.Rational(rng.randint(1, 997), rng.randint(1, 97)) + sympy.Rational(1, 7)
               for s in symbols}


def _same_function(a, b, symbols) -> bool:
    """Equal at several random rational points (and at least one point evaluates)."""
    evaluated = 0
    for point in _sample_points(symbols):
        va, vb = numeric(a, point), numeric(b, point)
        if va is None and vb is None:
            continue
        if va is None or vb is None or not _close(va, vb):
            return False
        evaluated += 1
    return evaluated > 0


def proportional(da, db, positive: bool) -> bool:
    """da = c * db for a nonzero constant c (c > 0 when `positive`), by evaluation at random real
    points (both sides size-guarded first)."""
    size_bits(da)
    size_bits(db)
    da, db = exact(da), exact(db)
    if {s.name for s in da.free_symbols} != {s.name for s in db.free_symbols}:
        return False
    symbols = sorted(da.free_symbols | db.free_symbols, key=lambda s: s.name)
    ratio = None
    for point in _sample_points(symbols, count=5):
        va, vb = real_part(numeric(da, point)), real_part(numeric(db, point))
        if va is None or vb is None:
            continue
        if abs(vb) < TINY or abs(va) < TINY:
            if not (abs(vb) < TINY and abs(va) < TINY):
                return False
            continue
        r = va / vb
        if ratio is None:
            ratio = r
        elif abs(r - ratio) > RELATIVE_TOL * abs(ratio):
            return False
    return ratio is not None and (not positive or ratio > 0)


def equations_equal(a, b) -> bool:
    """`lhs = rhs` forms describe the same relation: lhs - rhs proportional (nonzero constant)."""
    if not (isinstance(a, sympy.Eq) and isinstance(b, sympy.Eq)):
        return False
    return proportional(a.lhs - a.rhs, b.lhs - b.rhs, positive=False)
