"""Pair selection for Rollout DPO (the end-to-end file test is in test_rl.py, beside its model)."""
import pathlib

import numpy as np
import pytest

from phi_reason.config import RunConfigError, load_run_config
from phi_reason.jobs.rollout_dpo import RolloutDPOConfig, make_pairs


def test_make_pairs_chosen_correct_rejected_incorrect():
    texts = ["ok1", "bad1", "ok2", "bad2", "cut", "ok3"]
    correct = [True, False, True, False, False, True]
    finished = [True, True, True, True, False, False]  # "cut" and "ok3" were truncated
    rng = np.random.default_rng(0)
    pairs = make_pairs(texts, correct, finished, 5, rng)
    assert len(pairs) == 2
    assert {c for c, _ in pairs} == {"ok1", "ok2"} and {r for _, r in pairs} == {"bad1", "bad2"}
    pairs = make_pairs(texts, correct, finished, 5, rng, rejected_truncated=True)
    assert len(pairs) == 2 and {c for c, _ in pairs} == {"ok1", "ok2"}
    assert {r for _, r in pairs} <= {"bad1", "bad2", "cut"}
    assert len(make_pairs(texts, correct, finished, 1, rng)) == 1


def test_make_pairs_needs_both_kinds():
    rng = np.random.default_rng(0)
    assert make_pairs(["a", "b"], [True, True], [True, True], 3, rng) == []
    assert make_pairs(["a", "b"], [False, False], [True, True], 3, rng) == []
    # A truncated correct answer is never chosen.
    assert make_pairs(["a", "b"], [True, False], [False, True], 3, rng) == []
    # Identical texts are not a preference.
    assert make_pairs(["x", "x"], [True, False], [True, True], 3, rng) == []


def test_config_validation():
    run = load_run_config(None, ["rollout.samples_per_prompt=1"], schema=RolloutDPOConfig)
    with pytest.raises(RunConfigError, match="samples_per_prompt"):
        run.validate()
    path = pathlib.Path(__file__).parents[1] / "configs" / "phi4_mini_reasoning_rollout_dpo.yaml"
    run = load_run_config(str(path), schema=RolloutDPOConfig)
    run.validate()
    assert str(run.output_path()).endswith("runs/rollout_dpo/pairs.jsonl")
