"""The paged engine on one accelerator (issue 24's GPU goals), phi-4-mini bf16, random weights:

1. throughput: 256 rows x 1000 prompt / 1000 output tokens (TensorRT-LLM's published setting:
   15,220 tok/s on an H100, 17,744 on an H200 for Llama-3.1-8B-FP8), output tokens / wall s;
2. small batches (1, 4, 16 rows at a 1000-token context): decode step time from two runs of
   different lengths (medians of 3; prefill and compiles cancel), against the HBM roofline of
   what one step must read: the bf16 weights + the live KV bytes;
3. long tail: 256 rows of 512-token prompts and log-normal budgets up to 32K: wall time against
   the bandwidth ceiling of the same schedule with every row live from the start (a lower
   bound on the time: a pool too small to hold every row only makes it longer).

    python benchmarks/paged_gpu.py                 # one GPU, ~6 minutes
    python benchmarks/paged_gpu.py --tiny          # toy sizes on CPU (tests)

Writes <out-dir>/<device>-paged.md and .json. Stop tokens are disabled, so every row runs to its
budget (random weights would otherwise stop at random).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_reason.engine.paged_sampler import generate_paged, inference_params  # noqa: E402
from phi_reason.engine.scheduler import kv_bytes_per_block  # noqa: E402
from phi_reason.files import atomic_open  # noqa: E402
from phi_reason.hardware import for_device_kind  # noqa: E402
from phi_reason.model.config import ModelConfig  # noqa: E402
from phi_reason.model.params import init_params  # noqa: E402

TRT_LLM = {"h100": 15_220, "h200": 17_744}  # output tok/s, 1000/1000, Llama-3.1-8B-FP8


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def prompts_of(rng, cfg, n, length):
    return [rng.integers(0, cfg.vocab_size, length).tolist() for _ in range(n)]


def kv_bytes_per_token(cfg) -> int:
    return kv_bytes_per_block(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 1,
                              jnp.dtype(cfg.dtype).itemsize)


def bench_throughput(params, cfg, rows, prompt, new):
    rng = np.random.default_rng(0)
    run = lambda: generate_paged(params, cfg, prompts_of(rng, cfg, rows, prompt), new,  # noqa: E731
                                 stop_tokens=())
    run()  # compiles every bucket the call meets
    out, sec = timed(run)
    tok = sum(map(len, out.tokens))
    row = {"rows": rows, "prompt": prompt, "new": new, "seconds": sec, "output_tok_s": tok / sec,
           "preemptions": out.stats.get("preemptions", 0), "kv_blocks": out.stats["num_blocks"]}
    acc = for_device_kind(jax.devices()[0].device_kind)
    for key, anchor in TRT_LLM.items():
        if acc is not None and key in acc.name.lower():
            row["vs_trt_llm"] = row["output_tok_s"] / anchor
    return row


def bench_small_batches(params, cfg, batches, context, steps, weight_bytes, peak_bw):
    rng = np.random.default_rng(1)
    rows = []
    for b in batches:
        prompts = prompts_of(rng, cfg, b, context)
        times = {}
        for n in (steps, 2 * steps):
            generate_paged(params, cfg, prompts, n, stop_tokens=())  # compile
            times[n] = statistics.median(
                timed(lambda: generate_paged(params, cfg, prompts, n, stop_tokens=()))[1]
                for _ in range(3))
        step = (times[2 * steps] - times[steps]) / steps
        live_kv = b * (context + 1.5 * steps) * kv_bytes_per_token(cfg)  # mean over the steps
        need = weight_bytes + live_kv
        rows.append({"batch": b, "context": context, "step_ms": 1e3 * step,
                     "tokens_per_s": b / step, "bytes_per_step": need,
                     "roofline_fraction": need / step / peak_bw})
        print("small batch", rows[-1], flush=True)
    return rows


def bench_long_tail(params, cfg, rows, prompt, max_new, weight_bytes, peak_bw):
    rng = np.random.default_rng(2)
    budgets = np.clip(rng.lognormal(np.log(max_new / 16), 1.0, rows), 64, max_new).astype(int)
    budgets[0] = max_new  # one row runs the whole budget
    prompts = prompts_of(rng, cfg, rows, prompt)
    warm = generate_paged(params, cfg, prompts[:8], [int(b) for b in budgets[:8]],
                          stop_tokens=())
    del warm
    out, sec = timed(lambda: generate_paged(params, cfg, prompts, [int(b) for b in budgets],
                                            stop_tokens=()))
    # The ceiling: step s reads the weights once and every live row's KV (prompt + s tokens).
    per_tok = kv_bytes_per_token(cfg)
    ideal = 0.0
    for s in range(int(budgets.max())):
        live = budgets > s
        ideal += (weight_bytes + per_tok * int(live.sum()) * (prompt + s)) / peak_bw
    tok = int(budgets.sum())
    return {"rows": rows, "prompt": prompt, "max_new": max_new, "mean_new": float(budgets.mean()),
            "seconds": sec, "output_tok_s": tok / sec, "ceiling_seconds": ideal,
            "fraction_of_ceiling": ideal / sec, "preemptions": out.stats.get("preemptions", 0),
            "kv_blocks": out.stats["num_blocks"], "peak_used_blocks": out.stats["peak_used_blocks"]}


def render(report) -> str:
    m = report["meta"]
    lines = [f"# Paged engine: {m['device']}", "",
             f"jax {m['jax']}, {m['model']}, weights {m['weight_bytes'] / 2**30:.2f} GiB "
             f"{m['dtype']}, peak bandwidth {m['peak_bw'] / 1e9:.0f} GB/s ({m['peaks']}); "
             f"{m['seconds']:.0f} s", ""]
    for name, rows in report.items():
        if name == "meta" or not rows:
            continue
        rows = rows if isinstance(rows, list) else [rows]
        cols = list(rows[0])
        lines += [f"## {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])
                                           for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def engine_config(tiny: bool):
    """(model config, sizes of the three sections) for the device or for the CPU test."""
    if tiny:
        cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, dtype="bfloat16", param_dtype="bfloat16")
        return cfg, dict(throughput=(4, 16, 8), small=((2,), 16, 4), tail=(4, 16, 32))
    cfg = ModelConfig.preset("phi-4-mini").replace(dtype="bfloat16", param_dtype="bfloat16")
    return cfg, dict(throughput=(256, 1000, 1000), small=((1, 4, 16), 1000, 128),
                     tail=(256, 512, 32768 - 512))


def engine_report(tiny: bool, peak_bw: float, skip=(), on_section=None) -> dict:
    """The three sections (see the module docstring), each also passed to on_section(report)."""
    cfg, sizes = engine_config(tiny)
    params = inference_params(init_params(cfg, jax.random.key(0)), cfg)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    report = {"model": "tiny" if tiny else "phi-4-mini", "dtype": cfg.dtype,
              "weight_bytes": weight_bytes}
    runs = {
        "throughput": lambda: bench_throughput(params, cfg, *sizes["throughput"]),
        "small_batches": lambda: bench_small_batches(params, cfg, *sizes["small"], weight_bytes,
                                                     peak_bw),
        "long_tail": lambda: bench_long_tail(params, cfg, *sizes["tail"], weight_bytes, peak_bw),
    }
    for name, run in runs.items():
        if name not in skip:
            report[name] = run()
            print(name, report[name], flush=True)
            if on_section is not None:
                on_section(report)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU, for tests)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--skip", action="append", default=[],
                    choices=["throughput", "small_batches", "long_tail"])
    args = ap.parse_args(argv)
    from benchmarks.gpu_suite import device_peaks, device_slug  # the suite's peaks and names

    t0 = time.time()
    (_, peak_bw), peaks = device_peaks(args.tiny)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "peak_bw": peak_bw,
            "peaks": peaks}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, device_slug(args.tiny) + "-paged")

    def write(sections):
        report = {"meta": dict(meta, seconds=time.time() - t0,
                               **{k: sections[k] for k in ("model", "dtype", "weight_bytes")}),
                  **{k: v for k, v in sections.items()
                     if k not in ("model", "dtype", "weight_bytes")}}
        for path, text in ((stem + ".json", json.dumps(report, indent=1, default=str)),
                           (stem + ".md", render(report))):
            with atomic_open(path) as f:
                f.write(text)
        return report

    sections = engine_report(args.tiny, peak_bw, args.skip, on_section=write)
    print(render(write(sections)))
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
