"""`phi-reason` command line: argument parsing only. Each subcommand calls one job function
(imported lazily, so `phi-reason --help` is quick); choices come from the registries they name.

Every command reports bad input (`UsageError`: a config key, a path, a file's line) as one line and
exit status 2, and a run that stops on its own condition (`RunFailed`) as one line and status 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys


def _call(target: str, **kwargs):
    module, fn = target.rsplit(":", 1)
    return getattr(importlib.import_module(module), fn)(**kwargs)


def report_errors(fn, *args, **kwargs) -> int:
    """Run a job; its expected failures become one line on stderr and an exit status."""
    from phi_reason.errors import RunFailed, UsageError
    try:
        return int(fn(*args, **kwargs) or 0)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _overrides(p):
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. train.lr=1e-5 data.seq_len=4096")


# ---------------------------------------------------------------- demo (issue 10)
def _add_demo(sub):
    p = sub.add_parser("demo",
                       help="the four-stage Phi-4-mini-reasoning recipe at toy scale on CPU",
                       description="Train a tiny Phi-architecture model from scratch on synthetic "
                       "verifiable math: base -> mid-training (packed) -> SFT -> Rollout DPO -> "
                       "RL, "
                       "reporting held-out accuracy after each stage. With --model, run a few "
                       "MATH-500 problems through a real checkpoint instead.")
    p.add_argument("--out", default="./demo_out", help="output directory (default ./demo_out)")
    p.add_argument("--quick", action="store_true", help="shorter run for small CI machines")
    p.add_argument("--config", default=None, help="demo YAML (default: configs/demo.yaml)")
    p.add_argument("--model", default=None, help="HF or Orbax checkpoint dir: evaluate it instead")
    p.add_argument("--data", default=None, help="MATH-500 JSONL for --model mode")
    p.add_argument("--num-problems", type=int, default=5)
    _overrides(p)
    p.set_defaults(fn=lambda a: _call("phi_reason.demo:main", out=a.out, quick=a.quick,
                                      config=a.config, model=a.model, data=a.data,
                                      num_problems=a.num_problems, overrides=a.overrides))


# ---------------------------------------------------------------- convert (issue 3)
def _add_convert(sub):
    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Orbax")
    csub = p.add_subparsers(dest="direction", required=True)
    a = csub.add_parser("hf-to-orbax", help="HF safetensors dir -> Orbax checkpoint")
    a.add_argument("hf_dir")
    a.add_argument("out")
    a.add_argument("--dtype", default=None, help="cast weights (float32|bfloat16); default: keep")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    a.set_defaults(fn=lambda x: _call("phi_reason.jobs.convert:hf_to_orbax",
                                         hf_dir=x.hf_dir, out=x.out, dtype=x.dtype,
                                         overwrite=x.overwrite))
    b = csub.add_parser("orbax-to-hf", help="Orbax checkpoint -> HF safetensors dir")
    b.add_argument("ckpt")
    b.add_argument("out")
    b.add_argument("--tokenizer-from", default=None, help="copy tokenizer files from this dir")
    b.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB (default 5GB)")
    b.add_argument("--dtype", default=None, help="cast weights (float32|bfloat16); default: keep")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    b.set_defaults(fn=lambda x: _call("phi_reason.jobs.convert:orbax_to_hf",
                                         ckpt=x.ckpt, out=x.out, tokenizer_from=x.tokenizer_from,
                                         max_shard_size=x.max_shard_size, dtype=x.dtype,
                                         overwrite=x.overwrite))


# ---------------------------------------------------------------- generate (issue 5)
def _add_generate(sub):
    p = sub.add_parser("generate", help="sample completions from a checkpoint")
    p.add_argument("--model", required=True, help="HF or Orbax checkpoint dir")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="a single prompt (streams to the terminal)")
    g.add_argument("--prompts", help="JSONL file with a 'prompt' (or 'messages') field per line")
    p.add_argument("--output", default=None, help="JSONL output for --prompts (default stdout)")
    from phi_reason.data.chat import FORMATS
    p.add_argument("--chat-format", default=None, choices=[*FORMATS, "none"],
                   help="the checkpoint's chat format (default: raw text, no template)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model dir)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    _add_engine_flags(p)
    p.set_defaults(fn=lambda a: _call("phi_reason.jobs.generate:main", **_kw(a)))


def _add_engine_flags(p):
    """Sampling-engine flags shared by `generate` and `eval`."""
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="weights, compute and KV cache dtype (default: the checkpoint's stored "
                   "dtype, bf16 for the released Phi-4 models)")
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=8 or data=4,tensor=2 (default: every device of "
                   "the job, rows split over them; one device on CPU)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="most rows decoded at once (default: what the KV pool can admit, at "
                   "most 256; the pool is half the free accelerator memory)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (rows done, tokens/s, ETA)")


# ---------------------------------------------------------------- training (issues 7, 8)
def _add_training(sub):
    for name, target, helptext in (
        ("sft", "phi_reason.jobs.sft:run_sft", "supervised fine-tuning (packed or unpacked)"),
        ("dpo", "phi_reason.jobs.dpo:run_dpo", "direct preference optimisation"),
        ("rl", "phi_reason.jobs.rl:run_rl", "RL with verifiable rewards (GRPO family)"),
        ("rollout-dpo", "phi_reason.jobs.rollout_dpo:run_rollout_dpo",
         "sample, grade and write chosen/rejected pairs for DPO"),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("config", help="YAML run config (see configs/)")
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        _overrides(p)
        p.set_defaults(fn=lambda a, t=target: _call(t, config=a.config, overrides=a.overrides,
                                                    resume=a.resume))


# ---------------------------------------------------------------- eval + grade (issue 9)
def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a checkpoint on a math benchmark")
    p.add_argument("--model", required=True)
    from phi_reason.eval.benchmarks import BENCHMARKS
    p.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    p.add_argument("--data", default=None, help="local JSONL/Parquet file of the benchmark")
    p.add_argument("--out", default="./eval_out")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=32768)
    from phi_reason.data.chat import FORMATS
    p.add_argument("--chat-format", default=None, choices=list(FORMATS),
                   help="default: guessed from the model directory's name")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model dir)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--seed", type=int, default=0)
    _add_engine_flags(p)
    p.set_defaults(fn=lambda a: _call("phi_reason.jobs.eval:main", **_kw(a)))

    g = sub.add_parser("grade", help="grade predictions against gold answers (sandboxed)")
    g.add_argument("--input", required=True, help="JSONL with 'prediction' and 'gold' per line")
    g.add_argument("--output", default=None, help="JSONL out (default: stdout)")
    g.add_argument("--mode", choices=["eval", "reward"], default="eval")
    g.add_argument("--timeout", type=float, default=5.0, help="seconds per item (default 5)")
    g.add_argument("--workers", type=int, default=2)
    g.set_defaults(fn=lambda a: _call("phi_reason.eval.grade_cli:main", **_kw(a)))


# ---------------------------------------------------------------- data (issue 6)
def _add_data(sub):
    p = sub.add_parser("decontaminate", help="drop training records sharing an n-gram with eval")
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True, nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--ngram", type=int, default=13)
    p.add_argument("--field", default=None)
    p.set_defaults(fn=lambda a: _call("phi_reason.data.decontaminate:main", **_kw(a)))


# ---------------------------------------------------------------- plan (issue 4)
def _add_plan(sub):
    p = sub.add_parser(
        "plan", help="per-device memory of a stage's programs (CONFIG.yaml) or of one train step "
        "(--model)", description="With CONFIG.yaml: every program the stage compiles (train "
        "step, log-prob passes, rollout) on the hardware the config's `target:` names, and "
        "whether each fits. With --model: one train step on --mesh / --devices.")
    p.add_argument("config", nargs="?", default=None, help="a run config (sft/dpo/rl/rollout-dpo)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    p.add_argument("--stage", default=None, choices=["sft", "dpo", "rl", "rollout-dpo"],
                   help="the config's stage (default: from its sections)")
    p.add_argument("--model", default=None, help="preset name or HF config.json / dir")
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=16,tensor=4")
    p.add_argument("--devices", type=int, default=None,
                   help="with --model: suggest a mesh for N devices; with CONFIG: the job's "
                   "devices (default: its target.devices)")
    p.add_argument("--batch", type=int, default=1, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=4096)
    from phi_reason.hardware import ACCELERATORS
    from phi_reason.model.config import REMAT_POLICIES
    p.add_argument("--remat", default="full", choices=REMAT_POLICIES)
    p.add_argument("--accelerator", default=None, type=str.lower,
                   help="default: the config's target.accelerator, else h100",
                   choices=[n for a in ACCELERATORS.values() for n in (a.name, *a.aliases)],
                   metavar="{" + ",".join(ACCELERATORS) + "}")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--compute-dtype", default="bfloat16")
    p.add_argument("--optimizer-dtype", default="float32")
    p.add_argument("--rollout-batch", type=int, default=0, help="KV cache for this many rows")
    p.add_argument("--logits-chunk", type=int, default=0,
                   help="train.logits_chunk: loss logits for N positions at a time (0: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=lambda a: _call("phi_reason.jobs.plan:main", **_kw(a)))


def _kw(ns):
    return {k: v for k, v in vars(ns).items() if k not in ("fn", "command", "direction")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi-reason",
        description="JAX-native post-training for Microsoft's Phi-4 reasoning models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_convert, _add_generate, _add_training, _add_eval, _add_data,
                _add_plan):
        add(sub)
    return parser


# Commands that run a model: on the CPU backend they keep XLA's step buffers (host_allocator).
_MODEL_COMMANDS = {"demo", "generate", "sft", "dpo", "rl", "rollout-dpo", "eval"}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in _MODEL_COMMANDS:
        from phi_reason.host_allocator import tune_for_cpu
        tune_for_cpu()  # before anything imports JAX
    try:
        return report_errors(args.fn, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
