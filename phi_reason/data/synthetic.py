"""Synthetic verifiable math for the demo and tests.

Each record is {"problem", "solution", "answer"}: the solution is a short step-by-step
`<think>...</think>` followed by `\\boxed{answer}`, so the same grader that scores MATH scores it.
Problems and solutions use a small character set (digits, `+-*/=?x,`, space, `\\boxed{}`,
`\\frac{}{}`) and stay short at the easy setting, so a ~1M-parameter char-level model trained for a
few minutes on CPU can learn them. Every step is an arithmetic identity a test can check.

Kinds: add, sub (column arithmetic with carries/borrows), mul (column or partial products),
linear (ax+b=c, or ax+b=cx+d when hard), frac (add/sub/mul of fractions, reduced).
Difficulty: "easy" | "medium" | "hard" (see DIFFICULTIES) or a dict of the same knobs.
"""
from __future__ import annotations

import math
import random
from fractions import Fraction

KINDS = ("add", "sub", "mul", "linear", "frac")

DIFFICULTIES = {
    # digits: operand digits for add/sub; mul_digits: (multiplicand, multiplier) digits;
    # negative: sub/linear may produce negative answers; coef: max |a| in linear; root: max |x|;
    # two_sided: linear has x on both sides; den: max fraction denominator; frac_ops: operators.
    "easy": dict(digits=2, mul_digits=(2, 1), negative=False, coef=9, root=9, two_sided=False,
                 den=5, frac_ops="+"),
    "medium": dict(digits=3, mul_digits=(2, 2), negative=True, coef=12, root=20, two_sided=False,
                   den=9, frac_ops="+-"),
    "hard": dict(digits=5, mul_digits=(3, 2), negative=True, coef=20, root=50, two_sided=True,
                 den=12, frac_ops="+-*"),
}


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def _digits(n: int, width: int) -> list[int]:
    """Decimal digits of n, least significant first, zero-padded to `width`."""
    return [(n // 10 ** i) % 10 for i in range(width)]


def _boxed(solution_steps: list[str], answer: str) -> str:
    return "<think>" + " ".join(solution_steps) + "</think>\\boxed{" + answer + "}"


def _frac_text(q: Fraction) -> str:
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def _column_add(a: int, b: int) -> list[str]:
    width = len(str(max(a, b)))
    steps, carry = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width)):
        total = da + db + carry
        steps.append(f"{da}+{db}" + ("+1" if carry else "") + f"={total}")
        carry = total // 10
    return steps


def _column_sub(a: int, b: int) -> list[str]:
    """a - b for a >= b: per column "x-y=r" where x already includes the borrow taken from the next
    column (+10) and the borrow given to the previous one (-1)."""
    width = len(str(a))
    steps, borrow = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width)):
        x = da - borrow
        borrow = 1 if x < db else 0
        x += 10 * borrow
        steps.append(f"{x}-{db}={x - db}")
    return steps


def _add(rng, k):
    a, b = _number(rng, k["digits"]), _number(rng, k["digits"])
    return f"{a}+{b}=?", _column_add(a, b), str(a + b)


def _sub(rng, k):
    a, b = _number(rng, k["digits"]), _number(rng, k["digits"])
    if not k["negative"] and a < b:
        a, b = b, a
    if a >= b:
        return f"{a}-{b}=?", _column_sub(a, b), str(a - b)
    return f"{a}-{b}=?", [f"-({b}-{a})"] + _column_sub(b, a), str(a - b)


def _mul(rng, k):
    da, db = k["mul_digits"]
    a, b = _number(rng, da), _number(rng, db)
    if b < 10:
        steps, carry = [], 0
        for d in _digits(a, len(str(a))):
            total = d * b + carry
            steps.append(f"{d}*{b}" + (f"+{carry}" if carry else "") + f"={total}")
            carry = total // 10
        return f"{a}*{b}=?", steps, str(a * b)
    partials = [a * d * 10 ** i for i, d in enumerate(_digits(b, len(str(b)))) if d]
    steps = [f"{a}*{d * 10 ** i}={a * d * 10 ** i}"
             for i, d in enumerate(_digits(b, len(str(b)))) if d]
    if len(partials) > 1:
        steps.append("+".join(map(str, partials)) + f"={a * b}")
    return f"{a}*{b}=?", steps, str(a * b)


def _signed(n: int) -> str:
    return f"+{n}" if n >= 0 else f"{n}"


