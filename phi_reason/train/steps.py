"""Step functions: jitted `(state, batch) -> (state, metrics)` for SFT, DPO and policy gradient.

One shape for all three: global normalisers from the whole batch, gradients accumulated over
`train.micro_batch_size` micro-batches (a `lax.scan`, so the result equals the full-batch step),
then one optimizer update that is applied only when the loss and gradient norm are finite (a
non-finite step leaves params and optimizer state untouched; the trainer decides whether to stop
or go on). The state argument is donated. With a mesh, state and batch get explicit shardings
from `phi_reason.sharding` (parameters by their logical axes, batches over the data axes).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ..model.config import ModelConfig
from .losses import (
    DPO_LENGTH_NORMALISED,
    PG_AGGREGATIONS,
    PG_LOSSES,
    SFT_LOSSES,
    Norms,
    dpo_loss,
    reduce_micro_metrics,
    target_mask,
)
from .optim import make_optimizer
from .state import TrainState
from .token_stats import micro_batched, micro_split, model_token_stats, sequence_logprob_sums

_SEQ_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def _accumulate(loss_fn, params, batch, n_micro: int):
    """Sum of per-micro-batch gradients and metrics (losses are pre-normalised globally)."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if n_micro == 1:
        return grad_fn(params, batch)

    def body(acc, mb):
        g, m = grad_fn(params, mb)
        return jax.tree_util.tree_map(jnp.add, acc, g), m

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    grads, stacked = lax.scan(body, zeros, micro_split(batch, n_micro))
    return grads, reduce_micro_metrics(stacked)


def _apply(state: TrainState, grads, metrics, optimizer, schedule) -> tuple:
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = state.replace(
        params=jax.tree_util.tree_map(keep, new_params, state.params),
        opt_state=jax.tree_util.tree_map(keep, new_opt, state.opt_state),
        step=state.step + 1, rng=jax.random.split(state.rng)[0])
    metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics


def _token_counts(batch, prefix=""):
    seg = batch[prefix + "segment_ids"]
    return jnp.sum((seg != 0).astype(jnp.float32))


# --------------------------------------------------------------------------- SFT
def make_sft_step(cfg: ModelConfig, train_cfg, mesh=None) -> Callable:
    if train_cfg.loss not in SFT_LOSSES:
        raise ValueError(f"train.loss: unknown SFT loss {train_cfg.loss!r}; "
                         f"choose from {sorted(SFT_LOSSES)}")
    loss_impl = SFT_LOSSES[train_cfg.loss]
    optimizer, schedule = make_optimizer(train_cfg, cfg)
    constrain = _constraint(mesh)

    def step(state: TrainState, batch):
        denom = jnp.maximum(jnp.sum(target_mask(batch)), 1.0)

        def loss_fn(params, mb):
            stats = model_token_stats(params, cfg, mb, constrain=constrain,
                                      chunk=train_cfg.logits_chunk)
            return loss_impl(stats, mb, denom)

        grads, metrics = _accumulate(loss_fn, state.params, batch,
                                     train_cfg.accumulation_steps)
        metrics = dict(metrics, tokens=_token_counts(batch), target_tokens=denom)
        return _apply(state, grads, metrics, optimizer, schedule)

    return _jit(step, cfg, mesh, optimizer)


# --------------------------------------------------------------------------- DPO
def _pair_logps(params, cfg, batch, constrain=None, chunk=0):
    """Sequence log-prob sums and target counts for chosen and rejected ([b] each)."""
    def sums(b, prefix=""):
        return sequence_logprob_sums(params, cfg, b, prefix, constrain, chunk)

    if batch["chosen_tokens"].shape == batch["rejected_tokens"].shape:
        # one forward over both sides
        both = {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]])
                for k in _SEQ_KEYS if "chosen_" + k in batch}
        s, n = sums(both)
        b = batch["chosen_tokens"].shape[0]
        return s[:b], n[:b], s[b:], n[b:]
    (c_sum, c_n), (r_sum, r_n) = sums(batch, "chosen_"), sums(batch, "rejected_")
    return c_sum, c_n, r_sum, r_n


