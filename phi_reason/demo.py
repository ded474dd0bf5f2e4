"""`phi-reason demo`: the Phi-4-mini-reasoning recipe at toy scale, on CPU, through the real code.

A tiny Phi-architecture model (char tokenizer) is trained from scratch on synthetic verifiable math:

  base (random init) -> mid-training (packed) -> SFT (unpacked) -> Rollout DPO -> RL (GRPO)

Each stage is an ordinary run of the project's commands: the demo writes the data as JSONL and each
stage's run config as YAML under `<out>/configs/`, then calls the same functions as
`phi-reason sft`,
`rollout-dpo`, `dpo` and `rl` with those files; every stage starts from the previous stage's
exported Orbax weights (`<out>/<stage>/final`). After each stage the model is evaluated greedily on
held-out problems with the sampler and the sandboxed grader. The demo only chooses sizes
(`configs/demo.yaml`).
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import yaml

from .errors import UsageError
from .files import atomic_write_text, write_jsonl
from .resources import config_path

STAGES = ("base", "midtrain", "sft", "dpo", "rl")
DEFAULT_CONFIG = config_path("demo.yaml")  # configs/demo.yaml, shipped in the package


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for k in parents:
        tree = tree.setdefault(k, {})
    tree[leaf] = value


def load_spec(config=None, quick=False, overrides=()) -> dict:
    from .config import parse_override

    path = Path(config) if config else DEFAULT_CONFIG
    if not path.exists():
        raise UsageError(f"demo config {path} not found (pass --config)")
    spec = yaml.safe_load(path.read_text())
    quick_part = spec.pop("quick", {})
    if quick:
        spec = _merge(spec, quick_part)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(spec, key, value)
    return spec


# ------------------------------------------------------------------------------------- data
def write_data(task: dict, seed: int, data_dir: Path) -> dict:
    """Disjoint synthetic splits: held-out eval, the mid-training corpus, the SFT subset and the
    prompts used for Rollout DPO and RL (all distinct problems). The mid-training corpus plays an
    unverified teacher: `task.midtrain_noise` of its traces end in a wrong boxed answer."""
    from .data.synthetic import make_problems, with_noisy_answers

    data_dir.mkdir(parents=True, exist_ok=True)
    common = dict(kinds=tuple(task["kinds"]), difficulty=task["difficulty"])
    sizes = {k: int(task[k]) for k in ("heldout", "midtrain", "sft", "dpo_prompts", "rl_prompts")}
    every = make_problems(sum(sizes.values()), seed, **common)
    splits, start = {}, 0
    for name, n in sizes.items():
        splits[name] = every[start:start + n]
        start += n
    noise = float(task.get("midtrain_noise", 0.0))
    splits["midtrain"] = with_noisy_answers(splits["midtrain"], noise, seed + 1)

    def chat(p):
        return {"messages": [{"role": "user", "content": p["problem"]},
                             {"role": "assistant", "content": p["solution"]}]}

    files = {}
    for name, records in splits.items():
        rows = ([chat(p) for p in records] if name in ("midtrain", "sft") else
                [{"prompt": p["problem"], "answer": p["answer"]} for p in records])
        files[name] = data_dir / f"{name}.jsonl"
        write_jsonl(files[name], rows)
    return files


# ------------------------------------------------------------------------------------- stages
def _stage_config(spec: dict, stage: str, out: Path, model_path: Path, files: dict) -> Path:
    """The stage's run config as YAML (runnable with the CLI on its own)."""
    data_common = {"tokenizer": "char", "chat_format": "plain"}
    base = {
        "model": {"path": str(model_path), "preset": None},
        "output": {"dir": str(out / stage), "tensorboard": False, "save_every": 10**6, "keep": 1},
    }
    if stage in ("midtrain", "sft"):
        base["data"] = {**data_common, "train_files": [str(files[stage])], "schema": "chat",
                        "packed": stage == "midtrain"}
    elif stage == "rollout":
        base["data"] = {**data_common, "train_files": [str(files["dpo_prompts"])], "schema": "rl"}
        base["output"]["dir"] = str(out / "rollout")
    elif stage == "dpo":
        base["data"] = {**data_common, "train_files": [str(out / "rollout" / "pairs.jsonl")],
                        "schema": "dpo"}
    elif stage == "rl":
        base["data"] = {**data_common, "train_files": [str(files["rl_prompts"])], "schema": "rl"}
    cfg = _merge(base, spec.get(stage, {}))
    path = out / "configs" / f"{stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class Evaluator:
    """Greedy held-out accuracy and mean response length of a saved model."""

    def __init__(self, heldout_file: Path, max_new_tokens: int, pool):
        from .data.sources import load_records
        from .data.tokenizer import load_tokenizer
        from .jobs.prompts import prompts_from_records

        self.tok = load_tokenizer("char")
        recs = load_records([str(heldout_file)], "rl")
        self.prompts, _ = prompts_from_records(recs.records, recs.where, self.tok, "plain", 10**6)
        self.max_new_tokens, self.pool = max_new_tokens, pool

    def __call__(self, model_dir: Path) -> dict:
        from .checkpoint import load_pretrained
        from .data.chat import stop_ids
        from .jobs.completions import grade, sample

        cfg, params = load_pretrained(str(model_dir))
        stops = stop_ids("plain", self.tok)
        out = sample(params, cfg, self.tok, [p.ids for p in self.prompts], stops,
                     self.max_new_tokens)
        texts = out.texts
        correct = [int(bool(c)) for c in
                   grade(self.pool, texts, [p.answer for p in self.prompts], "eval")]
        return {"accuracy": sum(correct) / len(correct), "correct": correct,
                "mean_response_tokens": sum(map(len, out.tokens)) / len(out.tokens),
                "sample": {"problem": self.prompts[0].text, "response": texts[0]}}


