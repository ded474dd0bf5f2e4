"""Trainer overhead: the full trainer (grain pipeline, packing, metrics JSONL + TensorBoard,
progress bar, checkpoint manager) versus the bare jitted SFT step on the same batches.

Both run the same compiled step on the same device; the bare loop gets its batches from a
pre-built list and blocks once at the end, so the difference is what the trainer adds per step.
Runs alternate (bare, trainer, bare, trainer, ...) so machine load hits both alike; medians are
reported. Goal: overhead < 5%.

    python benchmarks/trainer_overhead.py                       # 30m-style model, CPU or GPU
    python benchmarks/trainer_overhead.py --size tiny --steps 30 --out benchmarks/results/x.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import jax

from phi_reason.config import load_run_config
from phi_reason.jobs import build
from phi_reason.jobs.trainer import BatchSteps, Trainer
from phi_reason.train.steps import make_sft_step

TINY_SFT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                        "tiny_sft.yaml")
SIZES = {
    # ModelConfig overrides on the "tiny" preset, seq_len, batch
    "tiny": ({}, 256, 8),
    "30m": (dict(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                 rope_short_factor=[1.0] * 24, rope_long_factor=[1.0] * 24), 512, 8),
}


def write_data(path: str, n: int = 4000) -> None:
    r = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(10, 10 ** r.randint(2, 30)), r.randint(10, 10 ** r.randint(2, 30))
            msg = [{"role": "user", "content": f"What is {a} + {b}?"},
                   {"role": "assistant",
                    "content": f"<think>add {a} and {b} digit by digit</think> \\boxed{{{a + b}}}"}]
            f.write(json.dumps({"messages": msg}) + "\n")


def run_config(size: str, data: str, out: str, steps: int):
    over, seq, batch = SIZES[size]
    kv = [f"data.train_files=[{data}]", f"data.seq_len={seq}", f"train.batch_size={batch}",
          f"train.steps={steps}", f"output.dir={out}", f"output.save_every={10 ** 9}",
          "output.tensorboard=true", "output.progress=true", "data.packed=true"]
    kv += [f"model.overrides.{k}={json.dumps(v)}" for k, v in over.items()]
    return load_run_config(TINY_SFT, kv)


class Timer:
    """Hook: block on the state at step `start` and at the last step; the time between them."""

    def __init__(self, start: int, end: int):
        self.start, self.end, self.t0, self.t1 = start, end, None, None

    def __call__(self, trainer, step):
        if step in (self.start, self.end):
            jax.block_until_ready(trainer.state.params)
            if step == self.start:
                self.t0 = time.perf_counter()
            else:
                self.t1 = time.perf_counter()


def time_trainer(run, warmup: int, steps: int) -> float:
    mesh, cfg, params, data, total, tc = build.setup_run(run, "sft")
    state = build.new_train_state(cfg, tc, params, mesh)
    timer = Timer(warmup, steps)
    trainer = Trainer(run, cfg, BatchSteps(state, STEP[0], data), total, hooks=[timer])
    trainer.train()
    return timer.t1 - timer.t0


def time_bare(run, warmup: int, steps: int) -> float:
    mesh, cfg, params, data, total, tc = build.setup_run(run, "sft")
    state = build.new_train_state(cfg, tc, params, mesh)
    batches = [next(data) for _ in range(steps)]
    for b in batches[:warmup]:
        state, _ = STEP[0](state, b)
    jax.block_until_ready(state.params)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        state, m = STEP[0](state, b)
    jax.block_until_ready(state.params)
    return time.perf_counter() - t0


STEP = [None]  # one compiled step shared by both loops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="30m")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="also write the markdown result here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.jsonl")
        write_data(data)
        bare, trained = [], []
        for i in range(args.repeats):
            run = run_config(args.size, data, os.path.join(tmp, f"run{i}"), args.steps)
            if STEP[0] is None:
                cfg = build.build_model(run)[0]
                STEP[0] = make_sft_step(cfg, run.train)
            bare.append(time_bare(run, args.warmup, args.steps))
            trained.append(time_trainer(run, args.warmup, args.steps))
            print(f"repeat {i}: bare {bare[-1]:.3f}s trainer {trained[-1]:.3f}s", flush=True)
    n = args.steps - args.warmup
    b, t = statistics.median(bare), statistics.median(trained)
    dev = jax.devices()[0]
    text = (f"# Trainer overhead vs the bare step\n\nDevice: {dev.device_kind} ({dev.platform}) "
            f"x{jax.device_count()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} at the end; "
            f"jax {jax.__version__}\n\n"
            f"Model size `{args.size}` (seq {SIZES[args.size][1]}, batch {SIZES[args.size][2]}, "
            f"packed grain pipeline, JSONL + TensorBoard + tqdm on), {n} timed steps, median of "
            f"{args.repeats} alternating repeats.\n\n"
            f"| loop | seconds / step |\n|---|---|\n| bare jitted step | {b / n:.4f} |\n"
            f"| trainer | {t / n:.4f} |\n\n**Overhead: {100 * (t / b - 1):+.1f}%** "
            f"(goal < 5%)\n\nRaw: bare {['%.3f' % x for x in bare]}, "
            f"trainer {['%.3f' % x for x in trained]}\n")
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    sys.exit(main())
