"""The RL loop: rollout -> grade -> reward -> advantage -> filter -> policy-gradient updates.

One RL step (`RLLoop.step`):
1. draw prompts from the resumable `PromptIterator`; sample `group_size` completions each with the
   sampler on the live policy params at the scheduled temperature;
2. submit the completions to the grader's worker pool and, while they are graded, compute the old
   log-probs of every sampled row with one forward pass of the pre-update policy (and the
   reference log-probs when `train.pg.beta > 0`);
3. score each group (composite reward), drop groups per the filters (dynamic sampling: zero
   reward variance; prompt filter: pass rate), and sample more prompts to refill when asked;
4. group-relative advantages, then `rl.mu` passes of minibatch updates with the trainer's
   `make_pg_step` (minibatches of `train.batch_size` rows; a short last minibatch is padded with
   empty rows that carry no loss).

Old log-probs (choice documented): by default they are recomputed by the trainer's forward pass,
which is exact for any number of minibatches and epochs (after the first update the policy has
moved, so the per-update on-policy shortcut would be wrong) and matches the training numerics
(the sampler's KV-cache path differs by rounding). `rl.old_logprobs = sampler` takes the
sampler's log-probs instead and is only allowed where old == current policy: mu = 1, one update
per step and temperature 1.

Checkpoints reuse the trainer's machinery; the RL extras (step, prompt-iterator position and
retired prompts; the temperature schedule is a function of the step) travel in its metadata.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model.decoder import forward
from .advantages import GroupBuffer, compute_advantages, nonzero_variance_groups, pass_rate_keep
from .losses import token_logprobs
from .rewards import make_reward_fn
from .rl_config import RLRunConfig
from .rl_prompts import PromptIterator
from .rollouts import Group, Prompt, build_pg_batch, pad_length, score_groups, strip_stop
from .state import TrainState
from .steps import make_pg_step


_COMPILED: dict = {}


def _cached(key, build):
    """Jitted functions shared by every RLLoop with the same model and train settings (a demo or a
    test runs several loops; each fresh closure would otherwise compile again)."""
    if key not in _COMPILED:
        _COMPILED[key] = build()
    return _COMPILED[key]


def make_token_logprob_fn(cfg, mesh=None) -> Callable:
    """Jitted (params, batch) -> [B, T] log-prob of each token under params (aligned to tokens)."""
    def fn(params, batch):
        logits = forward(params, batch["tokens"], cfg, positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
        return token_logprobs(logits, batch["tokens"])
    return jax.jit(fn)


def fold_temperature(params, temperature: float):
    """Params whose logits are the originals divided by `temperature`: the final RMSNorm is linear
    in its scale and the LM head is linear, so scaling `final_norm` by 1/T scales every logit by
    1/T. Sampling these at temperature 1 is sampling the policy at T, and the sampler (whose
    temperature is a compile-time constant) compiles once however the temperature is annealed.
    The sampler's log-probs are then those of the tempered distribution."""
    scale = jnp.asarray(1.0 / temperature, jnp.float32)
    norm = params["final_norm"]
    return dict(params, final_norm=(norm.astype(jnp.float32) * scale).astype(norm.dtype))


def decode_completion(tokenizer, tokens, stop_ids) -> str:
    """Response text without its stop token. Ids beyond the tokenizer's vocabulary (the model's
    embedding table is often padded past it) carry no text and are dropped."""
    vocab = tokenizer.vocab_size
    return tokenizer.decode([t for t in strip_stop(tokens, stop_ids) if 0 <= t < vocab])


def submit_grading(grader, pairs, mode: str) -> Callable[[], list]:
    """Queue (prediction, gold) pairs in the grader's worker pool now; the returned callable
    waits for the verdicts (list of bool). The caller does device work in between."""
    futures = [grader.submit(prediction, gold, mode) for prediction, gold in pairs]
    return lambda: [f.result().correct for f in futures]


