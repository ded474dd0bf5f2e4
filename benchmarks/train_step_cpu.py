"""CPU training-step throughput: our jitted JAX step vs transformers' Phi3ForCausalLM.

One step = forward + backward + AdamW update, float32, next-token cross-entropy over the whole
batch. Both frameworks get the same config, batch and thread count (torch.set_num_threads(N);
XLA's CPU client uses the same N cores). Runs are interleaved (JAX, HF, JAX, HF, ...) so that
machine load hits both alike; the median of the timed runs is reported.

    python benchmarks/train_step_cpu.py                 # the README's rows: both configs, 5 runs
    python benchmarks/train_step_cpu.py --only 0.5m --runs 3 --out benchmarks/results/x.md
    python benchmarks/train_step_cpu.py --default-allocator   # without phi_reason.host_allocator
    python benchmarks/train_step_cpu.py --remat none --scan   # plain settings for both configs
    python benchmarks/train_step_cpu.py --attention causal_blocked   # XLA attention, no kernel
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

THREADS = int(os.environ.get("BENCH_THREADS", "2"))

# Before JAX starts its threads (see phi_reason/host_allocator.py); the CLI does the same for
# training on the CPU. The HF step runs in this process too, so both sides get the same allocator.
from phi_reason.host_allocator import tune_for_cpu  # noqa: E402

ALLOCATOR_TUNED = "--default-allocator" not in sys.argv and tune_for_cpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from phi_reason.model.config import ModelConfig  # noqa: E402
from phi_reason.model.decoder import forward  # noqa: E402
from phi_reason.model.params import init_params, param_count  # noqa: E402

CONFIGS = {
    # name: (ModelConfig kwargs, batch, seq)
    "30m": (dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4), 8, 512),
    "0.5m": (dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2), 8, 512),
}
# Each config's step settings unless --remat / --scan / --no-scan say otherwise (measured best in
# benchmarks/results/train_step_cpu.md): 30m keeps matmul outputs and the attention kernel's
# output + logsumexp (1.1 GB of XLA temp instead of 3.1 GB); 0.5m's 2 layers run faster unrolled.
STEP_DEFAULTS = {
    "30m": dict(remat="save_dots_attn", scan_layers=True),
    "0.5m": dict(remat="none", scan_layers=False),
}
LR, WD = 1e-4, 0.01


def model_config(name: str, **runtime) -> ModelConfig:
    kw, _, _ = CONFIGS[name]
    return ModelConfig(max_position_embeddings=4096, original_max_position_embeddings=4096,
                       tie_word_embeddings=False, **kw, **runtime)


def _attention_label(name: str) -> str:
    from phi_reason.model.attention import resolve_impl

    return f"auto ({resolve_impl(name)})" if name == "auto" else name


def next_token_loss(params, tokens, cfg):
    logits = forward(params, tokens, cfg)[:, :-1]
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(logz - gold)


def make_jax_step(cfg: ModelConfig):
    opt = optax.adamw(LR, weight_decay=WD)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(next_token_loss)(params, tokens, cfg)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return opt, jax.jit(step, donate_argnums=(0, 1))


def time_jax(cfg, tokens_np, runs):
    params = init_params(cfg, jax.random.PRNGKey(0))
    opt, step = make_jax_step(cfg)
    opt_state = opt.init(params)
    tokens = jnp.asarray(tokens_np)
    params, opt_state, loss = step(params, opt_state, tokens)  # compile + warm-up
    loss.block_until_ready()
    state = {"params": params, "opt_state": opt_state}

    def one():
        t0 = time.perf_counter()
        p, o, loss = step(state["params"], state["opt_state"], tokens)
        loss.block_until_ready()
        state["params"], state["opt_state"] = p, o
        return time.perf_counter() - t0

    return one


def time_hf(cfg, tokens_np):
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    hf_cfg = Phi3Config(**{**cfg.to_hf(), "attn_implementation": "sdpa"})
    model = Phi3ForCausalLM(hf_cfg).float().train()
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    tokens = torch.from_numpy(tokens_np).long()

    def one():
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    one()  # warm-up (allocator, oneDNN primitive caches)
    return one


def bench(name: str, runs: int, **runtime):
    cfg = model_config(name, **runtime)
    _, batch, seq = CONFIGS[name]
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    jax_one, hf_one = time_jax(cfg, tokens, runs), time_hf(cfg, tokens)
    jt, ht = [], []
    for _ in range(runs):
        jt.append(jax_one())
        ht.append(hf_one())
    n_tok = batch * seq
    j, h = n_tok / statistics.median(jt), n_tok / statistics.median(ht)
    return dict(name=name, params=param_count(cfg), batch=batch, seq=seq, jax_tok_s=j, hf_tok_s=h,
                ratio=j / h, jax_times=jt, hf_times=ht, cfg=cfg)


def describe_machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, {THREADS} threads; python "
            f"{platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}), "
            f"torch {torch.__version__}, transformers {transformers.__version__}; "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; host allocator: "
            f"{'tuned (phi_reason.host_allocator)' if ALLOCATOR_TUNED else 'glibc default'}; "
            f"load average at the end "
            f"{os.getloadavg()[0]:.1f} (other processes share these cores)")


def render(results, machine: str) -> str:
    lines = ["# CPU train step: phi_reason (JAX) vs transformers Phi3ForCausalLM (PyTorch)", "",
             f"Machine: {machine}", "",
             "One step = forward + backward + AdamW, float32, batch x seq tokens; median of "
             "interleaved timed runs.", "",
             "| config | params | B x T | attention | remat | layers | JAX tok/s | HF tok/s "
             "| JAX / HF |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["cfg"]
        shape = (f"h{c.hidden_size} L{c.num_hidden_layers} heads {c.num_attention_heads}/"
                 f"{c.num_key_value_heads} mlp {c.intermediate_size} vocab {c.vocab_size}")
        lines.append(f"| {r['name']} ({shape}) | {r['params'] / 1e6:.2f}M | {r['batch']} x "
                     f"{r['seq']} | {_attention_label(c.attention)} | {c.remat} | "
                     f"{'scan' if c.scan_layers else 'unrolled'} | {r['jax_tok_s']:,.0f} | "
                     f"{r['hf_tok_s']:,.0f} | {r['ratio']:.2f} |")
    lines.append("")
    for r in results:
        lines.append(f"- {r['name']} step seconds: JAX {['%.3f' % t for t in r['jax_times']]}, "
                     f"HF {['%.3f' % t for t in r['hf_times']]}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--remat", help="remat policy of our step (default: per config, see "
                                     "STEP_DEFAULTS: save_dots_attn for 30m, none for 0.5m)")
    layers = ap.add_mutually_exclusive_group()
    layers.add_argument("--no-scan", dest="scan", action="store_false", default=None,
                        help="unroll the layers (default for 0.5m)")
    layers.add_argument("--scan", dest="scan", action="store_true",
                        help="lax.scan over stacked layer weights (default for 30m)")
    ap.add_argument("--out", help="also write the markdown table here")
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc's malloc settings alone (read before JAX is imported; "
                         "default: phi_reason.host_allocator.tune_for_cpu, as the CLI does)")
    ap.add_argument("--trainer", action="store_true",
                    help="also run the step through the full trainer (grain data, JSONL + "
                         "TensorBoard + progress bar, checkpoint manager) and report its overhead "
                         "over the bare step (benchmarks/trainer_overhead.py)")
    args = ap.parse_args(argv)
    if args.trainer:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import trainer_overhead
        trainer_overhead.main(["--size", "tiny"])
    results = []
    for name in args.only or ["30m", "0.5m"]:
        step = dict(STEP_DEFAULTS[name])
        if args.remat is not None:
            step["remat"] = args.remat
        if args.scan is not None:
            step["scan_layers"] = args.scan
        r = bench(name, args.runs, attention=args.attention, **step)
        print(f"{name}: JAX {r['jax_tok_s']:,.0f} tok/s  HF {r['hf_tok_s']:,.0f} tok/s  "
              f"ratio {r['ratio']:.2f}", flush=True)
        results.append(r)
    text = render(results, describe_machine())
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    sys.exit(main())
