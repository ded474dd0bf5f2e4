"""Prompts for rollouts (RL, Rollout DPO): loading them from a run config, and the RL prompt stream.

The RL prompt stream (`PromptIterator`): each epoch is a fresh permutation drawn from (seed, epoch),
so the stream is reproducible and its position is two integers. Prompts the policy has mastered (a
whole group correct) can be *retired*: skipped in later epochs (Phi-4-mini-reasoning's prompt
filtering drops all-correct prompts). `get_state()` / `set_state()` round-trip through JSON for
checkpoints.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..train.rollouts import Prompt


class PromptIterator:
    def __init__(self, prompts: Sequence[Prompt], seed: int = 0, shuffle: bool = True):
        if not prompts:
            raise ValueError("the RL prompt set is empty")
        uids = [p.uid for p in prompts]
        if len(set(uids)) != len(uids):
            raise ValueError("RL prompts need unique uids")
        self.prompts = list(prompts)
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self.retired: set = set()
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.prompts))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def retire(self, uids) -> None:
        self.retired.update(uids)

    def take(self, n: int) -> list:
        """The next n active prompts (wrapping into new epochs)."""
        if len(self.retired) >= len(self.prompts):
            raise RuntimeError("every RL prompt has been retired by the prompt filter")
        out = []
        while len(out) < n:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            p = self.prompts[self._order[self.index]]
            self.index += 1
            if p.uid not in self.retired:
                out.append(p)
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "retired": sorted(self.retired),
                "seed": self.seed, "num_prompts": len(self.prompts)}

    def set_state(self, state: dict) -> None:
        if state.get("num_prompts") != len(self.prompts) or state.get("seed") != self.seed:
            raise ValueError(f"prompt iterator state is for {state.get('num_prompts')} prompts "
                             f"(seed {state.get('seed')}), this run has {len(self.prompts)} "
                             f"(seed {self.seed})")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.retired = set(state["retired"])
        self._order = self._permutation(self.epoch)


def prompts_from_records(records, where, tokenizer, fmt: str, max_prompt_tokens: int) -> tuple:
    """RL records ({"prompt": messages or text, "answer"}) -> (Prompts, number skipped as too long).
    A record's uid is where it came from ("file:line"), so retirement survives reordering."""
    from ..data.chat import render_prompt

    out, skipped = [], 0
    for rec, loc in zip(records, where):
        ids = render_prompt(rec["prompt"], tokenizer, fmt)
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        messages = ([{"role": "user", "content": rec["prompt"]}] if isinstance(rec["prompt"], str)
                    else list(rec["prompt"]))
        out.append(Prompt(ids, str(rec["answer"]), str(loc), messages[-1]["content"], messages))
    return out, skipped


def synthetic_prompts(spec: dict, tokenizer, fmt: str, max_prompt_tokens: int,
                      eval_problems: int = 0) -> tuple:
    """(train Prompts, held-out Prompts) from `data.synthetic` (make_problems keyword arguments).
    Held-out problems come from another seed and exclude every training question."""
    from ..data.synthetic import make_problems

    train = make_problems(**spec)
    recs = [{"prompt": p["problem"], "answer": p["answer"]} for p in train]
    prompts, _ = prompts_from_records(recs, [f"synthetic:{i}" for i in range(len(recs))],
                                      tokenizer, fmt, max_prompt_tokens)
    held: list = []
    if eval_problems:
        spec_eval = dict(spec, n=eval_problems, seed=int(spec.get("seed", 0)) + 10_007,
                         exclude=tuple(spec.get("exclude", ()))
                         + tuple(p["problem"] for p in train))
        fresh = make_problems(**spec_eval)
        recs = [{"prompt": p["problem"], "answer": p["answer"]} for p in fresh]
        held, _ = prompts_from_records(recs, [f"heldout:{i}" for i in range(len(recs))],
                                       tokenizer, fmt, max_prompt_tokens)
    return prompts, held


def load_prompts(run, tokenizer, max_prompt_tokens: int, eval_problems: int = 0) -> tuple:
    """(prompts, held-out prompts) for a rollout job: `data.train_files` (schema "rl": prompt +
    answer; prompts longer than `max_prompt_tokens` are skipped, and counted on stderr) or
    `data.synthetic` (held-out problems only there)."""
    import sys

    from ..config import RunConfigError

    d = run.data
    if d.train_files:
        from ..data.sources import load_records
        recs = load_records(d.train_files, d.schema or "rl", d.skip_bad_records)
        prompts, skipped = prompts_from_records(recs.records, recs.where, tokenizer,
                                                d.chat_format, max_prompt_tokens)
        if skipped:
            print(f"skipped {skipped} prompts longer than {max_prompt_tokens} tokens",
                  file=sys.stderr)
        return prompts, []
    if d.synthetic is not None:
        return synthetic_prompts(d.synthetic, tokenizer, d.chat_format, max_prompt_tokens,
                                 eval_problems)
    raise RunConfigError("data: set data.train_files (records with prompt + answer) or "
                         "data.synthetic")