def _linear(rng, k):
    low = -k["root"] if k["negative"] else 0
    x = rng.randint(low, k["root"])
    a = rng.randint(2, k["coef"])
    b = (rng.randint(-k["coef"] * 5, k["coef"] * 5) if k["negative"]
         else rng.randint(1, k["coef"] * 5))
    steps = []
    if k["two_sided"]:
        c = rng.randint(1, a - 1) if a > 2 else 1
        d = (a - c) * x + b
        problem = f"{a}x{_signed(b)}={c}x{_signed(d)}, x=?"
        steps.append(f"{a}x-{c}x={a - c}x")
        a, rhs = a - c, d
    else:
        rhs = a * x + b
        problem = f"{a}x{_signed(b)}={rhs}, x=?"
    move = f"{rhs}-{b}" if b >= 0 else f"{rhs}+{-b}"
    steps.append(f"{a}x={move}={rhs - b}")
    steps.append(f"x={rhs - b}/{a}={x}")
    return problem, steps, str(x)


def _ratio(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _frac(rng, k):
    p, q = (Fraction(rng.randint(1, d - 1), d)
            for d in (rng.randint(2, k["den"]), rng.randint(2, k["den"])))
    op = rng.choice(k["frac_ops"])
    problem = f"{_ratio(p)}{op}{_ratio(q)}=?"
    if op == "*":
        num, den = p.numerator * q.numerator, p.denominator * q.denominator
        steps = [f"{_ratio(p)}*{_ratio(q)}={num}/{den}"]
    else:
        den = math.lcm(p.denominator, q.denominator)
        pn, qn = p.numerator * den // p.denominator, q.numerator * den // q.denominator
        num = pn + qn if op == "+" else pn - qn
        # Bring each operand to the common denominator (only those that need it), then combine.
        steps = [f"{_ratio(x)}={xn}/{den}" for x, xn in ((p, pn), (q, qn)) if x.denominator != den]
        steps.append(f"{pn}/{den}{op}{qn}/{den}={num}/{den}")
    result = Fraction(num, den)
    if (result.numerator, result.denominator) != (num, den):
        steps.append(f"{num}/{den}={_ratio(result)}")
    return problem, steps, _frac_text(result)


_GENERATORS = {"add": _add, "sub": _sub, "mul": _mul, "linear": _linear, "frac": _frac}


def _knobs(difficulty) -> dict:
    if isinstance(difficulty, dict):
        unknown = set(difficulty) - set(DIFFICULTIES["easy"])
        if unknown:
            raise ValueError(f"unknown difficulty knobs {sorted(unknown)}; "
                             f"known: {sorted(DIFFICULTIES['easy'])}")
        return {**DIFFICULTIES["easy"], **difficulty}
    try:
        return DIFFICULTIES[difficulty]
    except KeyError:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)} or a dict of knobs, "
                         f"got {difficulty!r}") from None


def make_problems(n: int, seed: int, kinds=KINDS, difficulty="easy", unique: bool = True,
                  exclude=()) -> list[dict]:
    """`n` seeded problems (same arguments -> same list), kinds drawn uniformly from `kinds`.
    `unique` avoids repeating a problem; `exclude` (problem strings, e.g. a held-out set) never
    appear. Raises ValueError when the knobs cannot produce `n` distinct problems."""
    unknown = [k for k in kinds if k not in _GENERATORS]
    if unknown or not kinds:
        raise ValueError(f"unknown problem kinds {unknown or kinds}; expected some of {KINDS}")
    knobs = _knobs(difficulty)
    rng = random.Random(seed)
    seen = set(exclude)
    out = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could only make {len(out)} distinct problems of kinds {kinds} at "
                             f"difficulty {difficulty!r}; ask for fewer")
        problem, steps, answer = _GENERATORS[rng.choice(kinds)](rng, knobs)
        if problem in seen:
            continue
        if unique:
            seen.add(problem)
        out.append({"problem": problem, "solution": _boxed(steps, answer), "answer": answer})
    return out


def _off_by_one_digit(answer: str) -> str:
    """The integer answer with its last digit bumped (9 -> 0): a plausible copying slip."""
    return answer[:-1] + str((int(answer[-1]) + 1) % 10)


def with_noisy_answers(problems: list[dict], rate: float, seed: int) -> list[dict]:
    """An unverified "teacher" corpus: in a `rate` fraction of the records (seeded choice) the
    worked steps stay correct but the final `\\boxed{}` answer has its last digit wrong. Only
    integer answers are changed. `answer` keeps the true value, so graders still know it.

    The demo mid-trains on such traces (as when distilling unfiltered teacher output); later
    stages on verified data and RL against the true answer have a systematic error to remove.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    rng = random.Random(seed)
    out = []
    for p in problems:
        a = p["answer"]
        if rng.random() < rate and a.lstrip("-").isdigit():
            tail = "\\boxed{" + a + "}"
            assert p["solution"].endswith(tail), p
            p = {**p, "solution": (p["solution"][:-len(tail)]
                                   + "\\boxed{" + _off_by_one_digit(a) + "}")}
        out.append(p)
    return out
