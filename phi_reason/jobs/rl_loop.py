"""The RL loop, one RL step at a time (`rl.py` runs it through the trainer): rollout -> grade ->
reward -> advantage -> filter -> policy-gradient updates.

One RL step (`RLLoop.step`):
1. draw prompts from the resumable `PromptIterator`; sample `group_size` completions each with the
   sampler on the live policy params at the scheduled temperature;
2. submit the completions to the grader's worker pool and, while they are graded, compute the old
   log-probs of every sampled row with one forward pass of the pre-update policy (and the
   reference log-probs when `train.pg.beta > 0`);
3. score each group (composite reward), drop groups per the filters (dynamic sampling: zero
   reward variance; prompt filter: pass rate), and sample more prompts to refill when asked;
4. group-relative advantages, then `rl.mu` passes of minibatch updates with the trainer's
   `make_pg_step` (minibatches of `train.batch_size` rows; a short last minibatch, left when
   filters kept fewer groups, is padded with empty rows that carry no loss but still count in the
   per-sequence mean, so a partial minibatch takes a proportionally smaller step).

Old log-probs (choice documented): by default they are recomputed by the trainer's forward pass,
which is exact for any number of minibatches and epochs (after the first update the policy has
moved, so the per-update on-policy shortcut would be wrong) and matches the training numerics
(the sampler's KV-cache path differs by rounding). `rl.old_logprobs = sampler` takes the
sampler's log-probs instead and is only allowed where old == current policy: mu = 1, one update
per step, and the sampler's log-probs at the trainer's temperature.

Temperature: rollouts are sampled at the scheduled temperature T (folded into `final_norm`, so
the sampler's log-probs are those of softmax(logits / T)). With `rl.logprob_temperature =
sampling` (default, as trl and verl) every policy-gradient log-prob - old, new, reference - is
computed from logits / T too: the batch carries a per-row `temperature` [B] (a traced array, so
annealing recompiles nothing). `one` computes them at T = 1 (the behaviour before the option).

Sampler/trainer mismatch: with recomputed old log-probs every step logs `mismatch/*` (mean
|delta log p|, k3 KL(sampler || trainer), max / min ratio p_trainer / p_sampler) over every
sampled row; `train.pg.tis` weights each token's surrogate by min(exp(old - sampler), C).

`extra_state()` / `load_extra_state()` hold what a checkpoint needs beyond the TrainState: the RL
step, the prompt-iterator position and retired prompts (the temperature is a function of the step).

Stopping inside a step (`interrupt`, set by the trainer: True once the processes agreed to stop):
asked after every decode chunk of rl.safe_point_tokens tokens, every log-prob minibatch and before
every update minibatch. During rollouts the step's partial work is dropped (nothing of the state
changed yet; the prompt stream is rewound) and the trainer saves the last completed step; during
updates the step's rows and progress are kept (`rl_pending.PendingUpdate`, saved with the state),
and `--resume` applies the remaining minibatches. Either way the resumed run equals an
uninterrupted one bitwise.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from ..engine.sampler import GenerationInterrupted, batch_shards
from ..train.advantages import (
    GroupBuffer,
    compute_advantages,
    nonzero_variance_groups,
    pass_rate_keep,
)
from ..train.policy import (
    fold_temperature,
    frozen_reference,
    logprob_mismatch,
    logprob_temperature,
    make_token_logprob_fn,
)
from ..train.rewards import make_reward_fn
from ..train.rollouts import Group, Prompt, build_pg_batch, pad_length, score_groups
from ..train.state import TrainState
from ..train.steps import make_pg_step
from .build import place_global_batch
from .completions import grade, sample, submit_grading
from .prompts import PromptIterator
from .rl_config import RLRunConfig
from .rl_pending import PendingUpdate, training_rows
from .timing import PhaseTimer
from .trainer import StepInterrupted

_COMPILED: dict = {}


def _cached(key, build):
    """Jitted functions shared by every RLLoop with the same model and train settings (a demo or a
    test runs several loops; each fresh closure would otherwise compile again)."""
    if key not in _COMPILED:
        _COMPILED[key] = build()
    return _COMPILED[key]


def evaluate_policy(params, cfg, tokenizer, prompts: Sequence[Prompt], stop_ids, grader, *,
                    max_new_tokens: int, samples: int = 1, temperature: float = 0.0,
                    seed: int = 12345, mode: str = "eval", num_slots=None, mesh=None) -> dict:
    """Accuracy of `samples` completions per prompt (greedy by default), graded in `mode`."""
    out = sample(params, cfg, tokenizer, [p.ids for p in prompts for _ in range(samples)],
                 stop_ids, max_new_tokens, temperature=temperature, seed=seed,
                 num_slots=num_slots, mesh=mesh)
    correct = np.asarray(grade(grader, out.texts, [p.answer for p in prompts
                                                   for _ in range(samples)], mode))
    return {"eval/accuracy": float(correct.mean()),
            "eval/truncated": float(np.mean([r == "length" for r in out.finish_reasons]))}


def rl_engine_rows(config: RLRunConfig, shards: int) -> int:
    """Rows the engine decodes at once (over `shards` batch shards) in every RL sampling call:
    rl.num_slots, else the step's rows up to MAX_ROWS per shard. The planner reads it too."""
    from ..engine.paged_sampler import MAX_ROWS
    return config.rl.num_slots or min(MAX_ROWS * shards, config.rows_per_step())


