"""Paged KV engine vs the static-cache sampler on CPU: cost follows live tokens, not capacity.

Model: 4 layers, hidden 256, 4 heads (4 KV, head_dim 64), MLP 512, vocab 512 (2.6M params), fp32.

1. Capacity: 8 rows with 8-token prompts and a budget that sets the row capacity S to 256, 4096
   or 16384 tokens; the decode step time is timed while the rows hold only 8-100 tokens (chunks
   of 16 steps between `interrupt()` calls, median of chunks 2-7, per step). The static sampler's
   cache is [L, slots, nKV, S, hd] and every step attends over all S; the paged pool holds the
   same capacity but a step reads only each row's blocks.
2. Long tail: 16 rows of 16-token prompts, 15 with 32 new tokens and one with 512 (16x longer).
   Cost of the batch in one call vs the same rows run apart (the 15 short rows in one call, then
   the long row alone: the work the batch contains), per engine; and useful tokens/s vs the
   static sampler and transformers `generate` (one padded batch, 512 new tokens, as HF runs it).

Greedy, no stop tokens, medians of --runs timed runs after a warm-up (compilation excluded).
Usage: python benchmarks/paged_decode_cpu.py [--runs 3] [--out FILE.md] [--skip-hf]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

PROMPT, ROWS, CHUNK = 8, 8, 16
CAPACITIES = (256, 4096, 16384)
TAIL_ROWS, TAIL_PROMPT, SHORT, LONG = 16, 16, 32, 512


def config():
    from phi_reason.model.config import ModelConfig

    return ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=16384 + 64,
                       original_max_position_embeddings=16384 + 64, tie_word_embeddings=False,
                       initializer_range=0.1)


def engines():
    from phi_reason.engine.paged_sampler import generate_paged
    from phi_reason.engine.sampler import generate

    return {"static": generate, "paged": generate_paged}


def step_time(run, params, cfg, capacity) -> float:
    """Seconds per decode step while the rows are short, at row capacity `capacity`."""
    from phi_reason.engine.sampler import GenerationInterrupted

    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (ROWS, PROMPT)).tolist()
    stamps = []

    def interrupt():
        stamps.append(time.perf_counter())
        return len(stamps) > 7

    def go():
        stamps.clear()
        try:
            run(params, cfg, prompts, capacity - PROMPT, stop_tokens=(), num_slots=ROWS,
                interrupt=interrupt, interrupt_every=CHUNK, **_chunk_kw(run))
        except GenerationInterrupted:
            pass
        return [(b - a) / CHUNK for a, b in zip(stamps[1:], stamps[2:])]

    go()  # compile
    return statistics.median(go())


def _chunk_kw(run):
    return {"chunk_steps": CHUNK} if run.__name__ == "generate_paged" else {}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed(fn, runs) -> float:
    fn()
    return statistics.median(_timed(fn) for _ in range(runs))


def long_tail(run, params, cfg, runs):
    """(batch seconds, apart seconds) for the long-tail rows on engine `run`."""
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, cfg.vocab_size, (TAIL_ROWS, TAIL_PROMPT)).tolist()
    budgets = [SHORT] * (TAIL_ROWS - 1) + [LONG]
    kw = dict(stop_tokens=(), **_chunk_kw(run))

    def batch():
        return run(params, cfg, prompts, budgets, num_slots=TAIL_ROWS, **kw)

    def apart():
        run(params, cfg, prompts[:-1], SHORT, num_slots=TAIL_ROWS - 1, **kw)
        run(params, cfg, prompts[-1:], LONG, num_slots=1, **kw)

    return timed(batch, runs), timed(apart, runs)


def hf_long_tail(cfg, runs) -> float:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**cfg.to_hf())).eval()
    ids = torch.randint(0, cfg.vocab_size, (TAIL_ROWS, TAIL_PROMPT))

    def go():
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=LONG,
                           min_new_tokens=LONG, do_sample=False, eos_token_id=None,
                           pad_token_id=0)

    return timed(go, runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import torch

    from phi_reason.model.params import init_params, param_count

    torch.set_num_threads(os.cpu_count())
    cfg = config()
    params = init_params(cfg, jax.random.key(0))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    lines = [
        "# Paged KV engine vs static-cache sampler (CPU)",
        "",
        f"- machine: {cpu}, {os.cpu_count()} cores, load average at start "
        f"{os.getloadavg()[0]:.1f}; jax {jax.__version__}, torch {torch.__version__}",
        f"- model: {param_count(cfg) / 1e6:.1f}M params, 4 layers, fp32; greedy; medians of "
        f"{args.runs} runs after warm-up",
        "",
        f"## Decode step time vs row capacity ({ROWS} rows holding {PROMPT}-100 tokens)",
        "",
        "| capacity S | static ms/step | paged ms/step | static / paged |",
        "|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    eng = engines()
    per_step = {}
    for cap in CAPACITIES:
        s = step_time(eng["static"], params, cfg, cap)
        p = step_time(eng["paged"], params, cfg, cap)
        per_step[cap] = (s, p)
        lines.append(f"| {cap} | {s * 1e3:.2f} | {p * 1e3:.2f} | {s / p:.1f}x |")
        print(lines[-1], flush=True)
    lo, hi = CAPACITIES[0], CAPACITIES[-1]
    lines += ["", f"paged step at S={hi} / at S={lo}: {per_step[hi][1] / per_step[lo][1]:.2f} "
              f"(goal <= 1.2); static: {per_step[hi][0] / per_step[lo][0]:.1f}"]
    print(lines[-1], flush=True)

    useful = SHORT * (TAIL_ROWS - 1) + LONG
    lines += ["", f"## Long tail: {TAIL_ROWS} rows, {TAIL_ROWS - 1} x {SHORT} new tokens + "
              f"1 x {LONG}", "",
              "| engine | batch s | rows apart s | batch / apart | useful tok/s |",
              "|---|---|---|---|---|"]
    print("\n".join(lines[-5:]), flush=True)
    tail = {}
    for name in ("static", "paged"):
        b, a = long_tail(eng[name], params, cfg, args.runs)
        tail[name] = b
        lines.append(f"| {name} | {b:.2f} | {a:.2f} | {b / a:.2f} | {useful / b:,.0f} |")
        print(lines[-1], flush=True)
    if not args.skip_hf:
        h = hf_long_tail(cfg, args.runs)
        tail["hf"] = h
        lines.append(f"| transformers generate (padded batch) | {h:.2f} | - | - | "
                     f"{useful / h:,.0f} |")
        print(lines[-1], flush=True)
    lines += ["", f"paged vs static on the long-tail batch: {tail['static'] / tail['paged']:.2f}x"]
    if "hf" in tail:
        lines.append(f"paged vs transformers generate: {tail['hf'] / tail['paged']:.2f}x")
    print("\n".join(lines[-2:]), flush=True)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
