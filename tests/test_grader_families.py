"""The answer families of issue 26, one table per family, with cases written for this file.

Each row is graded in-process (the pool adds only the deadline) with `eval`/`exec` of source
text trapped: any text reaching them fails the row (code objects are fine: that is how sympy's
lazy submodule imports run).
"""
import time

import pytest
from grader_traps import forbid_eval_of_text

from phi_reason.eval.extract import extract_answer, final_boxed, gold_answer
from phi_reason.eval.single import grade_in_process


@pytest.fixture
def no_eval(monkeypatch):
    grade_in_process(r"\boxed{\frac{1}{2}+\sqrt{2}x \le 2}", r"0.5+\sqrt2 x \leq 2")  # warm imports
    forbid_eval_of_text(monkeypatch)


def check(prediction, gold, expected, mode="eval"):
    result = grade_in_process(prediction, gold, mode)
    assert result.status in ("ok", "no_answer"), result
    assert result.correct is expected, (prediction, gold, result)


# 1. an answer split across several boxes
MULTI_BOX = [
    (r"The roots are \boxed{4}, \boxed{5} and \boxed{6}.", r"\{4, 5, 6\}", True),
    (r"so $\boxed{(1,3)} \quad\text{and}\quad \boxed{(3,1)}$", "(3,1), (1,3)", True),
    (r"$x_1 = \boxed{2}$ and $x_2 = \boxed{-7}$", "-7, 2", True),
    (r"\boxed{1} \text{ for part (a) and } \boxed{9}", "1, 9", True),
    (r"\boxed{4}, \boxed{5} and \boxed{6}", "4, 5", False),           # one root too many
    (r"It is \boxed{3} or \boxed{4}.", "4", False),                     # hedging never pays
    (r"First \boxed{3}. That was wrong, so the answer is \boxed{4}.", "4", True),  # a sentence ends
    (r"\boxed{2} then \boxed{8}", "8", True),                            # no connector: last box
]


@pytest.mark.parametrize("prediction,gold,expected", MULTI_BOX)
def test_multi_box(prediction, gold, expected, no_eval):
    check(prediction, gold, expected)


def test_multi_box_in_reward_mode_and_gold(no_eval):
    check(r"<think>\boxed{9}</think> They are \boxed{2} and \boxed{3}.", "2, 3", True, "reward")
    check(r"<think>maybe \boxed{2} and</think> \boxed{3}", "2, 3", False, "reward")
    assert gold_answer(r"so $\boxed{1}$ and $\boxed{5}$.") == "1, 5"
    assert final_boxed(r"\boxed{\boxed{2}}") == "2"  # a nested box is not a second part


# 2. closing-line formats
CLOSING_LINES = [
    ("Final Answer: The final answer is 42. I hope it is correct.", "42", True),
    ("Final Answer: The final answer is $\\frac{5}{6}$. I hope it is correct.", "5/6", True),
    (r"The first case gives \boxed{5}. Final Answer: The final answer is 6.", "6", True),
    (r"The first case gives \boxed{5}. Final Answer: The final answer is 6.", "5", False),
    ("Final Answer: The perimeter of $PQRS$ is 28.", "28", True),
    ("Final Answer: Tom finished 3 laps before noon.", "3", True),
    (r"The final answer is \boxed{12}.", "12", True),
]


@pytest.mark.parametrize("prediction,gold,expected", CLOSING_LINES)
def test_closing_lines(prediction, gold, expected, no_eval):
    check(prediction, gold, expected)


# 3. labelled answers
LABELLED = [
    (r"\boxed{(a,b)=(1,4)}", "(1,4)", True),
    (r"\boxed{(a,b)=(1,4)}", "(4,1)", False),
    (r"\boxed{PQ=7, RS=9}", "7, 9", True),
    (r"\boxed{|PQ|=3}", "3", True),
    (r"\boxed{A_1:A_2=2:5}", "2:5", True),
    (r"\boxed{g(t)=5t-1}", "5t-1", True),
    (r"\boxed{g(t)=5t-1}", "5t+1", False),
    (r"\boxed{\frac{AM}{MB}=\frac{2}{3}}", r"\frac{2}{3}", True),
    (r"\boxed{m=3, n=8}", "(3, 8)", True),
    (r"\boxed{(3, 8)}", "m=3, n=8", True),
    (r"\boxed{y=3x-2}", "3x - y - 2 = 0", True),
    (r"\boxed{\sin x = \frac{1}{3}}", r"\cos x = \frac{1}{3}", False),  # not a label
    (r"\boxed{2a+b}", "9 = 2a+b", False),
    (r"\boxed{4 \times 5 \times 2 = 40}", "40", True),                   # a stated computation
]


