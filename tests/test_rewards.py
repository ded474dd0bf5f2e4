"""Rewards vs hand-computed values of the Phi-4-reasoning-plus and DAPO formulas."""
import math

import pytest

from phi_reason.train.rewards import (
    PHI4_PLUS_REWARDS,
    REWARDS,
    Completion,
    RewardSpec,
    make_reward_fn,
    repetition_penalty,
    soft_overlong_penalty,
    think_block_ok,
)

GOOD = "<think>reasoning</think> so \\boxed{4}"


def plus(length, correct=True, finished=True, text=GOOD):
    return REWARDS["phi4_plus_length"](Completion(text, length, finished, correct))


# Hand-computed: correct r = min(1, max(L-25600,0)/6144); wrong r = min(1, L/3702);
# 0.25*(1+cos(pi*0.5)) = 0.25, 0.25*(1+cos 0) = 0.5, 0.25*(1+cos pi) = 0.
@pytest.mark.parametrize("length,expected", [
    (0, 1.0), (3702, 1.0), (25600, 1.0), (28672, 0.75), (31744, 0.5)])
def test_plus_correct(length, expected):
    assert plus(length) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("length,expected", [
    (0, -1.0), (1851, -0.75), (3702, -0.5), (25600, -0.5), (28672, -0.5), (31744, -0.5)])
def test_plus_wrong(length, expected):
    assert plus(length, correct=False) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("length", [0, 3702, 25600, 28672, 31744])
@pytest.mark.parametrize("correct", [True, False])
def test_plus_incomplete_and_malformed(length, correct):
    """No stop token within the budget is incomplete (-0.5) whatever the text; only a finished
    response is judged on its think block (-1.0 when malformed)."""
    assert plus(length, correct=correct, finished=False) == -0.5
    for bad in ("no think block \\boxed{4}", "<think>a</think><think>b</think>",
                "<think>never closed", "preamble <think>a</think>", "</think> <think>"):
        assert plus(length, correct=correct, finished=True, text=bad) == -1.0
        assert plus(length, correct=correct, finished=False, text=bad) == -0.5


def test_plus_cut_while_thinking_is_incomplete():
    """The common truncation: the budget runs out inside the think block (no </think>, no stop
    token). That is the incomplete case (-0.5), not a malformed response (-1.0)."""
    cut = "<think>Let me expand (a+b)^2 term by term, then"
    assert not think_block_ok(cut)
    assert plus(31744, correct=False, finished=False, text=cut) == -0.5
    assert plus(31744, correct=False, finished=True, text=cut) == -1.0  # stopped: malformed
    fn = make_reward_fn(PHI4_PLUS_REWARDS)
    # the composite: 8/13 * -0.5 plus the repetition term (8 distinct words: -5/8)
    assert fn(Completion(cut, 31744, False, False)) == pytest.approx(
        8 / 13 * -0.5 + 1 / 13 * -5 / 8)


def test_plus_constants_configurable():
    fn = REWARDS["phi4_plus_length"]
    c = Completion(GOOD, 150, True, True)
    # r = (150 - 100) / (200 - 100) = 0.5 -> 0.75
    assert fn(c, l_max=200, l_pos_control=100) == pytest.approx(0.75)
    assert fn(Completion("x", 10, True, True), check_think=False) == 1.0


def test_think_block_ok():
    assert think_block_ok("  <think>x</think>y")
    assert not think_block_ok("x<think>y</think>")


def test_binary():
    fn = REWARDS["binary"]
    assert fn(Completion("", 5, True, True)) == 1.0
    assert fn(Completion("", 5, True, False)) == -1.0
    assert fn(Completion("", 5, False, True)) == -1.0
    assert fn(Completion("", 5, False, True), truncated_is_wrong=False) == 1.0


def _words(prefix, n):
    return [f"{prefix}{i}" for i in range(n)]


def test_repetition_penalty_constructed_texts():
    # Fewer than 5 words: no 5-grams, no penalty.
    assert repetition_penalty("a b c d") == 0.0
    # 100 distinct words: nothing frequent; most common 5-gram occurs once: 1 / (100/5).
    assert repetition_penalty(" ".join(_words("w", 100))) == pytest.approx(-1 / 20)
    # 50 distinct words then "p q r s t" x 7 (85 words, 81 5-gram positions):
    # distinct 5-grams = 46 (unique part) + 4 (crossing) + 5 (rotations of the repeat) = 55;
    # the aligned rotation occurs 7 times, the others 6 -> all 5 frequent (> 5): 5/55;
    # max_count / (words/5) = 7 / 17 dominates.
    text = " ".join(_words("u", 50) + "p q r s t".split() * 7)
    assert repetition_penalty(text) == pytest.approx(-7 / 17)
    # 10-word cycle x 6 (60 words, 56 positions): rotations 0..5 occur 6 times, 6..9 occur 5 times
    # (not "more than 5"): frequent/total = 6/10 beats max_count/(60/5) = 6/12.
    text = " ".join("a b c d e f g h i j".split() * 6)
    assert repetition_penalty(text) == pytest.approx(-0.6)
    # One word repeated 30 times: one 5-gram, 26 times: 26 / 6 > 1, clipped to -1.
    assert repetition_penalty(" ".join(["a"] * 30)) == -1.0
    assert repetition_penalty(" ".join(["a"] * 30), clip=False) == pytest.approx(-26 / 6)


@pytest.mark.parametrize("length,expected", [(0, 0.0), (16, 0.0), (17, -0.25), (18, -0.5),
                                             (20, -1.0), (21, -1.0)])
def test_dapo_soft_overlong(length, expected):
    assert soft_overlong_penalty(length, l_max=20, l_cache=4) == pytest.approx(expected)
    assert REWARDS["dapo_overlong"](Completion("", length, True, True), l_max=20,
                                    l_cache=4) == pytest.approx(expected)


def test_composite_plus_recipe_weights():
    fn = make_reward_fn(PHI4_PLUS_REWARDS)
    text = "<think> " + " ".join(_words("w", 100)) + " </think> \\boxed{1}"
    # 103 words ("<think>", 100, "</think>", "\\boxed{1}") -> max count 1 -> R_rep = -5/103;
    # correct at L=28672 -> 0.75.
    c = Completion(text, 28672, True, True)
    assert fn(c) == pytest.approx(8 / 13 * 0.75 + 1 / 13 * (-5 / 103))
    c = Completion(text, 0, True, False)
    assert fn(c) == pytest.approx(8 / 13 * -1.0 + 1 / 13 * (-5 / 103))


def test_composite_from_dicts_and_errors():
    fn = make_reward_fn([{"name": "binary", "weight": 2.0},
                         {"name": "dapo_overlong", "weight": 1.0,
                          "kwargs": {"l_max": 20, "l_cache": 4}}])
    assert fn(Completion("", 18, True, True)) == pytest.approx(2.0 - 0.5)
    with pytest.raises(ValueError, match="unknown reward 'binery'"):
        make_reward_fn([RewardSpec("binery")])
    with pytest.raises(ValueError, match="bad kwargs"):
        make_reward_fn([RewardSpec("binary", 1.0, {"correct": 2})])
    with pytest.raises(ValueError, match="unknown keys"):
        make_reward_fn([{"name": "binary", "wieght": 1.0}])
    with pytest.raises(ValueError, match="l_cache"):
        make_reward_fn([RewardSpec("dapo_overlong", 1.0, {"l_max": 4, "l_cache": 8})])
    assert math.isclose(sum(s.weight for s in PHI4_PLUS_REWARDS), 9 / 13)
