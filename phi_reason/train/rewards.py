"""Verifiable rewards for RL, composable by name + weight.

Every reward is a pure function of one graded completion (`Completion`) and keyword constants, and
returns a float. `RewardSpec(name, weight, kwargs)` entries are summed by `make_reward_fn`, so the
Phi-4-reasoning-plus recipe is

    [RewardSpec("phi4_plus_length", 8/13), RewardSpec("repetition", 1/13)]

and the Phi-4-mini-reasoning recipe is `[RewardSpec("binary", 1.0)]`.

A reward that has both an incomplete case (no stop token within the budget) and a malformed case
decides incomplete first: a response cut off mid-thought has no `</think>` yet, so its format is
unknown; only a finished response can be malformed (`phi4_plus_length`; `binary` has no format
case).

Lengths are counted in response tokens: `Completion.num_tokens` is the number of generated tokens,
including the stop token that ended the row (what the sampler returns).
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any, Callable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled response after grading.

    text: the decoded response (without the prompt); num_tokens: generated tokens (stop token
    included); finished: ended with a stop token within the budget (False = truncated at the length
    limit); correct: the grader's verdict in reward mode (final \\boxed{} after </think>).
    """
    text: str
    num_tokens: int
    finished: bool
    correct: bool


RewardFunction = Callable[..., float]
REWARDS: dict[str, RewardFunction] = {}


def register_reward(name: str):
    def deco(fn):
        REWARDS[name] = fn
        return fn
    return deco


def think_block_ok(text: str, open_tag: str = "<think>", close_tag: str = "</think>") -> bool:
    """A well-formed response opens exactly one think block at its start (only whitespace before it)
    and closes it exactly once afterwards."""
    if text.count(open_tag) != 1 or text.count(close_tag) != 1:
        return False
    start = text.index(open_tag)
    return text[:start].strip() == "" and text.index(close_tag) > start


@register_reward("binary")
def binary_reward(c: Completion, *, correct_value: float = 1.0, wrong_value: float = -1.0,
                  truncated_is_wrong: bool = True) -> float:
    """+1 / -1 verifiable reward (Phi-4-mini-reasoning RL). A truncated response scores as wrong
    by default: without a stop token the answer was never committed to."""
    if truncated_is_wrong and not c.finished:
        return wrong_value
    return correct_value if c.correct else wrong_value


def _half_cosine(r: float) -> float:
    """0.25 * (1 + cos(pi * r)): 0.5 at r = 0 falling to 0 at r = 1."""
    return 0.25 * (1.0 + math.cos(math.pi * r))


@register_reward("phi4_plus_length")
def phi4_plus_length_reward(c: Completion, *, l_max: int = 31744, l_pos_control: int = 25600,
                            l_neg_control: int = 3702, incomplete_value: float = -0.5,
                            malformed_value: float = -1.0, check_think: bool = True,
                            open_tag: str = "<think>", close_tag: str = "</think>") -> float:
    """Phi-4-reasoning-plus length-aware accuracy reward.

    correct: r = min(1, max(L - l_pos_control, 0) / (l_max - l_pos_control)),
             R = 0.5 + 0.25(1 + cos pi r)
      (1.0 up to 25,600 tokens, then falling to 0.5 at 31,744: long correct answers are tolerated);
    wrong:   r = min(1, L / l_neg_control), R = -0.5 - 0.25(1 + cos pi r)
      (-1.0 at L = 0 rising to -0.5 from 3,702 tokens: a wrong answer should at least think longer);
    no stop token within the budget: -0.5 (checked first); malformed think block: -1.0.

    Order (the rule for every reward with both cases): a response cut at the budget while still
    thinking has no `</think>` yet, so its think block cannot be judged; it is incomplete, never
    malformed. Only a finished response (stop token within the budget) is checked for format.
    """
    if not c.finished:
        return incomplete_value
    if check_think and not think_block_ok(c.text, open_tag, close_tag):
        return malformed_value
    length = c.num_tokens
    if c.correct:
        r = min(1.0, max(length - l_pos_control, 0) / (l_max - l_pos_control))
        return 0.5 + _half_cosine(r)
    r = min(1.0, length / l_neg_control)
    return -0.5 - _half_cosine(r)


