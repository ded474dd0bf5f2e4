"""Rollouts: sample G completions per prompt on the live policy, grade them, score them, and lay
them out as policy-gradient batches. Shared by the RL loop (rl.py) and Rollout DPO (rollout_dpo.py).

Sampling runs on the accelerator in this thread; grading runs in the grader's worker processes, so
`RolloutRound.collect()` is separate from `sample_round(...)`: the caller submits grading and does
other device work (old / reference log-probs) before waiting for the verdicts.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from .rewards import Completion


@dataclasses.dataclass
class Prompt:
    """One RL problem: the rendered prompt ids, the gold answer and an id for logging/filtering."""
    ids: list
    answer: str
    uid: str = ""
    text: str = ""
    messages: Optional[list] = None  # the conversation the ids render (for writing DPO pairs)


@dataclasses.dataclass
class Group:
    """The G completions of one prompt, after grading and scoring."""
    prompt: Prompt
    tokens: list            # G lists of generated ids (stop token included when it ended the row)
    logprobs: list          # G lists of sampler log-probs, one per generated token
    finished: np.ndarray    # [G] bool: ended with a stop token
    texts: list             # G decoded responses (stop token removed)
    correct: np.ndarray     # [G] bool: grader verdict (reward mode)
    rewards: np.ndarray     # [G] float: composite reward
    advantages: Optional[np.ndarray] = None  # [G], set by the RL loop
    old_logprobs: Optional[list] = None  # G lists: pre-update policy log-probs (RL loop)
    ref_logprobs: Optional[list] = None  # G lists: reference log-probs (only when beta > 0)
    # The temperature the policy-gradient log-probs of these rows are computed at (the RL loop
    # sets it: the sampling temperature, or 1.0 with rl.logprob_temperature = one)
    temperature: float = 1.0

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)


def score_groups(prompts: Sequence[Prompt], tokens, logprobs, finish_reasons, texts, correct,
                 group_size: int, reward_fn: Callable[[Completion], float]) -> list:
    """Per-row sampler outputs (prompt-major: rows i*G .. i*G+G-1 belong to prompt i) -> Groups."""
    n = len(prompts) * group_size
    for name, seq in (("tokens", tokens), ("logprobs", logprobs),
                      ("finish_reasons", finish_reasons), ("texts", texts), ("correct", correct)):
        if len(seq) != n:
            raise ValueError(f"{name}: expected {n} rows ({len(prompts)} prompts x {group_size}), "
                             f"got {len(seq)}")
    groups = []
    for i, p in enumerate(prompts):
        rows = range(i * group_size, (i + 1) * group_size)
        finished = np.array([finish_reasons[j] == "stop" for j in rows])
        ok = np.array([bool(correct[j]) for j in rows])
        rewards = np.array([reward_fn(Completion(texts[j], len(tokens[j]), bool(finished[k]),
                                                 bool(ok[k])))
                            for k, j in enumerate(rows)], dtype=np.float64)
        groups.append(Group(p, [list(tokens[j]) for j in rows], [list(logprobs[j]) for j in rows],
                            finished, [texts[j] for j in rows], ok, rewards))
    return groups


def pad_length(longest: int, multiple: int, cap: Optional[int] = None) -> int:
    """Round a batch's longest row up to a multiple (few distinct shapes -> few recompiles)."""
    length = -(-longest // multiple) * multiple
    if cap is not None:
        length = min(length, max(cap, longest))
    return length


def build_pg_batch(prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                   advantages, length: int,
                   old_logprobs: Optional[Sequence[Sequence[float]]] = None,
                   pad_id: int = 0) -> dict:
    """Policy-gradient batch (CONTRACTS.md): each row is prompt + completion, left-aligned, padded
    to `length`. loss_mask = 1 on completion tokens; old_logprobs[b, t] is the log-prob of token t
    (zeros where not given or not a completion token)."""
    b = len(prompt_ids)
    if len(completions) != b or len(advantages) != b:
        raise ValueError(f"{b} prompts, {len(completions)} completions, "
                         f"{len(advantages)} advantages")
    tokens = np.full((b, length), pad_id, np.int32)
    positions = np.zeros((b, length), np.int32)
    segment_ids = np.zeros((b, length), np.int32)
    loss_mask = np.zeros((b, length), np.float32)
    old = np.zeros((b, length), np.float32)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        n = len(p) + len(c)
        if n > length:
            raise ValueError(f"row {i}: prompt {len(p)} + completion {len(c)} tokens "
                             f"> length {length}")
        tokens[i, :n] = list(p) + list(c)
        positions[i, :n] = np.arange(n)
        segment_ids[i, :n] = 1
        loss_mask[i, len(p):n] = 1.0
        if old_logprobs is not None:
            if len(old_logprobs[i]) != len(c):
                raise ValueError(f"row {i}: {len(old_logprobs[i])} log-probs for {len(c)} tokens")
            old[i, len(p):n] = old_logprobs[i]
    batch = {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
             "loss_mask": loss_mask, "advantages": np.asarray(advantages, np.float32)}
    if old_logprobs is not None:
        batch["old_logprobs"] = old
    return batch
