"""RL run config: the trainer's `RunConfig` (model, data, train incl. train.pg, mesh, output)
plus an `rl` section. Loaded with the same YAML + dotted-override machinery (`phi_reason.config`).

Sizes: each RL step samples `rl.prompts_per_step` prompts x `rl.group_size` completions; the
policy is then updated `rl.mu` times over those rows in minibatches of `train.batch_size` sequences
(so one RL step = mu * prompts_per_step * group_size / train.batch_size optimizer updates).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

from ..config import RunConfig, RunConfigError, check_registered, load_run_config
from ..train.advantages import ADVANTAGES, SCALE_MODES
from ..train.policy import LOGPROB_TEMPERATURES
from ..train.rewards import RewardSpec, make_reward_fn
from ..train.schedules import TemperatureSchedule


@dataclasses.dataclass
class RewardSection:
    name: str = "binary"
    weight: float = 1.0
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TemperatureSection:
    start: float = 1.0
    end: float = 1.0
    anneal_steps: int = 0  # RL steps over which start -> end; then held at end
    kind: str = "linear"  # linear | cosine

    def build(self) -> TemperatureSchedule:
        return TemperatureSchedule(self.start, self.end, self.anneal_steps, self.kind)


@dataclasses.dataclass
class RLSection:
    steps: int = 10  # RL steps (rollout -> reward -> advantage -> updates)
    prompts_per_step: int = 8
    group_size: int = 8
    mu: int = 1  # policy-gradient passes over each step's rollouts
    max_new_tokens: int = 256  # response budget (longer rows are truncated: finish "length")
    max_prompt_tokens: int = 1024  # longer prompts are skipped
    pad_multiple: int = 64  # update batches are padded to a multiple of this length
    temperature: TemperatureSection = dataclasses.field(default_factory=TemperatureSection)
    top_p: float = 1.0
    top_k: int = 0
    # Sample at temperature T as params with final_norm / T at temperature 1 (exact; the sampler
    # compiles its temperature in, so annealing would otherwise recompile it every step).
    fold_temperature: bool = True
    num_slots: Optional[int] = None  # rows decoded at once (None: the step's rows, at most 256)
    rewards: List[RewardSection] = dataclasses.field(default_factory=lambda: [RewardSection()])
    advantage: str = "grpo"  # grpo | dr_grpo | rloo
    scale_rewards: str = "group"  # grpo: group | batch | none
    advantage_eps: float = 1e-4
    # Dynamic sampling: drop groups whose rewards are all equal (no gradient) and sample more
    # prompts to refill, up to max_sampling_rounds rounds per step.
    dynamic_sampling: bool = False
    oversample: float = 1.0  # prompts drawn per round = ceil(oversample * missing)
    max_sampling_rounds: int = 4
    # Prompt filtering by the group's pass rate (Phi-4-mini-reasoning: drop all-correct groups).
    prompt_filter: bool = False
    min_pass_rate: float = 0.0
    max_pass_rate: float = 1.0
    filter_all_wrong: bool = True  # with prompt_filter: also drop groups that never succeed
    # The temperature of every policy-gradient log-prob (old, new, reference; entropy too):
    # "sampling" (default): softmax(logits / T) at the step's sampling temperature T, as trl and
    # verl do, so the ratio and KL are those of the distribution the rollouts came from (T travels
    # in the batch as a traced [B] array: annealing recompiles nothing). "one": the policy at
    # T = 1 whatever it was sampled at (the behaviour before this option). Greedy (T = 0): T = 1.
    logprob_temperature: str = "sampling"
    # "recompute": old log-probs by one forward pass of the pre-update policy (exact for any mu,
    # any minibatch count). "sampler": the sampler's own log-probs (skips that pass; only valid when
    # mu == 1 and one minibatch per step, where old == current policy, and the sampler's log-probs
    # are at the trainer's temperature: temperature 1, or logprob_temperature sampling with
    # fold_temperature). The sampler/trainer mismatch (mismatch/* metrics) is logged every step
    # with recompute.
    old_logprobs: str = "recompute"
    # A stop signal (SIGTERM) is honoured inside a step at safe points: after every decode chunk
    # of this many tokens, every log-prob minibatch and every update minibatch (see rl_loop.py).
    safe_point_tokens: int = 256
    grader_workers: int = 2
    grader_timeout: float = 5.0
    # RL steps between held-out evaluations (0: only at the end, if eval_problems)
    eval_every: int = 0
    eval_problems: int = 0  # held-out problems (synthetic data only; greedy decoding)
    seed: int = 0


@dataclasses.dataclass
class RLRunConfig(RunConfig):
    rl: RLSection = dataclasses.field(default_factory=RLSection)

    def reward_specs(self) -> list:
        return [RewardSpec(r.name, r.weight, dict(r.kwargs)) for r in self.rl.rewards]

    def rows_per_step(self) -> int:
        return self.rl.prompts_per_step * self.rl.group_size

    def updates_per_step(self) -> int:
        return self.rl.mu * self.rows_per_step() // self.train.batch_size

    def sampler_logprobs_match(self) -> bool:
        """Whether the sampler's log-probs are of the distribution the trainer's log-probs are
        computed at, at every temperature of the schedule: with fold_temperature the sampler's
        log-probs are tempered (softmax(logits / T)), without it they are at T = 1."""
        t = self.rl.temperature
        values = {t.start} if t.anneal_steps == 0 else {t.start, t.end}
        if len(values) == 1 and values <= {0.0, 1.0}:
            return True  # T = 1 (or greedy: log-probs at 1) at every step, for both
        return (self.rl.logprob_temperature == "sampling") == self.rl.fold_temperature

    def validate(self, where: str = "rl config") -> None:
        rl = self.rl

        def bad(key, why):
            raise RunConfigError(f"{where}: rl.{key}: {why}")

        for key in ("steps", "prompts_per_step", "mu", "max_new_tokens", "max_prompt_tokens",
                    "pad_multiple", "max_sampling_rounds", "grader_workers",
                    "safe_point_tokens"):
            if getattr(rl, key) <= 0:
                bad(key, f"must be positive, got {getattr(rl, key)}")
        if rl.group_size < 2:
            bad("group_size",
                f"group-relative advantages need >= 2 completions, got {rl.group_size}")
        if self.rows_per_step() % self.train.batch_size:
            raise RunConfigError(
                f"{where}: train.batch_size {self.train.batch_size} must divide "
                f"rl.prompts_per_step x rl.group_size = {self.rows_per_step()}")
        for key, registry in (("advantage", ADVANTAGES), ("scale_rewards", SCALE_MODES)):
            try:
                check_registered(f"rl.{key}", getattr(rl, key), registry)
            except RunConfigError as e:
                raise RunConfigError(f"{where}: {e}") from None
        try:
            self.train.pg.validate("train.pg")
        except RunConfigError as e:
            raise RunConfigError(f"{where}: {e}") from None
        if rl.logprob_temperature not in LOGPROB_TEMPERATURES:
            bad("logprob_temperature", f"must be one of {', '.join(LOGPROB_TEMPERATURES)}, got "
                f"{rl.logprob_temperature!r}")
        if rl.old_logprobs not in ("recompute", "sampler"):
            bad("old_logprobs", f"must be recompute or sampler, got {rl.old_logprobs!r}")
        if rl.old_logprobs == "sampler" and (rl.mu != 1 or self.updates_per_step() != 1
                                             or not self.sampler_logprobs_match()):
            bad("old_logprobs", "'sampler' is only exact with mu = 1, one update per step and "
                "the sampler's log-probs at the trainer's temperature (temperature 1.0, or "
                "logprob_temperature 'sampling' with fold_temperature); use 'recompute'")
        if self.train.pg.tis:
            if rl.old_logprobs == "sampler":
                raise RunConfigError(
                    f"{where}: train.pg.tis: weighs recomputed old log-probs against the "
                    "sampler's; with rl.old_logprobs=sampler they are the same (weight 1): "
                    "use rl.old_logprobs=recompute")
            if not self.sampler_logprobs_match():
                raise RunConfigError(
                    f"{where}: train.pg.tis: the sampler's log-probs are not at the trainer's "
                    "temperature (set rl.fold_temperature=true with "
                    "rl.logprob_temperature=sampling)")
        if rl.oversample < 1.0:
            bad("oversample", f"must be >= 1, got {rl.oversample}")
        if not 0.0 <= rl.min_pass_rate <= rl.max_pass_rate <= 1.0:
            bad("min_pass_rate", f"need 0 <= min_pass_rate <= max_pass_rate <= 1, got "
                f"{rl.min_pass_rate}, {rl.max_pass_rate}")
        try:
            rl.temperature.build()
            make_reward_fn(self.reward_specs())
        except ValueError as e:
            raise RunConfigError(f"{where}: rl: {e}") from None


def load_rl_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RLRunConfig:
    cfg = load_run_config(path, overrides, schema=RLRunConfig)
    cfg.validate(str(path or "<defaults>"))
    return cfg
