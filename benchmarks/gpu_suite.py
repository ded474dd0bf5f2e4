"""Accelerator suite (issue 11): attention paths, train-step MFU, decode vs the HBM roofline, the
paged engine (benchmarks/paged_gpu.py: throughput at 1000/1000, small batches, long tail).

    python benchmarks/gpu_suite.py --skip engine    # one GPU, <= 8 minutes
    python benchmarks/gpu_suite.py --skip train --skip attention --skip decode  # engine, ~6 min
    python benchmarks/gpu_suite.py --tiny --out-dir /tmp/x   # toy sizes on CPU (tests)

Writes <out-dir>/<device>.md and <device>.json (default out-dir benchmarks/results).
On CPU (--tiny) the Pallas kernels run in the interpreter and the cuDNN path is replaced by
`dot_product_attention(implementation="xla")`: the numbers exercise the code, not the chip;
the roofline peaks there are measured (a matmul and a reduction), not nominal.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Latency-hiding scheduler: overlaps the (few) async copies with compute; harmless on one GPU.
GPU_XLA_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"
if __name__ == "__main__" and "--tiny" not in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + GPU_XLA_FLAGS).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.paged_gpu import engine_report  # noqa: E402
from phi_reason.files import atomic_open  # noqa: E402
from phi_reason.hardware import for_device_kind  # noqa: E402
from phi_reason.jobs.trainer import train_flops_per_token  # noqa: E402
from phi_reason.model import attention_kernels  # noqa: E402
from phi_reason.model.attention import chunked_attention, reference_attention  # noqa: E402
from phi_reason.model.config import ModelConfig  # noqa: E402
from phi_reason.model.kv_cache import decode_step, init_cache, split_layers  # noqa: E402
from phi_reason.model.params import init_params, param_count  # noqa: E402
from phi_reason.train.token_stats import model_token_stats  # noqa: E402

_DEADLINE = [float("inf")]  # time.time() after which no new measurement starts (--budget-s)


def out_of_time() -> bool:
    return time.time() > _DEADLINE[0]


SKIPPED = "skipped: --budget-s spent"


def timeit(fn, *args, iters=3):
    """Median seconds of `iters` calls after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def device_peaks(tiny: bool):
    acc = for_device_kind(jax.devices()[0].device_kind)  # phi_reason.hardware's data-sheet peaks
    if acc is not None:
        return (acc.peak_flops, acc.hbm_bytes_per_s), "nominal"
    # Unknown chip (CPU): measure a large matmul and a streaming reduction instead.
    n = 512 if tiny else 2048
    a = jnp.ones((n, n), jnp.float32)
    flops = 2 * n ** 3 / timeit(jax.jit(lambda a: a @ a), a)
    x = jnp.ones((32 * 2 ** 20,), jnp.float32)
    bw = x.nbytes / timeit(jax.jit(jnp.sum), x)
    return (flops, bw), "measured"


# ------------------------------------------------------------------------------ attention

def packed_segments(b, t, n_seq=3):
    """Each row: n_seq packed sequences of unequal length, then ~5% padding (segment 0)."""
    real = t - max(1, t // 20)
    cuts = np.sort(np.random.RandomState(0).choice(np.arange(1, real), n_seq - 1, replace=False))
    row = np.zeros(t, np.int32)
    for i, (lo, hi) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, real])):
        row[lo:hi] = i + 1
    return jnp.asarray(np.tile(row, (b, 1)))


def attention_paths(interpret: bool, triton_bwd_blocks=()):
    def gpu(variant, bwd=None):
        return lambda q, k, v, s: attention_kernels.gpu_attention(
            q, k, v, s, s, interpret=interpret, variant=variant, triton_bwd_block=bwd)

    paths = {
        "reference": lambda q, k, v, s: reference_attention(q, k, v, s, s),
        "chunked": lambda q, k, v, s: chunked_attention(q, k, v, s, s),
        "gpu_triton": gpu("triton"),
        # cuDNN cannot express segment ids: timed on single-sequence rows (its only use).
        "gpu_cudnn": gpu("cudnn"),
    }
    for n in triton_bwd_blocks:  # tuning: the backward kernels' tile
        paths[f"gpu_triton_bwd{n}"] = gpu("triton", n)
    return paths