def _rollout_seed(seed: int, step: int, round_: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + round_ * 7) % (2 ** 31 - 1)


class RLLoop:
    """Holds the policy TrainState, the frozen reference (when beta > 0), the prompt stream and the
    jitted functions; `step(grader)` runs one RL step and returns its metrics."""

    def __init__(self, config: RLRunConfig, model_cfg, params, tokenizer, prompts: Sequence[Prompt],
                 stop_ids: Sequence[int], grader, mesh=None, optimizer_steps: Optional[int] = None):
        from ..train.optim import make_optimizer

        config.validate()
        if config.train.steps is None:  # the lr schedule's length: every update of the run
            steps = optimizer_steps or config.rl.steps * config.updates_per_step()
            config = dataclasses.replace(config,
                                         train=dataclasses.replace(config.train, steps=steps))
        self.config, self.rl, self.model_cfg = config, config.rl, model_cfg
        self.tokenizer, self.stop_ids, self.mesh = tokenizer, tuple(stop_ids), mesh
        self.place = functools.partial(place_global_batch, mesh=mesh)
        self.grader = grader  # a GraderPool (or anything with .submit(prediction, gold, mode))
        self.reward_fn = make_reward_fn(config.reward_specs())
        self.temperature = self.rl.temperature.build()
        self.prompts = PromptIterator(prompts, seed=self.rl.seed)
        optimizer, _ = make_optimizer(config.train, model_cfg)
        beta = config.train.pg.beta
        self.ref_params = frozen_reference(params, model_cfg) if beta > 0 else None
        self.state = TrainState.create(params, optimizer, seed=config.train.seed)
        train_key = repr(dataclasses.asdict(config.train))
        self.pg_step = _cached(("pg", model_cfg, train_key, mesh),
                               lambda: make_pg_step(model_cfg, config.train, mesh))
        # the old-policy and reference passes: the train step's micro-batches and logits chunk
        chunk, micro = config.train.logits_chunk, config.train.accumulation_steps
        self.logprob_fn = _cached(("logprob", model_cfg, mesh, chunk, micro),
                                  lambda: make_token_logprob_fn(model_cfg, mesh, chunk, micro))
        self.step_index = 0
        self.pending: Optional[PendingUpdate] = None  # a step stopped inside its updates
        self.interrupt: Callable[[], bool] = lambda: False  # the trainer's stop check
        self.timer = PhaseTimer()
        # One row count for every sampling call (rounds of different sizes, evaluation), so the
        # engine's pool has one size and its device functions compile once per bucket.
        self.num_slots = rl_engine_rows(config, batch_shards(mesh))

    # ------------------------------------------------------------------ rollouts
    def sample(self, prompts: Sequence[Prompt], temperature: float, seed: int, group_size: int,
               max_new_tokens: Optional[int] = None):
        rows = [p.ids for p in prompts for _ in range(group_size)]
        params = self.state.params
        if self.rl.fold_temperature and temperature not in (0.0, 1.0):
            params, temperature = fold_temperature(params, temperature), 1.0
        return sample(params, self.model_cfg, self.tokenizer, rows, self.stop_ids,
                      max_new_tokens or self.rl.max_new_tokens, temperature=temperature,
                      top_p=self.rl.top_p if temperature else 1.0,
                      top_k=self.rl.top_k if temperature else 0, seed=seed,
                      num_slots=self.num_slots, mesh=self.mesh, interrupt=self.interrupt,
                      interrupt_every=self.rl.safe_point_tokens)

    def logprob_temperature(self, temperature: float) -> float:
        """The temperature of the policy-gradient log-probs of rows sampled at `temperature`."""
        return logprob_temperature(temperature, self.rl.logprob_temperature)

    def row_logprobs(self, params, prompt_rows, completions, temperature: float = 1.0) -> list:
        """Per-row completion log-probs under params at `temperature` (of softmax(logits / T)), in
        minibatches of train.batch_size rows (padded to a multiple of rl.pad_multiple, so shapes
        repeat across steps; the temperature is a traced [B] array, so it never recompiles)."""
        bs = self.config.train.batch_size
        out = []
        for start in range(0, len(completions), bs):
            if self.interrupt():
                raise StepInterrupted()
            p, c = prompt_rows[start:start + bs], completions[start:start + bs]
            n_real = len(c)
            p, c = list(p) + [[0]] * (bs - n_real), list(c) + [[]] * (bs - n_real)
            length = pad_length(max(len(a) + len(b) for a, b in zip(p, c)), self.rl.pad_multiple)
            batch = build_pg_batch(p, c, np.zeros(bs), length)
            inputs = {k: batch[k] for k in ("tokens", "positions", "segment_ids")}
            inputs["temperature"] = np.full(bs, temperature, np.float32)
            inputs = self.place(inputs)
            lp = np.asarray(self.logprob_fn(params, inputs))
            out.extend(lp[i, len(p[i]):len(p[i]) + len(c[i])].tolist() for i in range(n_real))
        return out

    def rollout_round(self, prompts: Sequence[Prompt], temperature: float, seed: int) -> list:
        """Sample, grade (in the pool, overlapped with the log-prob passes) and score one round."""
        g = self.rl.group_size
        with self.timer("sample"):
            out = self.sample(prompts, temperature, seed, g)
        texts = out.texts
        answers = [p.answer for p in prompts for _ in range(g)]
        pending = submit_grading(self.grader, list(zip(texts, answers)), "reward")
        prompt_rows = [p.ids for p in prompts for _ in range(g)]
        lp_temperature = self.logprob_temperature(temperature)
        with self.timer("logprob"):
            old = (out.logprobs if self.rl.old_logprobs == "sampler" else
                   self.row_logprobs(self.state.params, prompt_rows, out.tokens, lp_temperature))
            ref = None
            if self.ref_params is not None:
                ref = self.row_logprobs(self.ref_params, prompt_rows, out.tokens, lp_temperature)
        with self.timer("grade_wait"):  # grading overlapped the passes: what is left of it
            correct = pending()
        groups = score_groups(prompts, out.tokens, out.logprobs, out.finish_reasons, texts, correct,
                              g, self.reward_fn)
        for i, grp in enumerate(groups):
            grp.old_logprobs = old[i * g:(i + 1) * g]
            grp.ref_logprobs = None if ref is None else ref[i * g:(i + 1) * g]
            grp.temperature = lp_temperature
        return groups

    def keep_mask(self, groups: Sequence[Group]) -> np.ndarray:
        keep = np.ones(len(groups), bool)
        if self.rl.dynamic_sampling:
            keep &= nonzero_variance_groups(np.stack([grp.rewards for grp in groups]))
        if self.rl.prompt_filter:
            correct = np.stack([grp.correct for grp in groups])
            keep &= pass_rate_keep(correct, self.rl.min_pass_rate, self.rl.max_pass_rate,
                                   keep_all_wrong=not self.rl.filter_all_wrong)
            # Mastered prompts (every completion correct) are not drawn again.
            self.prompts.retire(grp.prompt.uid for grp in groups if grp.correct.all())
        return keep

    def collect(self, temperature: float) -> tuple:
        """Groups for one step: with filters, keep sampling (oversampled) until the batch is full
        or rl.max_sampling_rounds is reached. Returns (kept groups, all sampled groups)."""
        rl = self.rl
        buffer = GroupBuffer(rl.prompts_per_step)
        sampled: list = []
        filtering = rl.dynamic_sampling or rl.prompt_filter
        for round_ in range(rl.max_sampling_rounds if filtering else 1):
            want = buffer.missing if round_ == 0 and not filtering else math.ceil(
                rl.oversample * buffer.missing)
            groups = self.rollout_round(self.prompts.take(want), temperature,
                                        _rollout_seed(rl.seed, self.step_index, round_))
            sampled.extend(groups)
            buffer.add(groups, self.keep_mask(groups) if filtering else np.ones(len(groups), bool))
            if buffer.full:
                break
        return buffer.groups, sampled

    # ------------------------------------------------------------------ updates
    def minibatches(self, rows: Sequence[tuple], rng: np.random.Generator) -> list:
        """Shuffled minibatches of train.batch_size training rows (`rl_pending.training_rows`; a
        short last one padded with empty rows)."""
        tis = self.config.train.pg.tis
        order = rng.permutation(len(rows))
        bs = self.config.train.batch_size
        batches = []
        for start in range(0, len(rows), bs):
            chunk = [rows[i] for i in order[start:start + bs]]
            n_pad = bs - len(chunk)
            prompts = [r[0] for r in chunk] + [[0]] * n_pad
            comps = [r[1] for r in chunk] + [[]] * n_pad
            length = pad_length(max(len(a) + len(b) for a, b in zip(prompts, comps)),
                                self.rl.pad_multiple)
            batch = build_pg_batch(prompts, comps, [r[2] for r in chunk] + [0.0] * n_pad, length,
                                   old_logprobs=[r[3] for r in chunk] + [[]] * n_pad)
            batch["segment_ids"][len(chunk):] = 0  # padding rows: no tokens, no loss
            # per row, [B]: sharded over the batch axes like the rest (padding rows: 1.0)
            batch["temperature"] = np.asarray([r[5] for r in chunk] + [1.0] * n_pad, np.float32)
            if self.ref_params is not None:
                ref = build_pg_batch(prompts, comps, np.zeros(bs), length,
                                     old_logprobs=[r[4] for r in chunk] + [[]] * n_pad)
                batch["ref_logprobs"] = ref["old_logprobs"]
            if tis:
                sampler = build_pg_batch(prompts, comps, np.zeros(bs), length,
                                         old_logprobs=[r[6] for r in chunk] + [[]] * n_pad)
                batch["sampler_logprobs"] = sampler["old_logprobs"]
            batches.append(batch)
        return batches

    def update(self, pending: PendingUpdate) -> dict:
        """The step's minibatch updates, from the first not yet applied (`pending.done`); raises
        StepInterrupted(pending) before a minibatch once the processes agreed to stop."""
        rng = np.random.default_rng([self.rl.seed, self.step_index, 17])
        index = 0
        for _ in range(self.rl.mu):
            for batch in self.minibatches(pending.rows, rng):
                index += 1
                if index <= pending.done:
                    continue  # applied before the run was stopped
                if self.interrupt():
                    raise StepInterrupted(pending)
                self.state, m = self.pg_step(self.state, self.place(batch))
                m = jax.device_get(m)
                if not float(m["finite"]) and self.config.train.on_nonfinite == "stop":
                    raise FloatingPointError(f"RL step {self.step_index}: non-finite loss or "
                                             f"gradient at optimizer step {int(self.state.step)}")
                for k, v in m.items():
                    pending.totals[k] = pending.totals.get(k, 0.0) + float(np.asarray(v))
                pending.trained += float(np.asarray(m["tokens"]))
                pending.done += 1
        n = pending.done
        return ({f"train/{k}": v / max(n, 1) for k, v in pending.totals.items()}
                | {"train/updates": n, "tokens/trained": pending.trained})

    # ------------------------------------------------------------------ one step
    def rollouts(self, temperature: float) -> PendingUpdate:
        """Sample, grade, score and filter the step's groups; their training rows and metrics.
        Stopped inside (StepInterrupted), the prompt stream is rewound to the step's start."""
        start = self.prompts.get_state()
        try:
            kept, sampled = self.collect(temperature)
        except (StepInterrupted, GenerationInterrupted):
            self.prompts.set_state(start)
            raise StepInterrupted() from None
        metrics = rollout_metrics(sampled, kept) | step_tokens(sampled)
        if self.rl.old_logprobs == "recompute":
            metrics.update(logprob_mismatch([r for g in sampled for r in g.logprobs],
                                            [r for g in sampled for r in g.old_logprobs]))
        if kept:
            adv = compute_advantages(self.rl.advantage, np.stack([g.rewards for g in kept]),
                                     scale_rewards=self.rl.scale_rewards, eps=self.rl.advantage_eps)
            for grp, a in zip(kept, adv):
                grp.advantages = a
        return PendingUpdate(training_rows(kept), metrics)

    def step(self) -> dict:
        temperature = self.temperature(self.step_index)
        self.timer.take()
        t0 = time.perf_counter()
        pending, self.pending = self.pending, None
        if pending is None:
            pending = self.rollouts(temperature)
        t1 = time.perf_counter()
        metrics = dict(pending.metrics)
        if pending.rows:
            with self.timer("update"):
                metrics.update(self.update(pending))
        metrics.update(self.timer.take())
        step_s = time.perf_counter() - t0
        devices = 1 if self.mesh is None else self.mesh.size
        metrics.update({"rl/temperature": temperature, "time/rollout_s": t1 - t0,
                        "time/update_s": metrics.get("time/update_s", 0.0), "time/step_s": step_s,
                        "time/tokens_per_s_per_device":
                            metrics["tokens/rollout"] / max(step_s, 1e-9) / devices})
        self.step_index += 1
        return metrics

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, prompts: Sequence[Prompt], samples: int = 1, temperature: float = 0.0,
                 seed: int = 12345) -> dict:
        """Held-out accuracy of the current policy (greedy by default)."""
        return evaluate_policy(self.state.params, self.model_cfg, self.tokenizer, prompts,
                               self.stop_ids, self.grader, max_new_tokens=self.rl.max_new_tokens,
                               samples=samples, temperature=temperature, seed=seed,
                               num_slots=self.num_slots, mesh=self.mesh)

    # ------------------------------------------------------------------ resume
    def extra_state(self) -> dict:
        return {"rl_step": self.step_index, "prompts": self.prompts.get_state(),
                "temperature": self.temperature(self.step_index)}

    def load_extra_state(self, extra: dict) -> None:
        self.step_index = int(extra["rl_step"])
        self.prompts.set_state(extra["prompts"])


