"""Rollout DPO data (Phi-4-mini-reasoning stage 3): sample k completions per prompt from a model,
grade them, and write (prompt, chosen = a correct completion, rejected = an incorrect one) pairs
as JSONL in the "dpo" schema that `phi-reason dpo` reads.

Only finished completions (ended by a stop token) can be chosen: DPO renders every response with an
end token, and a truncated "correct" text would teach the model to stop mid-thought. Truncated
completions are rejected candidates only with `rollout.rejected_truncated`.

Prompts are processed in chunks; each finished chunk is appended to `<output>.partial` with the
count of prompts done beside it, so `--resume` continues where a stopped run left off. The final
file appears (by rename) only when every prompt has been processed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..config import RunConfig, RunConfigError, load_run_config
from ..files import atomic_write_text
from ..sharding import processes


@dataclasses.dataclass
class RolloutSection:
    samples_per_prompt: int = 8  # k completions per prompt
    pairs_per_prompt: int = 1  # at most this many (chosen, rejected) pairs per prompt
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024
    max_prompts: Optional[int] = None  # only the first N prompts
    prompts_per_chunk: int = 64  # progress is saved after each chunk
    rejected_truncated: bool = False  # allow truncated (no stop token) completions as rejected
    output: Optional[str] = None  # default: <output.dir>/pairs.jsonl
    num_slots: Optional[int] = None
    grader_workers: int = 2
    grader_timeout: float = 5.0
    seed: int = 0


@dataclasses.dataclass
class RolloutDPOConfig(RunConfig):
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)

    def output_path(self) -> Path:
        return Path(self.rollout.output or Path(self.output.dir) / "pairs.jsonl")

    def validate(self) -> None:
        r = self.rollout
        for key in ("samples_per_prompt", "pairs_per_prompt", "max_new_tokens",
                    "max_prompt_tokens", "prompts_per_chunk", "grader_workers"):
            if getattr(r, key) <= 0:
                raise RunConfigError(f"rollout.{key}: must be positive, got {getattr(r, key)}")
        if r.samples_per_prompt < 2:
            raise RunConfigError("rollout.samples_per_prompt: need >= 2 completions to form a pair")


def make_pairs(texts: Sequence[str], correct: Sequence[bool], finished: Sequence[bool],
               max_pairs: int, rng: np.random.Generator, rejected_truncated: bool = False) -> list:
    """(chosen, rejected) texts from one prompt's completions: chosen among finished correct ones,
    rejected among incorrect ones (finished only unless rejected_truncated); each completion is used
    at most once, and identical texts are never paired."""
    good = [i for i, (c, f) in enumerate(zip(correct, finished)) if c and f]
    bad = [i for i, (c, f) in enumerate(zip(correct, finished))
           if not c and (f or rejected_truncated)]
    good = [good[i] for i in rng.permutation(len(good))]
    bad = [bad[i] for i in rng.permutation(len(bad))]
    pairs = []
    for gi, bi in zip(good, bad):
        if len(pairs) >= max_pairs:
            break
        if texts[gi] != texts[bi]:
            pairs.append((texts[gi], texts[bi]))
    return pairs


class PairsFile:
    """`<output>` is written as `<output>.partial` plus `<output>.progress` (prompts done, pairs
    written) after each chunk, and renamed into place when every prompt is done. Only process 0
    writes; every process reads the progress (the same shared file system)."""

    def __init__(self, out: Path):
        self.out = out
        self.partial = out.with_name(out.name + ".partial")
        self.progress = out.with_name(out.name + ".progress")
        self.lead = processes.is_lead()
        self.pairs = 0

    def start(self, resume: bool) -> int:
        """The number of prompts already done (0 unless resuming a stopped run)."""
        done = {"prompts": 0, "pairs": 0}
        if resume and self.progress.exists():
            done = json.loads(self.progress.read_text())
        if self.lead:
            lines = self.partial.read_text().splitlines() if done["prompts"] else []
            # Drop lines written after the last recorded chunk (a crash between append and record).
            self.partial.write_text("".join(line + "\n" for line in lines[:done["pairs"]]))
        processes.barrier("rollout-dpo:start")
        self.pairs = int(done["pairs"])
        return int(done["prompts"])

    def append(self, lines: list, prompts_done: int) -> None:
        self.pairs += len(lines)
        if not self.lead:
            return
        with open(self.partial, "a") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        atomic_write_text(self.progress, json.dumps({"prompts": prompts_done,
                                                     "pairs": self.pairs}))

    def publish(self) -> None:
        if self.lead:
            os.replace(self.partial, self.out)
            self.progress.unlink(missing_ok=True)
        processes.barrier("rollout-dpo:published")


def rollout_dpo(run: RolloutDPOConfig, *, model=None, tokenizer=None, prompts=None,
                resume: bool = False) -> dict:
    """Sample, grade and write pairs; returns counts. `model` = (ModelConfig, params) and `prompts`
    (lists of `Prompt` with .messages) override what the config would load."""
    from ..data.chat import stop_ids as format_stop_ids
    from ..data.tokenizer import load_tokenizer
    from ..eval.pool import GraderPool
    from .build import build_mesh, build_model, publish_config, say
    from .completions import grade, sample
    from .prompts import load_prompts

    run.validate()
    r = run.rollout
    out = run.output_path()
    if out.exists() and not resume:
        raise RunConfigError(f"{out}: already exists; choose another rollout.output or delete it")
    if out.exists():
        say(f"{out}: already complete")
        return {"prompts": 0, "pairs": sum(1 for _ in open(out)), "resumed": True}
    mesh = build_mesh(run)
    cfg, params = model if model is not None else build_model(run, mesh)
    tok = tokenizer or load_tokenizer(run.data.tokenizer)
    if prompts is None:
        prompts = load_prompts(run, tok, r.max_prompt_tokens)[0]
    prompts = list(prompts)[: r.max_prompts]
    stops = format_stop_ids(run.data.chat_format, tok)
    publish_config(run, out.with_name(out.name + ".config.yaml"))
    pairs_file = PairsFile(out)
    start = pairs_file.start(resume)
    stats = {"prompts": 0, "completions": 0, "correct": 0, "prompts_with_pair": 0}
    k = r.samples_per_prompt
    with GraderPool(r.grader_workers, r.grader_timeout) as pool:
        for c0 in range(start, len(prompts), r.prompts_per_chunk):
            chunk = prompts[c0:c0 + r.prompts_per_chunk]
            gen = sample(params, cfg, tok, [p.ids for p in chunk for _ in range(k)], stops,
                         r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                         top_k=r.top_k, seed=r.seed * 1_000_003 + c0, num_slots=r.num_slots,
                         mesh=mesh)
            texts = gen.texts
            correct = grade(pool, texts, [p.answer for p in chunk for _ in range(k)], "reward")
            finished = [f == "stop" for f in gen.finish_reasons]
            lines = []
            for i, p in enumerate(chunk):
                sl = slice(i * k, (i + 1) * k)
                rng = np.random.default_rng([r.seed, c0 + i])
                pairs = make_pairs(texts[sl], correct[sl], finished[sl], r.pairs_per_prompt, rng,
                                   r.rejected_truncated)
                stats["prompts_with_pair"] += bool(pairs)
                messages = p.messages or [{"role": "user", "content": p.text}]
                lines += [json.dumps({"prompt": messages, "chosen": c, "rejected": rj,
                                      "answer": p.answer, "uid": p.uid}) + "\n"
                          for c, rj in pairs]
            stats["prompts"] += len(chunk)
            stats["completions"] += len(texts)
            stats["correct"] += int(sum(correct))
            pairs_file.append(lines, c0 + len(chunk))
    pairs_file.publish()
    stats["pairs"] = pairs_file.pairs
    say(f"rollout-dpo: {pairs_file.pairs} pairs from {stats['prompts']} prompts "
        f"({stats['correct']}/{stats['completions']} completions correct) -> {out}")
    return stats


def run_rollout_dpo(config, overrides: Sequence[str] = (), resume: bool = False) -> int:
    """`phi-reason rollout-dpo CONFIG [k=v ...] [--resume]`."""
    if isinstance(config, RolloutDPOConfig):
        run = config
    else:
        run = load_run_config(config, overrides, schema=RolloutDPOConfig)
    rollout_dpo(run, resume=resume)
    return 0
