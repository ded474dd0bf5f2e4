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
    assert acc["rl"] > acc["sft"] > acc["base"], acc
    assert (out / "demo.png").stat().st_size > 0
    assert summary["rl_reward_curve"], "RL metrics were not recorded"
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
