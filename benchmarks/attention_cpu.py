"""CPU causal attention, forward and forward+backward: our paths vs torch's fused SDPA.

Paths: `cpu_flash` (the C++ FFI kernel, phi_reason.model.cpu_flash), `causal_blocked` (XLA, the
fallback when no compiler is available) and `reference` (one masked [T, T] softmax), each jitted;
baseline: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` with the same shapes,
float32 and thread count (KV heads repeated for GQA, as HF's Phi3 SDPA path does). Calls are
interleaved and the median of the timed calls is reported with the ratio SDPA time / ours.

    python benchmarks/attention_cpu.py                     # the 30M train step's shapes
    python benchmarks/attention_cpu.py --t 2048 --batch 1 --runs 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

THREADS = int(os.environ.get("BENCH_THREADS", "2"))

from phi_reason.host_allocator import tune_for_cpu  # noqa: E402

tune_for_cpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from phi_reason.model import attention as attn  # noqa: E402
from phi_reason.model import cpu_flash  # noqa: E402

PATHS = {
    "cpu_flash": cpu_flash.flash_attention,
    "causal_blocked": attn.causal_blocked_attention,
    "reference": attn.reference_attention,
}


def timed(fn, runs):
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--t", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--paths", default=",".join(PATHS))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(THREADS)
    b, t, nh, nkv, hd = args.batch, args.t, args.heads, args.kv_heads, args.head_dim
    r = np.random.RandomState(0)
    q, k, v, ct = (r.randn(b, t, n, hd).astype(np.float32) for n in (nh, nkv, nkv, nh))
    seg = jnp.ones((b, t), jnp.int32)
    jq, jk, jv, jct = map(jnp.asarray, (q, k, v, ct))

    def ours(fn):
        fwd = jax.jit(lambda q, k, v: fn(q, k, v, seg, seg))
        grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg, seg) * jct),
                                 argnums=(0, 1, 2)))
        return (lambda: jax.block_until_ready(fwd(jq, jk, jv)),
                lambda: jax.block_until_ready(grads(jq, jk, jv)))

    def heads_major(x, rep):
        return torch.from_numpy(x).repeat_interleave(rep, 2).transpose(1, 2)

    tq, tk, tv = heads_major(q, 1), heads_major(k, nh // nkv), heads_major(v, nh // nkv)
    tct = heads_major(ct, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_fwd():
        with torch.no_grad():
            sdpa(tq, tk, tv, is_causal=True)

    def torch_fwd_bwd():
        a, bk, c = (x.detach().clone().requires_grad_() for x in (tq, tk, tv))
        (sdpa(a, bk, c, is_causal=True) * tct).sum().backward()

    paths = [p for p in args.paths.split(",") if p]
    if "cpu_flash" in paths and not cpu_flash.available():
        print(f"cpu_flash skipped: {cpu_flash.build_error()}")
        paths.remove("cpu_flash")
    fns = {p: ours(PATHS[p]) for p in paths}
    fns["torch sdpa"] = (torch_fwd, torch_fwd_bwd)
    for f, g in fns.values():  # compile / warm up
        f(), g()
    times = {name: ([], []) for name in fns}
    for _ in range(args.runs):
        for name, (f, g) in fns.items():
            times[name][0].extend(timed(f, 1))
            times[name][1].extend(timed(g, 1))
    med = {name: tuple(statistics.median(x) for x in ts) for name, ts in times.items()}
    base = med["torch sdpa"]
    print(f"B={b} T={t} heads {nh}/{nkv} head_dim {hd}, float32, {THREADS} threads, "
          f"jax {jax.__version__}, torch {torch.__version__}; median of {args.runs}")
    print("| path | forward ms | fwd+bwd ms | SDPA / ours (fwd) | SDPA / ours (fwd+bwd) |")
    print("|---|---|---|---|---|")
    for name, (f, g) in med.items():
        print(f"| {name} | {1e3 * f:.1f} | {1e3 * g:.1f} | {base[0] / f:.2f} | {base[1] / g:.2f} |")


if __name__ == "__main__":
    main()