def evaluate_policy(params, cfg, tokenizer, prompts: Sequence[Prompt], stop_ids, grader, *,
                    max_new_tokens: int, samples: int = 1, temperature: float = 0.0,
                    seed: int = 12345, mode: str = "eval", num_slots=None, mesh=None) -> dict:
    """Accuracy of `samples` completions per prompt (greedy by default), graded in `mode`."""
    from ..generate.sampler import generate

    out = generate(params, cfg, [p.ids for p in prompts for _ in range(samples)],
                   max_new_tokens=max_new_tokens, temperature=temperature,
                   stop_tokens=tuple(stop_ids), seed=seed, num_slots=num_slots, mesh=mesh)
    texts = [decode_completion(tokenizer, t, stop_ids) for t in out.tokens]
    answers = [p.answer for p in prompts for _ in range(samples)]
    correct = np.asarray(submit_grading(grader, list(zip(texts, answers)), mode)())
    return {"eval/accuracy": float(correct.mean()),
            "eval/truncated": float(np.mean([r == "length" for r in out.finish_reasons]))}


def _rollout_seed(seed: int, step: int, round_: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + round_ * 7) % (2 ** 31 - 1)


class RLLoop:
    """Holds the policy TrainState, the frozen reference (when beta > 0), the prompt stream and the
    jitted functions; `step(grader)` runs one RL step and returns its metrics."""

    def __init__(self, config: RLRunConfig, model_cfg, params, tokenizer, prompts: Sequence[Prompt],
                 stop_ids: Sequence[int], grader, mesh=None, optimizer_steps: Optional[int] = None):
        from .optim import make_optimizer

        config.validate()
        self.config, self.rl, self.model_cfg = config, config.rl, model_cfg
        self.tokenizer, self.stop_ids, self.mesh = tokenizer, tuple(stop_ids), mesh
        self.grader = grader  # a GraderPool (or anything with .submit(prediction, gold, mode))
        self.reward_fn = make_reward_fn(config.reward_specs())
        self.temperature = self.rl.temperature.build()
        self.prompts = PromptIterator(prompts, seed=self.rl.seed)
        if config.train.steps is None:
            config.train.steps = optimizer_steps or self.rl.steps * config.updates_per_step()
        optimizer, _ = make_optimizer(config.train, model_cfg)
        beta = config.train.pg.beta
        ref = None
        if beta > 0:
            # Held once; on host when asked, moved to the device only for the reference pass.
            ref = jax.device_get(params) if self.rl.reference_on_host else jax.tree_util.tree_map(
                jnp.copy, params)
        self.ref_params = ref
        self.state = TrainState.create(params, optimizer, seed=config.train.seed)
        train_key = repr(dataclasses.asdict(config.train))
        self.pg_step = _cached(("pg", model_cfg, train_key, mesh),
                               lambda: make_pg_step(model_cfg, config.train, mesh))
        self.logprob_fn = _cached(("logprob", model_cfg, mesh),
                                  lambda: make_token_logprob_fn(model_cfg, mesh))
        self.step_index = 0

    # ------------------------------------------------------------------ rollouts
    def sample(self, prompts: Sequence[Prompt], temperature: float, seed: int, group_size: int,
               max_new_tokens: Optional[int] = None):
        from ..generate.sampler import generate

        rows = [p.ids for p in prompts for _ in range(group_size)]
        params = self.state.params
        if self.rl.fold_temperature and temperature not in (0.0, 1.0):
            params, temperature = fold_temperature(params, temperature), 1.0
        return generate(params, self.model_cfg, rows,
                        max_new_tokens=max_new_tokens or self.rl.max_new_tokens,
                        temperature=temperature, top_p=self.rl.top_p if temperature else 1.0,
                        top_k=self.rl.top_k if temperature else 0, stop_tokens=self.stop_ids,
                        seed=seed, num_slots=self.rl.num_slots, mesh=self.mesh)

    def decode(self, tokens) -> list:
        return [decode_completion(self.tokenizer, t, self.stop_ids) for t in tokens]

    def row_logprobs(self, params, prompt_rows, completions) -> list:
        """Per-row completion log-probs under params, in minibatches of train.batch_size rows
        (padded to a multiple of rl.pad_multiple, so shapes repeat across steps)."""
        bs = self.config.train.batch_size
        out = []
        for start in range(0, len(completions), bs):
            p, c = prompt_rows[start:start + bs], completions[start:start + bs]
            n_real = len(c)
            p, c = list(p) + [[0]] * (bs - n_real), list(c) + [[]] * (bs - n_real)
            length = pad_length(max(len(a) + len(b) for a, b in zip(p, c)), self.rl.pad_multiple)
            batch = build_pg_batch(p, c, np.zeros(bs), length)
            lp = np.asarray(self.logprob_fn(params, {k: batch[k] for k in
                                                     ("tokens", "positions", "segment_ids")}))
            out.extend(lp[i, len(p[i]):len(p[i]) + len(c[i])].tolist() for i in range(n_real))
        return out

    def rollout_round(self, prompts: Sequence[Prompt], temperature: float, seed: int) -> list:
        """Sample, grade (in the pool, overlapped with the log-prob passes) and score one round."""
        g = self.rl.group_size
        out = self.sample(prompts, temperature, seed, g)
        texts = self.decode(out.tokens)
        answers = [p.answer for p in prompts for _ in range(g)]
        pending = submit_grading(self.grader, list(zip(texts, answers)), "reward")
        prompt_rows = [p.ids for p in prompts for _ in range(g)]
        old = (out.logprobs if self.rl.old_logprobs == "sampler"
               else self.row_logprobs(self.state.params, prompt_rows, out.tokens))
        ref = None
        if self.ref_params is not None:
            ref = self.row_logprobs(self.ref_params, prompt_rows, out.tokens)
        correct = pending()
        groups = score_groups(prompts, out.tokens, out.logprobs, out.finish_reasons, texts, correct,
                              g, self.reward_fn)
        for i, grp in enumerate(groups):
            grp.old_logprobs = old[i * g:(i + 1) * g]
            grp.ref_logprobs = None if ref is None else ref[i * g:(i + 1) * g]
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
    def minibatches(self, groups: Sequence[Group], rng: np.random.Generator) -> list:
        """Shuffled minibatches of train.batch_size rows (short last one padded with empty rows)."""
        rows = [(grp.prompt.ids, grp.tokens[j], float(grp.advantages[j]), grp.old_logprobs[j],
                 None if grp.ref_logprobs is None else grp.ref_logprobs[j])
                for grp in groups for j in range(len(grp.tokens))]
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
            if self.ref_params is not None:
                ref = build_pg_batch(prompts, comps, np.zeros(bs), length,
                                     old_logprobs=[r[4] for r in chunk] + [[]] * n_pad)
                batch["ref_logprobs"] = ref["old_logprobs"]
            batches.append(batch)
        return batches

    def update(self, groups: Sequence[Group]) -> dict:
        rng = np.random.default_rng([self.rl.seed, self.step_index, 17])
        totals: dict = {}
        n = 0
        for _ in range(self.rl.mu):
            for batch in self.minibatches(groups, rng):
                self.state, m = self.pg_step(self.state, batch)
                m = jax.device_get(m)
                if not float(m["finite"]) and self.config.train.on_nonfinite == "stop":
                    raise FloatingPointError(f"RL step {self.step_index}: non-finite loss or "
                                             f"gradient at optimizer step {int(self.state.step)}")
                for k, v in m.items():
                    totals[k] = totals.get(k, 0.0) + float(np.asarray(v))
                n += 1
        return {f"train/{k}": v / max(n, 1) for k, v in totals.items()} | {"train/updates": n}

    # ------------------------------------------------------------------ one step
    def step(self) -> dict:
        temperature = self.temperature(self.step_index)
        t0 = time.perf_counter()
        kept, sampled = self.collect(temperature)
        t1 = time.perf_counter()
        metrics = rollout_metrics(sampled, kept)
        if kept:
            adv = compute_advantages(self.rl.advantage, np.stack([g.rewards for g in kept]),
                                     scale_rewards=self.rl.scale_rewards, eps=self.rl.advantage_eps)
            for grp, a in zip(kept, adv):
                grp.advantages = a
            metrics.update(self.update(kept))
        metrics.update({"rl/step": self.step_index, "rl/temperature": temperature,
                        "time/rollout_s": t1 - t0, "time/update_s": time.perf_counter() - t1})
        self.step_index += 1
        return metrics

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, prompts: Sequence[Prompt], samples: int = 1, temperature: float = 0.0,
                 seed: int = 12345) -> dict:
        """Held-out accuracy of the current policy (greedy by default)."""
        return evaluate_policy(self.state.params, self.model_cfg, self.tokenizer, prompts,
                               self.stop_ids, self.grader, max_new_tokens=self.rl.max_new_tokens,
                               samples=samples, temperature=temperature, seed=seed,
                               num_slots=self.rl.num_slots, mesh=self.mesh)

    # ------------------------------------------------------------------ resume
    def extra_state(self) -> dict:
        return {"rl_step": self.step_index, "prompts": self.prompts.get_state(),
                "temperature": self.temperature(self.step_index)}

    def load_extra_state(self, extra: dict) -> None:
        self.step_index = int(extra["rl_step"])
        self.prompts.set_state(extra["prompts"])


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