@pytest.mark.parametrize("prediction,gold,expected", LABELLED)
def test_labelled(prediction, gold, expected, no_eval):
    check(prediction, gold, expected)


# 4. relations and intervals
RELATIONS = [
    (r"\boxed{7 \geq y}", r"y \leq 7", True),
    (r"\boxed{-y < -2}", "y > 2", True),
    (r"\boxed{-y < -2}", "y < 2", False),
    (r"\boxed{y > 2}", r"y \geq 2", False),
    (r"\boxed{3y - 6 \le 0}", r"y \le 2", True),
    (r"\boxed{-3 < t < 8}", "(-3, 8)", True),
    (r"\boxed{-3 < t < 8}", "[-3, 8)", False),
    (r"\boxed{(-3, 8]}", r"-3 < t \le 8", True),
    (r"\boxed{9 > t \ge -3}", "[-3, 9)", True),
    (r"\boxed{0 < h(x) < 2}", "(0, 2)", True),
    (r"\boxed{x \geq 3}", r"[3, \infty)", True),
    (r"\boxed{x > 3}", r"[3, \infty)", False),
    (r"\boxed{x \neq 4}", "x != 4", True),
    (r"\boxed{x \neq 4}", "x != 5", False),
    (r"\boxed{x \in [-1, 6]}", r"-1 \le x \le 6", True),
]


@pytest.mark.parametrize("prediction,gold,expected", RELATIONS)
def test_relations(prediction, gold, expected, no_eval):
    check(prediction, gold, expected)


# 5. normalisation gaps
NORMALISATION = [
    (r"\boxed{12\textnormal{ km}}", "12", True),
    (r"\boxed{\textbf{12 km}}", "12", True),
    (r"\boxed{40 pct}", r"40\%", True),
    (r"\boxed{40 percentage}", "0.4", True),
    (r"\boxed{(3,5)or(5,3)}", "(5,3), (3,5)", True),
    ("\\boxed{77\\ }", "77", True),
    ("77\\", "77", True),
    (r"\boxed{\\frac{3}{4}}", "0.75", True),
    (r"\boxed{{2, 9}}", "2, 9", True),
    (r"\boxed{14{,}916}", "14916", True),
    (r"\boxed{x = 2.5 \approx 3}", "5/2", True),
    (r"\boxed{7m}", "7", False),                                          # 7 times m
    (r"\boxed{7 m}", "7", True),
    (r"\boxed{2\frac{1}{4}}", "2 1/4", True),
    (r"\boxed{1.25 \times 10^{-2}}", r"\frac{1}{80}", True),
]


@pytest.mark.parametrize("prediction,gold,expected", NORMALISATION)
def test_normalisation(prediction, gold, expected, no_eval):
    check(prediction, gold, expected)


# unboxed responses: the last math span or number, whichever is stated last
@pytest.mark.parametrize("text,expected", [
    ("We conclude that $y \\le 4$.", "y \\le 4"),
    ("so $x=2$ and the count is 7", "7"),
    ("-\\frac{7}{3}", "-\\frac{7}{3}"),
    ("Roughly 1 500 000 people", "1 500 000"),
    ("It costs 3,75 euros", "3.75"),
    ("code ABC9D", None),
])
def test_unboxed_extraction(text, expected):
    assert extract_answer(text) == expected


# what must not change
def test_exactness_and_reward_gate_are_kept(no_eval):
    check(r"\boxed{\frac{1}{2^{98}}}", r"\frac{1}{2^{99}}", False)   # no float tolerance
    check(r"\boxed{0.333}", r"\frac{1}{3}", False)                   # 3 digits are not 1/3
    check(r"<think>\boxed{4}", "4", False, "reward")                  # think never closed
    check(r"\boxed{4}", "4", False, "reward")


def test_hostile_family_inputs_are_bounded():
    hostile = [
        "\\boxed{1}, " * 20_000,
        "$" * 200_000,
        "a" * 50_000 + "=1",
        "(" + "a," * 5_000 + "a)=" + "(1)",
        "<" * 50_000,
        "Final Answer: " * 20_000,
    ]
    for text in hostile:
        start = time.monotonic()
        grade_in_process(text, "1")
        assert time.monotonic() - start < 5.0, text[:40]
