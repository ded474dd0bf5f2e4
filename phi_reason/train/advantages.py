"""Group-relative advantage estimators and dynamic-sampling filters (pure numpy).

Rewards arrive as a [num_prompts, group_size] array: row i holds the G completions of prompt i.
Estimators are chosen by name from `ADVANTAGES` and return the same shape.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

ADVANTAGES: dict[str, Callable[..., np.ndarray]] = {}
SCALE_MODES = ("group", "batch", "none")


def register_advantage(name: str):
    def deco(fn):
        ADVANTAGES[name] = fn
        return fn
    return deco


def _as_groups(rewards) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be [num_prompts, group_size >= 2], got shape {r.shape}")
    return r


def _scale_mode(scale_rewards) -> str:
    # TRL accepts booleans (True = per group) as well as the mode names.
    if scale_rewards is True:
        return "group"
    if scale_rewards is False or scale_rewards is None:
        return "none"
    if scale_rewards not in SCALE_MODES:
        raise ValueError(f"scale_rewards must be one of {SCALE_MODES} or a bool, "
                         f"got {scale_rewards!r}")
    return scale_rewards


@register_advantage("grpo")
def grpo_advantages(rewards, *, scale_rewards="group", eps: float = 1e-4, ddof: int = 1
                    ) -> np.ndarray:
    """GRPO: A = (r - mean_group) / (std + eps). `ddof=1` (unbiased std) matches TRL, which uses
    torch's default std; "batch" scales by the std of all rewards; "none" is Dr. GRPO's choice."""
    r = _as_groups(rewards)
    centred = r - r.mean(axis=1, keepdims=True)
    mode = _scale_mode(scale_rewards)
    if mode == "group":
        return centred / (r.std(axis=1, ddof=ddof, keepdims=True) + eps)
    if mode == "batch":
        return centred / (r.std(ddof=ddof) + eps)
    return centred


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards, **_) -> np.ndarray:
    """Dr. GRPO: mean-centred only (no std scaling, which over-weights near-uniform groups)."""
    r = _as_groups(rewards)
    return r - r.mean(axis=1, keepdims=True)


@register_advantage("rloo")
def rloo_advantages(rewards, **_) -> np.ndarray:
    """REINFORCE leave-one-out: baseline for sample i is the mean of the other G - 1 rewards."""
    r = _as_groups(rewards)
    g = r.shape[1]
    baseline = (r.sum(axis=1, keepdims=True) - r) / (g - 1)
    return r - baseline


def compute_advantages(name: str, rewards, **kwargs) -> np.ndarray:
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGES)}")
    return ADVANTAGES[name](rewards, **kwargs)


def nonzero_variance_groups(rewards, tol: float = 1e-8) -> np.ndarray:
    """[num_prompts] bool: groups whose rewards are not all equal. A zero-variance group has zero
    group-relative advantage everywhere and contributes no gradient (DAPO's dynamic sampling)."""
    r = _as_groups(rewards)
    return (r.max(axis=1) - r.min(axis=1)) > tol


def pass_rate_keep(correct, min_pass: float = 0.0, max_pass: float = 1.0,
                   keep_all_wrong: bool = False, keep_all_correct: bool = False) -> np.ndarray:
    """[num_prompts] bool: prompt filtering by measured pass rate (Phi-4-mini-reasoning RL drops
    prompts the policy always solves and those it never solves). Kept when
    min_pass <= pass rate <= max_pass and the group is neither all-correct nor all-wrong (unless the
    matching keep_* flag says otherwise)."""
    c = np.asarray(correct, dtype=bool)
    if c.ndim != 2:
        raise ValueError(f"correct must be [num_prompts, group_size], got shape {c.shape}")
    rate = c.mean(axis=1)
    keep = (rate >= min_pass) & (rate <= max_pass)
    if not keep_all_correct:
        keep &= rate < 1.0
    if not keep_all_wrong:
        keep &= rate > 0.0
    return keep


class GroupBuffer:
    """Collects kept groups across sampling rounds until a batch is full (dynamic sampling with
    oversampling: sample more prompts than needed, drop the uninformative groups, refill)."""

    def __init__(self, target: int):
        if target < 1:
            raise ValueError(f"target number of groups must be >= 1, got {target}")
        self.target = target
        self.groups: list = []
        self.seen = 0

    def add(self, groups, keep) -> None:
        keep = np.asarray(keep, dtype=bool)
        if len(groups) != len(keep):
            raise ValueError(f"{len(groups)} groups but {len(keep)} keep flags")
        self.seen += len(groups)
        for g, k in zip(groups, keep):
            if k and len(self.groups) < self.target:
                self.groups.append(g)

    @property
    def missing(self) -> int:
        return self.target - len(self.groups)

    @property
    def full(self) -> bool:
        return self.missing <= 0