def step_tokens(sampled: Sequence[Group]) -> dict:
    """Tokens generated, and every token of the step's rollouts (prompts and completions): RL
    tokens/s as NeMo-RL reports it is the latter / step time / devices."""
    generated = sum(int(n) for g in sampled for n in g.lengths)
    prompts = sum(len(g.prompt.ids) * len(g.lengths) for g in sampled)
    return {"tokens/generated": float(generated), "tokens/rollout": float(prompts + generated)}


def rollout_metrics(sampled: Sequence[Group], kept: Sequence[Group]) -> dict:
    """Reward / accuracy / length statistics over everything sampled this step."""
    rewards = np.concatenate([g.rewards for g in sampled])
    correct = np.concatenate([g.correct for g in sampled])
    lengths = np.concatenate([g.lengths for g in sampled]).astype(np.float64)
    finished = np.concatenate([g.finished for g in sampled])
    nan = float("nan")
    return {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()),
        "rollout/accuracy": float(correct.mean()),
        "rollout/length_mean": float(lengths.mean()),
        "rollout/length_correct": float(lengths[correct].mean()) if correct.any() else nan,
        "rollout/length_incorrect": float(lengths[~correct].mean()) if (~correct).any() else nan,
        "rollout/truncation_rate": float(1.0 - finished.mean()),
        "rollout/groups_sampled": len(sampled),
        "rollout/groups_kept": len(kept),
    }