# ---------------------------------------------------------------------------- the run
class _RLProgress:
    """The trainer's checkpoints carry a data-iterator state; for RL it is the RL step, the prompt
    stream position and the retired prompts (the temperature follows from the step)."""

    def __init__(self, loop: RLLoop):
        self.loop = loop

    def get_state(self) -> dict:
        return self.loop.extra_state()

    def set_state(self, state: dict) -> None:
        self.loop.load_extra_state(state)

    def __next__(self):  # the trainer's own train() is not used for RL
        raise TypeError("RL progress is not a batch iterator")


@dataclasses.dataclass
class RLResult:
    params: object
    steps: int  # RL steps completed
    history: list  # per-step metric records (this process)
    eval: dict  # last held-out evaluation (empty without held-out prompts)
    out: Path


def _json_safe(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def build_rl_prompts(run: RLRunConfig, tokenizer) -> tuple:
    """(train prompts, held-out prompts) from data.train_files (schema "rl") or data.synthetic."""
    from ..config import RunConfigError
    from .rl_prompts import prompts_from_records, synthetic_prompts

    d, rl = run.data, run.rl
    if d.train_files:
        from ..data.sources import load_records
        recs = load_records(d.train_files, d.schema or "rl", d.skip_bad_records)
        prompts, skipped = prompts_from_records(recs.records, recs.where, tokenizer,
                                                d.chat_format, rl.max_prompt_tokens)
        if skipped:
            print(f"rl: skipped {skipped} prompts longer than rl.max_prompt_tokens="
                  f"{rl.max_prompt_tokens}", file=sys.stderr)
        return prompts, []
    if d.synthetic is not None:
        return synthetic_prompts(d.synthetic, tokenizer, d.chat_format, rl.max_prompt_tokens,
                                 rl.eval_problems)
    raise RunConfigError("data: set data.train_files (RL records: prompt + answer) or "
                         "data.synthetic")


def train_rl(run: RLRunConfig, *, model=None, tokenizer=None, prompts=None, eval_prompts=None,
             resume: bool = False, hooks: Sequence[Callable] = ()) -> RLResult:
    """Run the RL loop described by an in-memory config. `model` = (ModelConfig, params) and
    `prompts` / `eval_prompts` (lists of `Prompt`) override what the config would load; hooks are
    called as hook(loop, step) after each RL step (tests inject preemption there)."""
    from ..config import RunConfigError, dump_run_config
    from ..data.chat import stop_ids as format_stop_ids
    from ..data.tokenizer import load_tokenizer
    from ..eval.pool import GraderPool
    from .loop import MetricsLog, Trainer, _finish, build_mesh, build_model

    run.validate()
    rl = run.rl
    mesh = build_mesh(run)
    cfg, params = model if model is not None else build_model(run, mesh)
    tok = tokenizer or load_tokenizer(run.data.tokenizer)
    if prompts is None:
        prompts, loaded_eval = build_rl_prompts(run, tok)
        eval_prompts = loaded_eval if eval_prompts is None else eval_prompts
    eval_prompts = list(eval_prompts or [])
    out = Path(run.output.dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    dump_run_config(run, str(out / "config.yaml"))
    history: list = []
    last_eval: dict = {}
    with GraderPool(rl.grader_workers, rl.grader_timeout) as pool:
        loop = RLLoop(run, cfg, params, tok, prompts, format_stop_ids(run.data.chat_format, tok),
                      pool, mesh=mesh)
        trainer = Trainer(run, cfg, loop.state, loop.pg_step, _RLProgress(loop), rl.steps,
                          seq_len=rl.max_prompt_tokens + rl.max_new_tokens)
        latest = trainer.manager.latest_step()
        if resume and latest is not None:
            trainer.restore(latest)
            loop.state = trainer.state
            print(f"resumed RL from {out / 'checkpoints'} at step {latest}", file=sys.stderr)
        elif latest is not None:
            raise RunConfigError(f"{out}: already holds checkpoints (latest step {latest}); pass "
                                 "--resume to continue that run or choose a new output.dir")
        log = MetricsLog(out, run.output.tensorboard, loop.step_index if resume else None)
        bar = None
        if run.output.progress:
            from tqdm import tqdm
            bar = tqdm(total=rl.steps, initial=loop.step_index, desc="rl", file=sys.stderr,
                       dynamic_ncols=True)
        old = {s: signal.signal(s, trainer._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

        def save():
            trainer.state = loop.state
            trainer.save(loop.step_index, loop.extra_state())

        try:
            while loop.step_index < rl.steps:
                metrics = loop.step()
                step = loop.step_index
                last = step == rl.steps
                if eval_prompts and ((rl.eval_every and step % rl.eval_every == 0) or last):
                    last_eval = loop.evaluate(eval_prompts)
                    metrics.update(last_eval)
                record = _json_safe({"step": step, **metrics})
                history.append(record)
                if step % run.output.log_every == 0 or last:
                    log.write(record)
                if bar is not None:
                    bar.set_postfix({"reward": f"{metrics['rollout/reward_mean']:.3f}",
                                     "acc": f"{metrics['rollout/accuracy']:.3f}"}, refresh=False)
                    bar.update(step - bar.n)
                for hook in hooks:
                    hook(loop, step)
                stop = trainer._stop_signal is not None
                if stop or step % run.output.save_every == 0 or last:
                    save()
                if stop:
                    print(f"\n{signal.Signals(trainer._stop_signal).name}: saved RL checkpoint at "
                          f"step {step}; exiting", file=sys.stderr)
                    break
        finally:
            trainer.manager.wait_until_finished()
            for s, h in old.items():
                signal.signal(s, h)
            log.close()
            if bar is not None:
                bar.close()
        if trainer._stop_signal is None:
            trainer.state = loop.state
            _finish(trainer, cfg)
    return RLResult(loop.state.params, loop.step_index, history, last_eval, out)


def run_rl(config, overrides: Sequence[str] = (), resume: bool = False,
           hooks: Sequence[Callable] = ()) -> int:
    """`phi-reason rl CONFIG [k=v ...] [--resume]`; `config` may also be an RLRunConfig."""
    from .rl_config import load_rl_config

    if isinstance(config, RLRunConfig):
        run = config
        if overrides:
            raise ValueError("overrides apply to YAML configs; edit the RLRunConfig instead")
    else:
        run = load_rl_config(config, overrides)
    result = train_rl(run, resume=resume, hooks=hooks)
    print(f"done: {result.steps} RL steps; outputs in {result.out}", file=sys.stderr)
    return 0
