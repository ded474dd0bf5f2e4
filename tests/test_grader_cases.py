"""Hand-written grading table: equivalent forms, near misses, structures, units, boxes, think
blocks.

Each verdict was decided by hand from the mathematics, not by running the grader.  The table runs
through `grade_in_process` (exactly what a sandbox worker runs) so it stays fast; the sandbox
itself is exercised in test_grader_pool.py.
"""

import pytest
from grader_traps import forbid_eval_of_text

from phi_reason.eval.single import grade_in_process


def B(x):
    return "Some reasoning... so the answer is $\\boxed{" + x + "}$."


CASES = [
    # --- equivalent numeric forms
    (B("\\frac{1}{2}"), "0.5", "eval", True),
    (B("0.5"), "\\frac12", "eval", True),
    (B("\\dfrac{3}{4}"), "\\frac 34", "eval", True),
    (B("\\tfrac{6}{8}"), "\\frac{3}{4}", "eval", True),
    (B("2^{-98}"), "\\frac{1}{2^{98}}", "eval", True),
    (B("1.8"), "1\\frac{4}{5}", "eval", True),
    (B("137.5"), "137 \\frac{1}{2}", "eval", True),
    (B("-\\frac{35}{9}"), "\\frac{-35}{9}", "eval", True),
    (B("27"), 27.0, "eval", True),                                   # AMC golds are floats
    (B("0.333333"), "\\frac{1}{3}", "eval", True),                  # 6 significant digits
    (B("\\frac{1}{3}"), "0.333", "eval", True),                     # gold fixes the rounding
    (B("\\pi"), "3.14", "eval", True),
    # --- near misses that float rounding or sloppy parsing would accept
    (B("\\frac{1}{2^{99}}"), "\\frac{1}{2^{98}}", "eval", False),
    (B("50"), "0.5", "eval", False),
    (B("0.33"), "\\frac{1}{3}", "eval", False),                     # too imprecise
    (B("3.14"), "\\pi", "eval", False),
    (B("\\frac{14}{5}"), "\\frac{14}{3}", "eval", False),
    (B("3\\sqrt{14}"), "3\\sqrt{13}", "eval", False),
    (B("6 + 5i"), "6 - 5i", "eval", False),
    (B("x^3+3x+6"), "x^3+3x-6", "eval", False),
    (B("10^{-12}"), "10^{-13}", "eval", False),
    (B("1000001"), "1000000", "eval", False),
    (B("2\\pi"), "\\pi", "eval", False),
    (B("-7"), "7", "eval", False),
    # --- symbolic / radicals / complex
    (B("\\sqrt{20}"), "2\\sqrt{5}", "eval", True),
    (B("\\frac{1}{\\sqrt{3}}"), "\\frac{\\sqrt{3}}{3}", "eval", True),
    (B("\\frac{\\sqrt2}{2}"), "\\frac{1}{\\sqrt{2}}", "eval", True),
    (B("3+2x"), "2x+3", "eval", True),
    (B("ab+2a+5b+10"), "(a+5)(b+2)", "eval", True),
    (B("ab+2a+5b+11"), "(a+5)(b+2)", "eval", False),
    (B("-5i + 6"), "6 - 5i", "eval", True),
    (B("i^2"), "-1", "eval", True),
    (B("\\frac{9a+11}{20}"), "\\frac{11+9a}{20}", "eval", True),
    (B("\\cot x"), "\\frac{\\cos x}{\\sin x}", "eval", True),
    # --- equations
    (B("x = 3"), "3", "eval", True),
    (B("3"), "x=3", "eval", True),
    (B("2x+3"), "y = 2x + 3", "eval", True),
    (B("y = 3 + 2x"), "y = 2x + 3", "eval", True),
    (B("-5x + 7y - 11z - 4 = 0"), "5x - 7y + 11z + 4 = 0", "eval", True),
    (B("10x - 14y + 22z + 8 = 0"), "5x - 7y + 11z + 4 = 0", "eval", True),
    (B("5x - 7y + 11z + 5 = 0"), "5x - 7y + 11z + 4 = 0", "eval", False),
    # --- sets (order-free), lists, plus-minus
    (B("\\{-2, 1\\pm\\sqrt{5}\\}"), "\\{1\\pm\\sqrt{5},-2\\}", "eval", True),
    (B("1-\\sqrt5, -2, 1+\\sqrt5"), "\\{1\\pm\\sqrt{5},-2\\}", "eval", True),
    (B("\\{1, 2\\}"), "\\{1,2,3\\}", "eval", False),
    (B("1, -2"), "-2,1", "eval", True),
    (B("7, 5, 3"), "3, 5, 7", "eval", True),
    (B("3, 5"), "3, 5, 7", "eval", False),
    (B("1+\\sqrt{19}, 1-\\sqrt{19}"), "1 \\pm \\sqrt{19}", "eval", True),
    # --- intervals (ends matter) and unions
    (B("(3,4]"), "(3,4]", "eval", True),
    (B("[3,4]"), "(3,4]", "eval", False),
    (B("(3,4)"), "(3,4]", "eval", False),
    (B("[-2, 7]"), "x \\in [-2,7]", "eval", True),
    (B("(3, \\infty)\\cup(-\\infty, 2)"), "(-\\infty, 2) \\cup (3, \\infty)", "eval", True),
    (B("(-\\infty, 2] \\cup (3, \\infty)"), "(-\\infty, 2) \\cup (3, \\infty)", "eval", False),
    (B("\\left(\\frac35, \\frac83\\right]"), "\\left(\\frac{3}{5},\\frac{8}{3}\\right]",
     "eval", True),
    # --- tuples (order matters)
    (B("(6, 31, -1)"), "(6,31,-1)", "eval", True),
    (B("(31, 6, -1)"), "(6,31,-1)", "eval", False),
    (B("\\left( 3, \\frac{\\pi}{2} \\right)"), "(3, \\pi/2)", "eval", True),
    (B("(3, \\pi)"), "\\left( 3, \\frac{\\pi}{2} \\right)", "eval", False),
    # --- matrices
    (B("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"),
     "\\begin{pmatrix} -\\frac13 \\\\ \\frac{2}{3} \\\\ \\frac53 \\end{pmatrix}", "eval", True),
    (B("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}"),
     "\\begin{bmatrix} -1 & 0 \\\\ 0 & -1 \\end{bmatrix}", "eval", True),
    (B("\\begin{pmatrix} -1 & 0 \\\\ 0 & 1 \\end{pmatrix}"),
     "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "eval", False),
    (B("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
     "\\begin{pmatrix} 1 \\\\ 2 \\\\ 0 \\end{pmatrix}", "eval", False),
    # --- degrees, percent, units, currency, thousands separators, bases, words
    (B("90"), "90^\\circ", "eval", True),
    (B("90^{\\circ}"), "90", "eval", True),
    (B("89^\\circ"), "90^\\circ", "eval", False),
    (B("10\\%"), "10", "eval", True),
    (B("0.1"), "10\\%", "eval", True),
    (B("864"), "864 \\mbox{ inches}^2", "eval", True),
    (B("5.4"), "5.4 \\text{ cents}", "eval", True),
    (B("15 \\text{ cm}^2"), "15", "eval", True),
    (B("\\$18.90"), "18.9", "eval", True),
    (B("10080"), "10,\\!080", "eval", True),
    (B("11,111,111,100"), "11,\\! 111,\\! 111,\\! 100", "eval", True),
    (B("1\\,000"), "1000", "eval", True),
    (B("52_{8}"), "52_8", "eval", True),
    (B("42"), "52_8", "eval", False),
    (B("\\text{(C)}"), "C", "eval", True),
    (B("(B)"), "\\text{(C)}", "eval", False),
    (B("East"), "\\text{east}", "eval", True),
    (B("Evelny"), "\\text{Evelyn}", "eval", False),                 # an anagram is not a match
    (B("\\text{ellipse}"), "\\text{circle}", "eval", False),
    # --- extraction: multiple boxes, nested braces, fallbacks
    ("first \\boxed{2}, then corrected: \\boxed{3}", "3", "eval", True),
    ("first \\boxed{3}, then corrected: \\boxed{2}", "3", "eval", False),
    ("\\boxed{\\frac{\\sqrt{\\frac{1}{4}}}{2}}", "\\frac14", "eval", True),
    ("\\fbox{12}", "12", "eval", True),
    ("The final answer is $\\frac{3}{2}$.", "1.5", "eval", True),
    ("so the total is 1,250 dollars", "1250", "eval", True),
    ("Janet earns 9 * 2 = 18 dollars.", "Janet sells 9 eggs... #### 18", "eval", True),
    ("no numbers here", "5", "eval", False),
    # --- reward mode: only the box after a closed think block counts
    ("<think>maybe \\boxed{5}</think> The answer is \\boxed{5}.", "5", "reward", True),
    ("<think>maybe \\boxed{5}</think> The answer is 5.", "5", "reward", False),
    ("<think>long thoughts \\boxed{5} never closed", "5", "reward", False),
    ("<think>\\boxed{4}</think>So \\boxed{6}", "4", "reward", False),
    ("\\boxed{5}</think> and finally \\boxed{5}", "5", "reward", True),
]


@pytest.fixture(scope="module")
def warm():
    grade_in_process("\\boxed{\\sqrt{2}x+\\frac{1}{2}}", "0.5+\\sqrt2 x")  # imports happen here


@pytest.fixture
def no_eval(warm, monkeypatch):
    """Every table case also proves that grading never evaluates source text with Python's
    eval/exec (code objects are fine: that is how sympy's lazy submodule imports run)."""
    forbid_eval_of_text(monkeypatch)


@pytest.mark.parametrize("prediction,gold,mode,expected", CASES,
                         ids=[f"{i:02d}" for i in range(len(CASES))])
def test_grading_table(prediction, gold, mode, expected, no_eval):
    result = grade_in_process(prediction, gold, mode)
    assert result.correct is expected, (prediction, gold, result)
    assert result.status in ("ok", "no_answer"), result  # an eval trap would surface as "error"


def test_table_is_large_and_balanced():
    assert len(CASES) >= 60
    verdicts = [c[3] for c in CASES]
    assert verdicts.count(False) >= 25 and verdicts.count(True) >= 25


def test_statuses():
    assert grade_in_process("no box here", "5", "reward").status == "no_answer"
    assert grade_in_process("<think>x</think> \\boxed{5}", "5", "reward").status == "ok"
    assert grade_in_process(12345, "5").status == "error"  # not a string