def _truth(q, k, v, seg):
    """Reference output (float32), or the chunked path's where the reference does not fit."""
    for name, fn in (("reference", reference_attention), ("chunked", chunked_attention)):
        try:
            return name, jax.jit(fn)(q, k, v, seg, seg).astype(jnp.float32)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
    return None, None


def bench_attention(seq_lens, heads, kv_heads, head_dim, dtype, interpret, triton_bwd_blocks=()):
    rows = []
    for t in seq_lens:
        if out_of_time():
            rows.append({"seq": t, "error": SKIPPED})
            continue
        r = np.random.RandomState(t)
        shape_q, shape_kv = (1, t, heads, head_dim), (1, t, kv_heads, head_dim)
        q, k, v = (jnp.asarray(r.randn(*s), dtype) for s in (shape_q, shape_kv, shape_kv))
        segs = {"packed": packed_segments(1, t), "single": jnp.ones((1, t), jnp.int32)}
        truth = {key: _truth(q, k, v, seg) for key, seg in segs.items()}
        for name, fn in attention_paths(interpret, triton_bwd_blocks).items():
            key = "single" if name == "gpu_cudnn" else "packed"
            seg = segs[key]
            fwd = jax.jit(fn)
            bwd = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s).astype(jnp.float32)),
                                   argnums=(0, 1, 2)))
            row = {"seq": t, "path": name, "segments": key, "err_vs": truth[key][0]}
            if out_of_time():
                row["error"] = SKIPPED
                rows.append(row)
                continue
            try:
                out = fwd(q, k, v, seg).astype(jnp.float32)
                if truth[key][1] is not None:
                    row["max_abs_err"] = float(jnp.max(jnp.abs(out - truth[key][1])))
                row["fwd_ms"] = 1e3 * timeit(fwd, q, k, v, seg)
                row["fwd_bwd_ms"] = 1e3 * timeit(bwd, q, k, v, seg)
            except Exception as e:  # noqa: BLE001 - an OOM or unsupported shape is a result
                row["error"] = "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print("attention", row, flush=True)
    return rows


# ------------------------------------------------------------------------------ train step

def make_train_step(cfg, logits_chunk: int = 0):
    """AdamW step on the mean next-token NLL, through the trainer's `model_token_stats`
    (`logits_chunk` > 0: no [B, T, V] logits, as with `train.logits_chunk`)."""
    opt = optax.adamw(1e-5, weight_decay=0.01)

    def loss_fn(params, tokens, segment_ids):
        seg = jnp.ones_like(tokens) if segment_ids is None else segment_ids
        stats = model_token_stats(params, cfg, {"tokens": tokens, "segment_ids": seg},
                                  chunk=logits_chunk)
        return -jnp.mean(stats.logp[:, 1:])

    @jax.jit
    def init(key):
        params = init_params(cfg, key)
        return params, opt.init(params)

    def step(params, opt_state, tokens, segment_ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, segment_ids)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return init, jax.jit(step, donate_argnums=(0, 1))