def _save_base(spec: dict, out: Path) -> Path:
    import jax

    from . import ModelConfig, init_params
    from .checkpoint import save_pretrained

    m = spec["model"]
    cfg = ModelConfig.preset(m.get("preset", "tiny"), **m.get("overrides", {}))
    params = init_params(cfg, jax.random.key(int(m.get("init_seed", 0))))
    path = out / "base" / "final"
    save_pretrained(cfg, params, str(path), format="orbax", overwrite=True)
    return path


def run_stages(spec: dict, out: Path, log=print) -> list:
    from .eval.pool import GraderPool
    from .jobs.dpo import run_dpo
    from .jobs.rl import run_rl
    from .jobs.sft import run_sft

    out.mkdir(parents=True, exist_ok=True)
    files = write_data(spec["task"], int(spec.get("seed", 0)), out / "data")
    results = []
    with GraderPool(workers=2, timeout=5.0) as pool:
        evaluate = Evaluator(files["heldout"], int(spec["eval"]["max_new_tokens"]), pool)
        model = None
        for stage in STAGES:
            log(f"\n=== stage: {stage} ===")
            t0 = time.time()
            if stage == "base":
                model = _save_base(spec, out)
            elif stage == "dpo" and not _rollout_pairs(spec, out, model, files, log):
                pass  # no (correct, incorrect) pair was sampled: the stage keeps the SFT model
            elif stage == "rl":
                _run_rl(_stage_config(spec, stage, out, model, files),
                        evaluate.prompts[:int(spec["eval"].get("rl_subset", 0))])
                model = out / stage / "final"
            else:
                runner = {"midtrain": run_sft, "sft": run_sft, "dpo": run_dpo, "rl": run_rl}[stage]
                _check(runner(str(_stage_config(spec, stage, out, model, files))), stage)
                model = out / stage / "final"
            train_time = time.time() - t0
            metrics = evaluate(model)
            correct = metrics["correct"]
            row = {"name": stage, "accuracy": metrics["accuracy"],
                   "stderr": binomial_se(correct),
                   "mean_response_tokens": metrics["mean_response_tokens"],
                   "train_seconds": round(train_time, 1),
                   "eval_seconds": round(time.time() - t0 - train_time, 1), "model": str(model),
                   "sample": metrics["sample"]}
            if results:
                prev = results[-1]["correct"]
                row["gain"] = row["accuracy"] - results[-1]["accuracy"]
                row["gain_stderr"] = paired_se(correct, prev)
            row["correct"] = "".join(map(str, correct))  # per held-out problem, in file order
            results.append(row)
            log(f"{stage}: held-out accuracy {row['accuracy']:.3f} +- {row['stderr']:.3f}, mean "
                f"response {row['mean_response_tokens']:.1f} tokens, {train_time:.0f}s")
    return results