def repetition_penalty(text: str, n: int = 5, min_count: int = 5, clip: bool = True) -> float:
    """-max(frequent / total, max_count / (words / n)) over the response's word n-grams.

    Reading of the paper's formula (documented choice): words are whitespace-separated tokens;
    `total` = number of distinct n-grams; `frequent` = number of distinct n-grams that occur more
    than `min_count` times; `max_count` = occurrences of the most frequent n-gram; `words / n` is
    how many non-overlapping n-grams the text could hold, so the second term is the share of the
    text one repeated n-gram covers. Overlapping occurrences can push that term above 1 (e.g. one
    word repeated), so with `clip` the penalty is bounded to [-1, 0], the range of the accuracy term
    it is weighed against. Texts shorter than n words have no n-grams and no penalty.
    """
    words = text.split()
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    frequent = sum(1 for v in counts.values() if v > min_count)
    penalty = max(frequent / len(counts), max(counts.values()) / (len(words) / n))
    if clip:
        penalty = min(penalty, 1.0)
    return -penalty


@register_reward("repetition")
def repetition_reward(c: Completion, *, n: int = 5, min_count: int = 5, clip: bool = True) -> float:
    return repetition_penalty(c.text, n=n, min_count=min_count, clip=clip)


def soft_overlong_penalty(length: int, l_max: int, l_cache: int) -> float:
    """DAPO's soft overlong punishment: 0 up to l_max - l_cache tokens, then a linear ramp to -1 at
    l_max, and -1 beyond."""
    if l_cache <= 0 or l_cache > l_max:
        raise ValueError("soft overlong penalty needs 0 < l_cache <= l_max, "
                         f"got l_cache={l_cache}, l_max={l_max}")
    threshold = l_max - l_cache
    if length <= threshold:
        return 0.0
    if length <= l_max:
        return (threshold - length) / l_cache
    return -1.0


@register_reward("dapo_overlong")
def dapo_overlong_reward(c: Completion, *, l_max: int, l_cache: int) -> float:
    return soft_overlong_penalty(c.num_tokens, l_max, l_cache)


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One term of a composite reward: the registry name, its weight and its constants."""
    name: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "rewards") -> "RewardSpec":
        if not isinstance(d, Mapping) or "name" not in d:
            raise ValueError(f"{where}: each reward needs a 'name' (one of {sorted(REWARDS)}), "
                             f"got {d!r}")
        unknown = set(d) - {"name", "weight", "kwargs"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} "
                             "(allowed: name, weight, kwargs)")
        return cls(str(d["name"]), float(d.get("weight", 1.0)), dict(d.get("kwargs") or {}))


def make_reward_fn(specs: Sequence[RewardSpec | Mapping[str, Any]]
                   ) -> Callable[[Completion], float]:
    """Weighted sum of registered rewards. Unknown names and bad constants fail here, not
    mid-run."""
    resolved = [s if isinstance(s, RewardSpec) else RewardSpec.from_dict(s, f"rewards[{i}]")
                for i, s in enumerate(specs)]
    if not resolved:
        raise ValueError("at least one reward is required")
    for i, s in enumerate(resolved):
        if s.name not in REWARDS:
            raise ValueError(f"rewards[{i}]: unknown reward {s.name!r}; known: {sorted(REWARDS)}")
        # Probe once so a misspelled constant raises now with the reward's name attached.
        try:
            REWARDS[s.name](Completion("<think></think>", 1, True, True), **s.kwargs)
        except TypeError as e:
            raise ValueError(f"rewards[{i}] ({s.name}): bad kwargs {dict(s.kwargs)}: {e}") from None

    def reward(c: Completion) -> float:
        return float(sum(s.weight * REWARDS[s.name](c, **s.kwargs) for s in resolved))

    return reward


PHI4_PLUS_REWARDS = (RewardSpec("phi4_plus_length", 8 / 13), RewardSpec("repetition", 1 / 13))
BINARY_REWARDS = (RewardSpec("binary", 1.0),)