def make_dpo_step(cfg: ModelConfig, train_cfg, mesh=None) -> Callable:
    """Reference log-probs come from the batch (`chosen_ref_logps` / `rejected_ref_logps`: sums
    over target tokens, as `sequence_logprob_sums` returns them) or else from `state.ref_params`."""
    d = train_cfg.dpo
    optimizer, schedule = make_optimizer(train_cfg, cfg)
    constrain = _constraint(mesh)
    normalise = d.loss_type in DPO_LENGTH_NORMALISED

    def step(state: TrainState, batch):
        n_pairs = batch["chosen_tokens"].shape[0]
        if "chosen_ref_logps" not in batch:
            if state.ref_params is None:
                raise ValueError("DPO step: the batch has no chosen_ref_logps/rejected_ref_logps "
                                 "and the state has no ref_params")
            ref = _pair_logps(lax.stop_gradient(state.ref_params), cfg, batch, constrain,
                              train_cfg.logits_chunk)
            batch = dict(batch, chosen_ref_logps=ref[0], rejected_ref_logps=ref[2])

        def loss_fn(params, mb):
            c_sum, c_n, r_sum, r_n = _pair_logps(params, cfg, mb, constrain,
                                                 train_cfg.logits_chunk)
            rc, rr = mb["chosen_ref_logps"], mb["rejected_ref_logps"]
            if normalise:  # trl: IPO compares average per-token log-probs
                c_n, r_n = jnp.maximum(c_n, 1.0), jnp.maximum(r_n, 1.0)
                c_sum, r_sum, rc, rr = c_sum / c_n, r_sum / r_n, rc / c_n, rr / r_n
            return dpo_loss(d.loss_type, c_sum, r_sum, rc, rr, d.beta, d.label_smoothing,
                            n_pairs)

        grads, metrics = _accumulate(loss_fn, state.params, batch,
                                     train_cfg.accumulation_steps)
        metrics = dict(metrics, tokens=_token_counts(batch, "chosen_")
                       + _token_counts(batch, "rejected_"))
        return _apply(state, grads, metrics, optimizer, schedule)

    return _jit(step, cfg, mesh, optimizer)


def make_reference_logps_fn(cfg: ModelConfig, mesh=None, logits_chunk: int = 0,
                            micro_batches: int = 1) -> Callable:
    """Jitted `(ref_params, dpo_batch) -> (chosen_sums [B], rejected_sums [B])`: the one pass
    over the data that replaces a resident reference model, `micro_batches` slices of pairs at a
    time and `logits_chunk` positions of logits at a time (the train step's settings: no
    [B, T, V] array). On a mesh the sums come back replicated (B floats): every process can read
    the whole global batch's values."""
    constrain = _constraint(mesh)

    def fn(params, batch):
        def one(mb):
            c_sum, _, r_sum, _ = _pair_logps(params, cfg, mb, constrain, logits_chunk)
            return c_sum, r_sum
        return micro_batched(one, batch, micro_batches)

    if mesh is None:
        return jax.jit(fn)
    from ..sharding.rules import replicated
    return jax.jit(fn, out_shardings=(replicated(mesh), replicated(mesh)))