def layers_that_fit(cfg: ModelConfig, seq: int, batch: int, logits_chunk: int = 0) -> int:
    """Estimate: fp32 params + grads + AdamW moments (16 B/param), f32 logits and their gradient
    (one chunk of positions with `logits_chunk`), and bf16 layer-boundary activations, within
    85% of device memory."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = 0.85 * stats.get("bytes_limit", 16 * 2 ** 30)
    one = param_count(cfg.replace(num_hidden_layers=1))
    two = param_count(cfg.replace(num_hidden_layers=2))
    per_layer, fixed = two - one, one - (two - one)
    logits = 3 * batch * (min(logits_chunk, seq) if logits_chunk else seq) * cfg.vocab_size * 4
    act = batch * seq * cfg.hidden_size * 2 * 4  # boundaries + a layer's live working set
    n = int((limit - 16 * fixed - logits) // (16 * per_layer + act))
    return max(1, min(n, cfg.num_hidden_layers))


def time_train_step(c: ModelConfig, seq: int, batch: int, peak_flops: float,
                    packed: bool = False, logits_chunk: int = 0) -> dict:
    """packed: rows of 3 packed sequences + padding (segment ids; the Triton kernel on GPU),
    else one sequence per row (no segment ids; cuDNN on GPU)."""
    init, step = make_train_step(c, logits_chunk)
    params, opt_state = init(jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq), 0, c.vocab_size)
    segment_ids = packed_segments(batch, seq) if packed else None
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, tokens, segment_ids)  # compile
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, tokens, segment_ids)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    flops = train_flops_per_token(c, seq) * batch * seq
    stats = jax.devices()[0].memory_stats() or {}
    del params, opt_state
    return dict(step_s=sec, compile_s=compile_s, tokens_per_s=batch * seq / sec,
                tflops=flops / sec / 1e12, mfu=flops / sec / peak_flops, loss=float(loss),
                peak_gib=stats.get("peak_bytes_in_use", 0) / 2 ** 30)


def _train_row(cfg, seq, batch, remat, peak_flops, packed=False, logits_chunk=0):
    """One measured row; if the attention kernel fails to build (not an OOM), retried with
    attention='chunked' so that the MFU is still measured, and both outcomes are reported."""
    rows = []
    for attention in dict.fromkeys((cfg.attention, "chunked")):
        c = cfg.replace(remat=remat, attention=attention)
        row = {"layers": c.num_hidden_layers, "remat": remat, "attention": attention,
               "segments": "packed" if packed else "single", "logits_chunk": logits_chunk,
               "seq": seq, "batch": batch, "params": param_count(c)}
        if out_of_time():
            row["error"] = SKIPPED
            return rows + [row]
        try:
            row.update(time_train_step(c, seq, batch, peak_flops, packed, logits_chunk))
        except Exception as e:  # noqa: BLE001 - an OOM is a result
            row["error"] = "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print("train", row, flush=True)
        if row.get("error") in (None, "OOM"):
            break
    return rows


def bench_train(base: ModelConfig, seq: int, batches, remats, peak_flops, max_layers=None,
                packed_row=True, logits_chunk=0, oom_retries=2):
    """Every (batch, remat) pair, then the best pair again on packed rows.

    Depth: `max_layers` as an int applies to every batch, as a {batch: layers} dict per batch;
    None: the deepest model that fits the smallest batch (`layers_that_fit`). A row that runs out
    of memory is retried up to `oom_retries` times one layer shallower (the OOM rows are kept)."""
    if max_layers is None:
        max_layers = layers_that_fit(base, seq, min(batches), logits_chunk)

    def depth(batch):
        if isinstance(max_layers, int):
            return max_layers
        return max_layers.get(batch) or layers_that_fit(base, seq, batch, logits_chunk)

    results = []
    for batch in batches:
        for remat in remats:
            n_layers = depth(batch)
            for _ in range(oom_retries + 1):
                cfg = base.replace(num_hidden_layers=n_layers)
                rows = _train_row(cfg, seq, batch, remat, peak_flops, logits_chunk=logits_chunk)
                results += rows
                if rows[-1].get("error") != "OOM" or n_layers == 1:
                    break
                n_layers -= 1
    measured = [r for r in results if "mfu" in r]
    if packed_row and measured:
        best = max(measured, key=lambda r: r["mfu"])
        cfg = base.replace(num_hidden_layers=best["layers"])
        results += _train_row(cfg, seq, best["batch"], best["remat"], peak_flops, packed=True,
                              logits_chunk=logits_chunk)
    return results


# ------------------------------------------------------------------------------ decode

def bench_decode(cfg: ModelConfig, batches, context: int, steps: int, peak_bw):
    """Greedy decode through `kv_cache.decode_step` in a jitted `lax.fori_loop` with every row's
    context filled to `context` tokens. Roofline bytes per step: all parameters (compute dtype)
    plus the whole KV cache capacity, which the decode attention reads."""
    params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(cfg.dtype)), params)
    params = split_layers(params)  # unrolled layers: no per-step weight slicing
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    rows = []
    for b in batches:
        row = {"batch": b, "context": context, "steps": steps}
        if out_of_time():
            row["error"] = SKIPPED
            rows.append(row)
            continue
        try:
            cache = init_cache(cfg, b, context + steps, per_layer=True)
            cache = jax.tree_util.tree_map(
                lambda x: jax.random.normal(jax.random.PRNGKey(2), x.shape, x.dtype) * 0.1, cache)
            kv_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))

            @jax.jit
            def run(params, cache, tokens):
                def body(i, carry):
                    cache, tokens = carry
                    pos = jnp.full((b,), context + i, jnp.int32)
                    logits, cache = decode_step(params, cfg, cache, tokens, pos, None)
                    return cache, jnp.argmax(logits, -1).astype(jnp.int32)
                return jax.lax.fori_loop(0, steps, body, (cache, tokens))

            tokens = jnp.zeros((b,), jnp.int32)
            sec = timeit(run, params, cache, tokens, iters=2) / steps
            row.update(step_ms=1e3 * sec, tokens_per_s=b / sec,
                       bytes_per_step=param_bytes + kv_bytes,
                       roofline_fraction=(param_bytes + kv_bytes) / sec / peak_bw)
        except Exception as e:  # noqa: BLE001
            row["error"] = "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print("decode", row, flush=True)
    return rows


# ------------------------------------------------------------------------------ report

def device_slug(tiny: bool) -> str:
    kind = jax.devices()[0].device_kind.lower()
    slug = "".join(c if c.isalnum() else "-" for c in kind).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"{jax.default_backend()}-tiny" if tiny else slug


def render_md(report) -> str:
    def table(rows, cols):
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cells = []
            for c in cols:
                v = r.get(c, r.get("error", "") if c == cols[-1] else "")
                cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out)

    m = report["meta"]
    return "\n\n".join([
        f"# Accelerator suite: {m['device']}",
        f"jax {m['jax']}, backend {m['backend']}, XLA_FLAGS `{m['xla_flags']}`, peaks "
        f"{m['peak_flops'] / 1e12:.4g} TFLOP/s and {m['peak_bw'] / 1e9:.4g} GB/s ({m['peaks']}); "
        f"tiny={m['tiny']}; {m['seconds']:.0f} s total.",
        "## Attention (packed GQA rows; cuDNN on single-sequence rows)",
        table(report["attention"], ["seq", "path", "segments", "max_abs_err", "err_vs", "fwd_ms",
                                    "fwd_bwd_ms", "error"]),
        "## Train step (AdamW, bf16 compute, fp32 params)",
        "MFU = (6 N + attention) FLOPs per token x tokens / step time / peak; rows run in order "
        "in one process, so peak_gib is the peak of device memory so far, not of the row alone.",
        table(report["train"], ["layers", "remat", "attention", "segments", "logits_chunk", "seq",
                                "batch", "params",
                                "compile_s", "step_s", "tokens_per_s", "tflops", "mfu",
                                "peak_gib", "error"]),
        "## Decode (greedy, KV cache)",
        table(report["decode"], ["batch", "context", "steps", "step_ms", "tokens_per_s",
                                 "bytes_per_step", "roofline_fraction", "error"]),
        "## Engine (paged KV, benchmarks/paged_gpu.py)",
        *[f"### {name}\n\n" + table(rows if isinstance(rows, list) else [rows], list(
            (rows if isinstance(rows, list) else [rows])[0]))
          for name, rows in report.get("engine", {}).items() if isinstance(rows, (list, dict))],
    ]) + "\n"


def _layers_arg(text: str):
    """'N' -> N; 'B:N,B:N' -> {B: N}."""
    if ":" not in text:
        return int(text)
    pairs = (item.split(":") for item in text.split(","))
    return {int(b): int(n) for b, n in pairs}


def main(argv=None):
    ap = argparse.ArgumentParser(description="attention / train-step MFU / decode suite")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU, for tests)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--skip", action="append", default=[], choices=["attention", "train",
                                                                      "decode", "engine"])
    def ints(text):
        return tuple(int(x) for x in text.split(","))

    ap.add_argument("--train-batches", type=ints, help="comma list (default 1,2,4)")
    ap.add_argument("--remats", type=lambda t: tuple(t.split(",")),
                    help="comma list of remat policies (default save_dots_attn,save_dots,full)")
    ap.add_argument("--triton-bwd-blocks", type=ints, default=(),
                    help="extra gpu_triton rows with these backward tiles (tuning)")
    ap.add_argument("--logits-chunk", type=int, default=0,
                    help="train rows with the loss's logits N positions at a time "
                         "(train.logits_chunk; 0: all at once)")
    ap.add_argument("--layers", type=_layers_arg,
                    help="train this many layers, for every batch (N) or per batch "
                         "(BATCH:N,...; e.g. 2:31,4:26); default: as many as fit")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="start no new measurement after this many seconds (rows left are "
                         "reported as skipped); results are written after every section")
    args = ap.parse_args(argv)
    t_start = time.time()
    _DEADLINE[0] = t_start + args.budget_s
    interpret = jax.default_backend() == "cpu"
    (peak_flops, peak_bw), peaks_src = device_peaks(args.tiny)
    if args.tiny:
        base = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           dtype="bfloat16", attention="auto")
        attn_args = dict(seq_lens=(64,), heads=4, kv_heads=2, head_dim=16)
        train_args = dict(seq=64, batches=(2,), remats=("full", "save_dots"), max_layers=2)
        decode_args = dict(batches=(1, 4), context=32, steps=4)
    else:
        base = ModelConfig.preset("phi-4-mini").replace(dtype="bfloat16", param_dtype="float32",
                                                        attention="auto")
        attn_args = dict(seq_lens=(4096, 16384), heads=24, kv_heads=8, head_dim=128)
        train_args = dict(seq=4096, batches=(1, 2, 4),
                          remats=("save_dots_attn", "save_dots", "full"), max_layers=None)
        decode_args = dict(batches=(1, 16, 64), context=2048, steps=64)
    report = {"meta": {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                       "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "peak_flops": peak_flops, "peak_bw": peak_bw, "peaks": peaks_src,
                       "tiny": args.tiny, "interpret_kernels": interpret},
              "attention": [], "train": [], "decode": [], "engine": {}}
    if args.train_batches:
        train_args["batches"] = args.train_batches
    if args.remats:
        train_args["remats"] = args.remats
    if args.layers:
        train_args["max_layers"] = args.layers
    train_args["logits_chunk"] = args.logits_chunk
    attn_args["triton_bwd_blocks"] = args.triton_bwd_blocks
    report["meta"]["tag"] = args.tag
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, device_slug(args.tiny) + (f"-{args.tag}" if args.tag else ""))

    def write():
        report["meta"]["seconds"] = time.time() - t_start
        for path, text in ((stem + ".json", json.dumps(report, indent=1, default=str)),
                           (stem + ".md", render_md(report))):
            with atomic_open(path) as f:
                f.write(text)

    # Headline first: if the run is cut short, the train-step MFU is already on disk.
    sections = {
        "train": lambda: bench_train(base, peak_flops=peak_flops, **train_args),
        "decode": lambda: bench_decode(base, peak_bw=peak_bw, **decode_args),
        "attention": lambda: bench_attention(dtype=jnp.bfloat16, interpret=interpret,
                                             **attn_args),
        # the paged engine (benchmarks/paged_gpu.py; ~6 minutes on one GPU at full sizes)
        "engine": lambda: engine_report(args.tiny, peak_bw),
    }
    for name, run in sections.items():
        if name not in args.skip:
            report[name] = run()
            write()
    write()
    print(render_md(report))
    print(f"wrote {stem}.md and {stem}.json ({report['meta']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