def _run_rl(config_path: Path, eval_prompts: list) -> None:
    """`phi-reason rl CONFIG`, plus greedy accuracy on `eval_prompts` (a fixed subset of the
    held-out problems) every `rl.eval_every` steps, logged to the RL run's metrics.jsonl."""
    from .jobs.rl import train_rl
    from .jobs.rl_config import load_rl_config

    train_rl(load_rl_config(str(config_path)), eval_prompts=eval_prompts or None)


# ------------------------------------------------------------------------------------- statistics
def binomial_se(correct) -> float:
    """Standard error of an accuracy over n problems: sqrt(p (1 - p) / n)."""
    n = len(correct)
    p = sum(map(int, correct)) / n
    return math.sqrt(p * (1 - p) / n)


def paired_se(correct, prev) -> float:
    """Standard error of the gain mean(correct) - mean(prev) on the same problems: the SE of the
    mean of the per-problem differences d_i = correct_i - prev_i, sqrt(var(d) / n), var with
    divisor n (as binomial_se: against an all-wrong stage the two agree)."""
    d = [int(a) - int(b) for a, b in zip(correct, prev, strict=True)]
    n = len(d)
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / n / n)


def smooth(values, alpha: float = 0.2) -> list:
    """Exponential moving average (bias-corrected from the first value)."""
    out, ema = [], None
    for v in values:
        ema = v if ema is None else alpha * v + (1 - alpha) * ema
        out.append(ema)
    return out


def _rollout_pairs(spec: dict, out: Path, model: Path, files: dict, log) -> int:
    """Rollout DPO data from the current model; returns the number of pairs written."""
    from .jobs.rollout_dpo import run_rollout_dpo

    _check(run_rollout_dpo(str(_stage_config(spec, "rollout", out, model, files))), "rollout")
    pairs = sum(1 for _ in open(out / "rollout" / "pairs.jsonl"))
    if not pairs:
        log("dpo: the SFT model's samples gave no (correct, incorrect) pair; DPO is skipped")
    return pairs


def _check(rc: int, stage: str) -> None:
    if rc:
        raise RuntimeError(f"demo stage {stage} failed with exit code {rc}")


# ------------------------------------------------------------------------------------- report
def _rl_metrics(out: Path) -> list:
    path = out / "rl" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rl_reward_curve(out: Path) -> list:
    return [(r["step"], r["rollout/reward_mean"]) for r in _rl_metrics(out)
            if r.get("rollout/reward_mean") is not None]


def rl_eval_curve(out: Path, results: list, subset: int) -> list:
    """(step, greedy accuracy, binomial SE) on the RL stage's held-out subset; step 0 is the
    model RL started from, scored on the same problems from its held-out evaluation."""
    curve = []
    before = {r["name"]: r for r in results}.get("dpo")
    if subset and before is not None:
        first = before["correct"][:subset]
        curve.append((0, sum(map(int, first)) / len(first), binomial_se(first)))
    for r in _rl_metrics(out):
        if r.get("eval/accuracy") is not None:
            p = r["eval/accuracy"]
            curve.append((r["step"], p, math.sqrt(p * (1 - p) / subset)))
    return curve if len(curve) > 1 else []


