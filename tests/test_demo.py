"""`phi-reason demo --quick`: the four-stage recipe end to end through the CLI."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_accuracy_rises(tmp_path):
    out = tmp_path / "demo"
    # As a user runs it: one CPU device, not the 8 virtual devices conftest.py sets up for the
    # sharding tests (the trainer would shard the batch over them and round differently).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "phi_reason.cli", "demo", "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s["name"] for s in summary["stages"]] == ["base", "midtrain", "sft", "dpo", "rl"]
    acc = {name: s["accuracy"] for name, s in stages.items()}
    print("demo accuracies:", acc)
    # At 100 held-out problems (SE ~0.045) only the large steps separate on every CPU: mid-training
    # over base, SFT over mid-training (~3 SE), and the recipe's end over mid-training. SFT -> DPO
    # -> RL gains need the full demo's 2000 problems (README); rounding moves them by a problem.
    assert acc["sft"] > acc["midtrain"] > acc["base"] and acc["rl"] > acc["midtrain"], acc
    assert (out / "demo.png").stat().st_size > 0
    assert summary["rl_reward_curve"], "RL metrics were not recorded"
    # held-out accuracy at intervals through RL: step 0 (the DPO model) and every eval_every steps
    assert [s for s, _, _ in summary["rl_eval_curve"]][:2] == [0, 6], summary["rl_eval_curve"]
    for s in summary["stages"]:
        assert 0 <= s["stderr"] <= 0.5 and len(s["correct"]) == summary["heldout_problems"]
    assert all("gain_stderr" in s for s in summary["stages"][1:])
    for stage in ("midtrain", "sft", "rl"):
        assert (out / "configs" / f"{stage}.yaml").exists()
        assert (out / stage / "final").is_dir()
    assert "held-out acc" in proc.stdout


def test_demo_refuses_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "phi_reason.cli", "demo", "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_standard_errors_by_hand():
    from phi_reason.demo import binomial_se, format_table, paired_se, smooth

    # 3 of 4 right: sqrt(0.75 * 0.25 / 4) = sqrt(0.046875) = 0.216506...
    assert abs(binomial_se([1, 1, 1, 0]) - 0.2165063509) < 1e-9
    assert binomial_se([0, 0, 0]) == 0.0
    # d = [1, 0, 0, -1, 1]: mean 0.2, deviations 0.8, -0.2, -0.2, -1.2, 0.8 -> squares sum
    # 0.64 + 0.04 + 0.04 + 1.44 + 0.64 = 2.8; var = 2.8 / 5 = 0.56; SE = sqrt(0.56 / 5) = 0.334664
    now, before = [1, 1, 0, 0, 1], [0, 1, 0, 1, 0]
    assert abs(paired_se(now, before) - 0.3346640106) < 1e-9
    # against an all-wrong stage the paired SE is the binomial SE
    assert abs(paired_se([1, 1, 1, 0], [0] * 4) - binomial_se([1, 1, 1, 0])) < 1e-12
    # the same answers: no uncertainty in the gain
    assert paired_se(now, now) == 0.0
    assert smooth([1.0, 0.0, 0.0], alpha=0.5) == [1.0, 0.5, 0.25]
    rows = [{"name": "sft", "accuracy": 0.4, "stderr": 0.2191, "mean_response_tokens": 20.0,
             "train_seconds": 3},
            {"name": "dpo", "accuracy": 0.6, "stderr": 0.2191, "gain": 0.2,
             "gain_stderr": 0.1, "mean_response_tokens": 20.0, "train_seconds": 3}]
    table = format_table(rows)
    assert "+0.200" in table[2] and "2.0" in table[2] and "+- SE" in table[0]
