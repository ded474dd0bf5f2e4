"""Synthetic verifiable math: answers recomputed here from the problem text with exact fractions,
every step of every solution checked as an arithmetic identity, seeding, knobs and sizes."""
import ast
import operator
import re
from fractions import Fraction

import pytest

from phi_reason.data.boxed import last_boxed
from phi_reason.data.synthetic import KINDS, make_problems

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def _value(expr: str) -> Fraction:
    """Exact value of an arithmetic expression (integers, + - * /, parentheses, unary minus)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        raise ValueError(f"not arithmetic: {expr!r}")
    return ev(ast.parse(expr, mode="eval"))


def _answer_value(answer: str) -> Fraction:
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    if m:
        return Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1)
    return Fraction(int(answer))


def _expected_answer(problem: str) -> Fraction:
    """Solve the problem text independently of the generator."""
    linear = re.fullmatch(r"(\d+)x([+-]\d+)=(?:(\d+)x)?([+-]?\d+), x=\?", problem)
    if linear:
        a, b, c, d = int(linear[1]), int(linear[2]), int(linear[3] or 0), int(linear[4])
        return Fraction(d - b, a - c)
    assert problem.endswith("=?"), problem
    return _value(problem[:-2])


def _check_steps(think: str):
    for step in think.split(" "):
        if "=" not in step:
            # the "-(b-a)" sign note of a subtraction
            assert re.fullmatch(r"-\(\d+-\d+\)", step), step
            continue
        sides = step.split("=")
        if re.fullmatch(r"\d+x-\d+x", sides[0]):  # "5x-2x=3x"
            a, c = map(int, re.findall(r"\d+", sides[0]))
            assert sides[1] == f"{a - c}x", step
            continue
        if re.fullmatch(r"\d*x", sides[0]):  # "3x=19-4=15", "x=15/3=5": check the arithmetic chain
            sides = sides[1:]
        values = [_value(s) for s in sides]
        assert all(v == values[0] for v in values), step


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_answers_and_steps_are_correct(difficulty):
    records = make_problems(400, seed=11, difficulty=difficulty)
    assert {r["problem"].split("=")[0] for r in records}  # non-empty
    for r in records:
        assert _answer_value(r["answer"]) == _expected_answer(r["problem"]), r
        sol = r["solution"]
        assert sol.startswith("<think>") and sol.endswith("\\boxed{" + r["answer"] + "}")
        assert last_boxed(sol) == r["answer"]
        think = sol[len("<think>"):sol.index("</think>")]
        _check_steps(think)
    # the answer in lowest terms, integers without a fraction
    for r in records:
        if "frac" in r["answer"]:
            q = _answer_value(r["answer"])
            assert q.denominator != 1 and r["answer"].endswith(f"{{{q.denominator}}}")


def test_all_kinds_appear_and_kinds_filter():
    records = make_problems(200, seed=0)
    kinds = {"add": r"\d+\+\d+=\?", "sub": r"\d+-\d+=\?", "mul": r"\d+\*\d+=\?",
             "linear": r".*x=\?", "frac": r"\d+/\d+[-+*]\d+/\d+=\?"}
    found = {k for r in records for k, pattern in kinds.items()
             if re.fullmatch(pattern, r["problem"])}
    assert found == set(KINDS)
    only_mul = make_problems(50, seed=0, kinds=("mul",))
    assert all(re.fullmatch(kinds["mul"], r["problem"]) for r in only_mul)


def test_seeded_and_unique():
    a = make_problems(300, seed=7)
    assert a == make_problems(300, seed=7)
    assert a != make_problems(300, seed=8)
    assert len({r["problem"] for r in a}) == 300
    held_out = {r["problem"] for r in make_problems(100, seed=1)}
    train = make_problems(300, seed=2, exclude=held_out)
    assert not held_out & {r["problem"] for r in train}


def test_easy_is_short_with_a_small_alphabet():
    records = make_problems(2000, seed=0, difficulty="easy")
    lengths = [len(r["problem"]) + len(r["solution"]) for r in records]
    assert max(lengths) <= 100 and sum(lengths) / len(lengths) < 60
    alphabet = set("".join(r["problem"] + r["solution"] for r in records))
    assert alphabet <= set("0123456789+-*/=?x, <>\\{}()") | set("thinkboxedfrac")


def test_difficulty_knobs():
    def add_digits(difficulty):
        recs = make_problems(100, seed=0, kinds=("add",), difficulty=difficulty)
        return max(len(n) for r in recs for n in r["problem"][:-2].split("+"))
    assert (add_digits("easy"), add_digits("medium"), add_digits("hard")) == (2, 3, 5)
    custom = make_problems(50, seed=0, kinds=("add",), difficulty={"digits": 4})
    assert max(len(n) for r in custom for n in r["problem"][:-2].split("+")) == 4
    hard_linear = make_problems(50, seed=0, kinds=("linear",), difficulty="hard")
    assert all(re.search(r"=\d+x", r["problem"]) for r in hard_linear)  # x on both sides
    assert any(r["answer"].startswith("-") for r in make_problems(200, seed=0, kinds=("sub",),
                                                                      difficulty="medium"))
    assert not any(r["answer"].startswith("-") for r in make_problems(200, seed=0, kinds=("sub",)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown problem kinds"):
        make_problems(5, 0, kinds=("integrals",))
    with pytest.raises(ValueError, match="difficulty must be one of"):
        make_problems(5, 0, difficulty="olympiad")
    with pytest.raises(ValueError, match="unknown difficulty knobs"):
        make_problems(5, 0, difficulty={"digts": 3})
    with pytest.raises(ValueError, match="distinct problems"):
        make_problems(500, 0, kinds=("frac",), difficulty="easy")


def test_noisy_teacher_changes_only_the_boxed_answer_of_a_seeded_fraction():
    from phi_reason.data.synthetic import with_noisy_answers

    problems = make_problems(400, seed=3, kinds=("add", "sub", "mul", "frac"))
    noisy = with_noisy_answers(problems, 0.6, seed=9)
    assert noisy == with_noisy_answers(problems, 0.6, seed=9)  # seeded
    assert with_noisy_answers(problems, 0.0, seed=9) == problems
    changed = 0
    for clean, dirty in zip(problems, noisy):
        assert dirty["problem"] == clean["problem"] and dirty["answer"] == clean["answer"]
        if dirty["solution"] == clean["solution"]:
            continue
        changed += 1
        a = clean["answer"]
        assert a.lstrip("-").isdigit(), "only integer answers are corrupted"
        wrong = last_boxed(dirty["solution"])
        # Same steps, same length and leading digits; last digit one more (mod 10).
        assert dirty["solution"].split("\\boxed")[0] == clean["solution"].split("\\boxed")[0]
        assert wrong[:-1] == a[:-1] and int(wrong[-1]) == (int(a[-1]) + 1) % 10
    integer = sum(p["answer"].lstrip("-").isdigit() for p in problems)
    assert 0.5 * integer < changed < 0.7 * integer, (changed, integer)
    with pytest.raises(ValueError, match="noise rate"):
        with_noisy_answers(problems, 1.5, seed=0)