# --------------------------------------------------------------------------- policy gradient
def make_pg_step(cfg: ModelConfig, train_cfg, mesh=None) -> Callable:
    """Batch: tokens, positions, segment_ids, loss_mask (1 on completion tokens), advantages [B],
    optionally old_logprobs / ref_logprobs / sampler_logprobs [B, T] aligned to tokens and
    temperature [B]. Without old_logprobs the step is on-policy (ratio 1 with the gradient of
    log pi). With `temperature` the policy's log-probs (and entropy) are those of softmax(logits /
    T), row by row, as trl and verl compute them: old and reference log-probs must then be at the
    same temperature (`make_token_logprob_fn` with the same key). The temperature is a traced
    array, so an annealed temperature does not recompile the step. `sampler_logprobs` are needed
    by train.pg.tis (truncated importance sampling)."""
    p = train_cfg.pg
    if p.loss_type not in PG_LOSSES:
        raise ValueError(f"train.pg.loss_type: unknown {p.loss_type!r}; "
                         f"choose from {sorted(PG_LOSSES)}")
    if p.loss_agg is not None and p.loss_agg not in PG_AGGREGATIONS:
        raise ValueError(f"train.pg.loss_agg: unknown {p.loss_agg!r}; "
                         f"choose from {sorted(PG_AGGREGATIONS)}")
    loss_impl = PG_LOSSES[p.loss_type]
    optimizer, schedule = make_optimizer(train_cfg, cfg)
    constrain = _constraint(mesh)
    tis_cap = p.tis_cap if p.tis else None

    def step(state: TrainState, batch):
        b, t = batch["tokens"].shape
        mask_all = target_mask(batch)
        norms = Norms(sequences=jnp.float32(b), tokens=jnp.maximum(jnp.sum(mask_all), 1.0),
                      max_length=jnp.float32(p.max_completion_length or t))
        if tis_cap is not None and "sampler_logprobs" not in batch:
            raise ValueError("train.pg.tis: the batch has no sampler_logprobs")

        def loss_fn(params, mb):
            stats = model_token_stats(params, cfg, mb, constrain=constrain,
                                      chunk=train_cfg.logits_chunk, entropy=True,
                                      temperature=mb.get("temperature"))
            logp, entropy = stats.logp, stats.entropy
            old = mb.get("old_logprobs")
            old = lax.stop_gradient(logp) if old is None else old.astype(jnp.float32)
            if not p.entropy_coef:
                entropy = lax.stop_gradient(entropy)
            sampler = mb.get("sampler_logprobs")
            return loss_impl(logp, old, mb["advantages"], target_mask(mb), norms,
                             epsilon_low=p.epsilon_low, epsilon_high=p.epsilon_high,
                             beta=p.beta, ref_logp=mb.get("ref_logprobs"), entropy=entropy,
                             entropy_coef=p.entropy_coef, loss_agg=p.loss_agg,
                             sampler_logp=None if sampler is None else sampler.astype(jnp.float32),
                             tis_cap=tis_cap)

        grads, metrics = _accumulate(loss_fn, state.params, batch,
                                     train_cfg.accumulation_steps)
        metrics = dict(metrics, tokens=_token_counts(batch), target_tokens=norms.tokens)
        return _apply(state, grads, metrics, optimizer, schedule)

    return _jit(step, cfg, mesh, optimizer)


# --------------------------------------------------------------------------- jit + shardings
def _constraint(mesh):
    if mesh is None:
        return None
    from ..sharding import rules
    return rules.activation_constraint(mesh)


def _jit(step, cfg: ModelConfig, mesh, optimizer):
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    return ShardedStep(step, cfg, mesh, optimizer)


def state_shardings(state: TrainState, cfg: ModelConfig, mesh, optimizer):
    """Shardings for a TrainState: params (and ref params) by their logical axes, optimizer
    leaves that mirror a parameter (AdamW mu / nu) like that parameter, the rest replicated."""
    from ..model.sharded import param_shardings
    from ..sharding.init import opt_state_shardings
    from ..sharding.rules import replicated

    param_sh = param_shardings(cfg, mesh)
    opt_sh = opt_state_shardings(optimizer, state.params, param_sh, mesh)
    return state.replace(params=param_sh, opt_state=opt_sh, step=replicated(mesh),
                         rng=replicated(mesh),
                         ref_params=None if state.ref_params is None else param_sh)


def batch_shardings(batch, mesh):
    """[B, ...] arrays split over the batch mesh axes (rank-matched specs)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from ..sharding import rules

    base = rules.batch_sharding(mesh).spec[0]
    return {k: NamedSharding(mesh, PartitionSpec(base, *([None] * (jnp.ndim(v) - 1))))
            for k, v in batch.items()}


class ShardedStep:
    """jit with explicit in/out shardings, built on first call from the state and batch
    structure (a batch with different keys or ranks gets its own compilation)."""

    def __init__(self, step, cfg: ModelConfig, mesh, optimizer):
        self.step, self.cfg, self.mesh, self.optimizer = step, cfg, mesh, optimizer
        self._compiled = {}

    def _jitted(self, state, batch):
        from jax.sharding import NamedSharding, PartitionSpec

        key = tuple(sorted((k, jnp.ndim(v)) for k, v in batch.items())) + (
            state.ref_params is None,)
        if key not in self._compiled:
            s_sh = state_shardings(state, self.cfg, self.mesh, self.optimizer)
            self._compiled[key] = jax.jit(
                self.step, donate_argnums=(0,),
                in_shardings=(s_sh, batch_shardings(batch, self.mesh)),
                out_shardings=(s_sh, NamedSharding(self.mesh, PartitionSpec())))
        return self._compiled[key]

    def __call__(self, state, batch):
        return self._jitted(state, batch)(state, batch)

    def lower(self, state, batch):
        """The step lowered for `state` / `batch` (concrete or jax.ShapeDtypeStruct): AOT
        compilation and XLA's memory analysis of the program that runs."""
        return self._jitted(state, batch).lower(state, batch)