def format_table(results: list) -> list:
    lines = [f"{'stage':<10} {'held-out acc':>12} {'+- SE':>6} {'gain':>7} {'+- SE':>6} "
             f"{'gain/SE':>7} {'mean length':>11} {'train time':>10}"]
    for r in results:
        gain = (f"{r['gain']:>+7.3f} {r['gain_stderr']:>6.3f} "
                f"{r['gain'] / r['gain_stderr'] if r['gain_stderr'] else float('inf'):>7.1f}"
                if "gain" in r else f"{'':>7} {'':>6} {'':>7}")
        lines.append(f"{r['name']:<10} {r['accuracy']:>12.3f} {r['stderr']:>6.3f} {gain} "
                     f"{r['mean_response_tokens']:>11.1f} {r['train_seconds']:>9.0f}s")
    return lines


def write_report(results: list, out: Path, elapsed: float, spec: dict | None = None) -> str:
    subset = int(((spec or {}).get("eval") or {}).get("rl_subset", 0))
    n = len(results[0]["correct"]) if results else 0
    summary = {"stages": results, "heldout_problems": n, "total_seconds": round(elapsed, 1),
               "rl_reward_curve": rl_reward_curve(out),
               "rl_eval_curve": rl_eval_curve(out, results, subset), "rl_eval_problems": subset}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    _plot(results, summary["rl_reward_curve"], summary["rl_eval_curve"], subset, out / "demo.png")
    lines = ["", *format_table(results),
             f"\nSE: binomial SE of the accuracy on the {n} held-out problems; the gain's SE is "
             f"paired (same problems, previous stage).",
             f"total {elapsed:.0f}s; summary.json and demo.png in {out}"]
    return "\n".join(lines)


def _plot(results, curve, eval_curve, subset: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    n = len(results[0]["correct"]) if results else 0
    acc = [r["accuracy"] for r in results]
    a.bar([r["name"] for r in results], acc, yerr=[r["stderr"] for r in results], capsize=4,
          color="tab:blue")
    a.set_ylabel("held-out accuracy (greedy)")
    a.set_ylim(0, min(1.0, max(acc + [0.05]) * 1.3))
    a.set_title(f"accuracy by stage ({n} held-out problems, +-1 SE)")
    if curve:
        steps, rewards = [s for s, _ in curve], [v for _, v in curve]
        b.plot(steps, rewards, color="tab:gray", alpha=0.5, lw=1, label="per step")
        b.plot(steps, smooth(rewards), color="tab:red", lw=2, label="EMA (alpha 0.2)")
        b.legend(loc="lower right")
    b.set_xlabel("RL step")
    b.set_ylabel("mean reward of the step's rollouts (+1 / -1)")
    b.set_title("RL reward")
    if eval_curve:
        c.errorbar([s for s, _, _ in eval_curve], [p for _, p, _ in eval_curve],
                   yerr=[e for _, _, e in eval_curve], marker="o", capsize=3, color="tab:green")
    c.set_xlabel("RL step (0: the DPO model)")
    c.set_ylabel("held-out accuracy (greedy)")
    c.set_title(f"RL: held-out accuracy on {subset} problems, +-1 SE")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------- entry
def main(out="./demo_out", quick=False, config=None, model=None, data=None, num_problems=5,
         overrides=()) -> int:
    if model is not None:
        from .demo_real import run_real_model

        return run_real_model(model, data, num_problems, out=out)
    spec = load_spec(config, quick, overrides)
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        print(f"error: output dir {out} is not empty; choose another --out or delete it",
              file=sys.stderr)
        return 2
    t0 = time.time()
    results = run_stages(spec, out)
    print(write_report(results, out, time.time() - t0, spec))
    return 0
