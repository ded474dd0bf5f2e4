"""Greedy decode throughput on CPU: phi_reason's jitted sampler vs transformers `generate`.

Same config, same thread count (torch gets os.cpu_count() threads; XLA uses every core), prompt 64,
128 new tokens, no stop tokens, medians of --runs timed runs after a warm-up (compilation excluded:
the sampler compiles once per shape and is reused across calls).

Configs:
  0.5M: hidden 128, 2 layers, vocab 512, 4 heads (4 KV), MLP 256, untied  ->   0.46M params
  30M : hidden 512, 8 layers, vocab 8192, 8 heads (8 KV), MLP 1280, untied -> 32.5M params
Roofline: a decode step must read every weight except the embedding table (only B rows of it are
gathered) plus each row's K/V so far; at the machine's read bandwidth (numpy sum over 256 MB) that
bounds tokens/s at B * bandwidth / bytes_per_step. We report the measured fraction of it.
Variable-length workload: 64 prompts, half with a 16-token budget and half with 128, 16 slots:
continuous batching (one call; finished slots are refilled) vs static batches of 16 (each batch
runs until its longest row ends), useful generated tokens per second.

Usage: python benchmarks/decode_cpu.py [--runs 3] [--out benchmarks/results/decode_cpu.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

PROMPT, NEW = 64, 128


def read_bandwidth(mb=256, reps=5) -> float:
    a = np.ones(mb * 2 ** 20 // 8, np.float64)
    a.sum()
    best = min(_timed(a.sum) for _ in range(reps))
    return a.nbytes / best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def configs():
    from phi_reason.model.config import ModelConfig

    common = dict(max_position_embeddings=512, original_max_position_embeddings=512,
                  tie_word_embeddings=False, initializer_range=0.1)
    return {
        "0.5M": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            **common),
        "30M": ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1280,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                           **common),
    }


def bytes_per_step(cfg, batch, context) -> float:
    from phi_reason.model.params import param_count

    weights = (param_count(cfg) - cfg.vocab_size * cfg.hidden_size) * 4
    kv = 2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * cfg.head_dim * 4
    return weights + kv


def bench_ours(cfg, params, prompts, budgets, runs, num_slots):
    from phi_reason.engine.sampler import generate

    def go():
        return generate(params, cfg, prompts, budgets, stop_tokens=(), num_slots=num_slots)

    out = go()  # compile
    times = [_timed(go) for _ in range(runs)]
    return statistics.median(times), sum(map(len, out.tokens))


def bench_hf(cfg, batch, runs):
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**cfg.to_hf())).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, PROMPT))

    def go():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                  min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)

    go()
    return statistics.median(_timed(go) for _ in range(runs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import torch

    from phi_reason.model.params import init_params, param_count

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    bw = read_bandwidth()
    lines = [
        "# Greedy decode on CPU: phi_reason sampler vs transformers generate",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {threads} cores, "
        f"load average at start {os.getloadavg()[0]:.1f}; jax {jax.__version__}, "
        f"torch {torch.__version__}, torch threads {threads}",
        f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`",
        f"- measured read bandwidth (numpy sum, 256 MB): {bw / 1e9:.1f} GB/s",
        f"- prompt {PROMPT}, {NEW} new tokens, greedy, medians of {args.runs} runs after warm-up",
        "",
        "| config | params | batch | ours tok/s | HF tok/s | ratio | bytes/step | roofline tok/s "
        "| ours / roofline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rng = np.random.default_rng(0)
    for name, cfg in configs().items():
        params = init_params(cfg, jax.random.key(0))
        for batch in (4, 32):
            prompts = rng.integers(0, cfg.vocab_size, (batch, PROMPT)).tolist()
            t, n = bench_ours(cfg, params, prompts, NEW, args.runs, batch)
            ours = n / t
            hf = float("nan") if args.skip_hf else batch * NEW / bench_hf(cfg, batch, args.runs)
            per_step = bytes_per_step(cfg, batch, PROMPT + NEW // 2)
            roof = batch * bw / per_step
            row = (f"| {name} | {param_count(cfg) / 1e6:.2f}M | {batch} | {ours:,.0f} | {hf:,.0f} "
                   f"| {ours / hf:.2f}x | {per_step / 1e6:.1f} MB | {roof:,.0f} | "
                   f"{ours / roof:.0%} |")
            lines.append(row)
            print(row, flush=True)

    # Variable-length workload: continuous batching vs static batches.
    lines += ["", "Variable lengths: 64 prompts (half 16 new tokens, half 128), 16 slots", "",
              "| config | continuous tok/s | static batches tok/s | gain |", "|---|---|---|---|"]
    print("\n".join(lines[-4:]), flush=True)
    for name, cfg in configs().items():
        params = init_params(cfg, jax.random.key(0))
        prompts = rng.integers(0, cfg.vocab_size, (64, PROMPT)).tolist()
        budgets = [16 if i % 2 else NEW for i in range(64)]
        t_cont, n = bench_ours(cfg, params, prompts, budgets, args.runs, 16)

        def static():
            from phi_reason.engine.sampler import generate

            for s in range(0, 64, 16):
                generate(params, cfg, prompts[s:s + 16], budgets[s:s + 16], stop_tokens=(),
                         num_slots=16)

        static()
        t_static = statistics.median(_timed(static) for _ in range(args.runs))
        row = (f"| {name} | {n / t_cont:,.0f} | {n / t_static:,.0f} | "
               f"{t_static / t_cont:.2f}x |")
        lines.append(row)
        print(row, flush=True)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
