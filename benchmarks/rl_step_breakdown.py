"""Where an RL step's time goes: sampling, the wait for the grader, the old/reference log-prob
passes and the policy updates, per step of a short RL run (the real `train_rl` path: grader pool,
trainer loop, metrics), medians over the steps after the first (which compiles).

Baseline: the rollout share of step time published for verl, OpenRLHF and APRIL (45-90%): the
script prints our rollout share (sampling + grading wait + log-prob passes) against that range,
plus tokens generated / trained and RL tokens/s per device (NeMo-RL: all tokens of the step's
rollouts / step time / devices).

    python benchmarks/rl_step_breakdown.py                               # tiny preset, CPU
    python benchmarks/rl_step_breakdown.py --steps 8 --new-tokens 96 \
        --out benchmarks/results/rl_step_breakdown_cpu.md
    python benchmarks/rl_step_breakdown.py --preset phi4-mini --new-tokens 1024 --steps 3  # GPU
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile

import jax

from phi_reason.jobs.rl import train_rl
from phi_reason.jobs.rl_config import load_rl_config

TINY_RL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny_rl.yaml")
PHASES = ("sample", "grade_wait", "logprob", "update")
ROLLOUT = ("sample", "grade_wait", "logprob")
PUBLISHED_ROLLOUT_SHARE = (0.45, 0.90)  # verl / OpenRLHF / APRIL measurements of rollout share


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args, out_dir: str):
    kv = [f"model.preset={args.preset}", f"rl.steps={args.steps}",
          f"rl.max_new_tokens={args.new_tokens}", f"rl.prompts_per_step={args.prompts}",
          f"rl.group_size={args.group}", f"train.batch_size={args.prompts * args.group}",
          # every sampled group is trained on, whatever its rewards: the update phase always runs
          "rl.dynamic_sampling=false", "rl.eval_problems=0", f"train.pg.beta={args.beta}",
          f"output.dir={out_dir}", f"output.save_every={10 ** 9}", "output.progress=false"]
    return train_rl(load_rl_config(TINY_RL, kv + list(args.override)))


def report(history, args) -> str:
    steady = history[1:] or history
    med = {p: statistics.median(h.get(f"time/{p}_s", 0.0) for h in steady) for p in PHASES}
    step = statistics.median(h["time/step_s"] for h in steady)
    rollout = sum(med[p] for p in ROLLOUT)
    lines = [f"# RL step breakdown: preset {args.preset}, {args.prompts} prompts x {args.group} "
             f"samples, <= {args.new_tokens} new tokens, beta {args.beta}",
             "", f"Device: {jax.devices()[0].device_kind} x {jax.device_count()} "
             f"({cpu_name()}); jax {jax.__version__}; medians of steps 2-{len(history)}.", "",
             "| phase | median s | share of step |", "|---|---:|---:|"]
    for p in PHASES:
        lines.append(f"| {p} | {med[p]:.3f} | {med[p] / step:.1%} |")
    other = step - sum(med.values())
    lines += [f"| other (scoring, advantages, metrics) | {other:.3f} | {other / step:.1%} |",
              f"| **step** | {step:.3f} | 100% |", ""]
    lo, hi = PUBLISHED_ROLLOUT_SHARE
    lines.append(f"Rollout share (sample + grade wait + log-prob passes): {rollout / step:.1%} "
                 f"(published for verl / OpenRLHF / APRIL: {lo:.0%}-{hi:.0%}; "
                 f"ratio to their midpoint {rollout / step / ((lo + hi) / 2):.2f}).")
    gen = statistics.median(h["tokens/generated"] for h in steady)
    trained = statistics.median(h["tokens/trained"] for h in steady)
    tps = statistics.median(h["time/tokens_per_s_per_device"] for h in steady)
    lines.append(f"Tokens per step: generated {gen:.0f}, trained {trained:.0f}; "
                 f"RL tokens/s per device {tps:.1f}; generated tokens/s during sampling "
                 f"{gen / max(med['sample'], 1e-9):.1f}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--beta", type=float, default=0.01, help="KL weight (>0: a reference pass)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("override", nargs="*", help="extra config overrides, key=value")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, tmp)
    text = report(result.history, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
