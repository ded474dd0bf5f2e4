"""Losses as pure functions, chosen by name from small registries (trl's conventions).

Alignment: every per-token array here is aligned to `tokens` ([B, T]); the value at position t
belongs to token t, predicted by the logits at t-1. Position 0 is never a target. A token is a
target when `loss_mask[t]` is set, it is not padding, and it is in the same packed segment as
t-1 (never predict across segments).

Normalisation under gradient accumulation: a loss function sees one micro-batch but is handed the
*global* batch's normalisers (`denom`, `Norms`), so summing micro-batch results gives exactly
the full-batch value (and gradient). Metrics follow the same rule: each returned metric is the
micro-batch's contribution to the global value (summed across micro-batches), except names
ending in `/max` / `/min`, which combine by max / min.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax


# --------------------------------------------------------------------------- token helpers
def target_mask(batch) -> jax.Array:
    """[B, T] float32: 1 where token t is a trained target (see module doc)."""
    seg = jnp.asarray(batch["segment_ids"])
    mask = jnp.asarray(batch["loss_mask"]).astype(jnp.float32)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    shifted = mask[:, 1:] * same.astype(jnp.float32)
    return jnp.pad(shifted, ((0, 0), (1, 0)))


class TokenStats(NamedTuple):
    """Per-token quantities aligned to `tokens` [B, T] (position 0 is 0): log p(token t | < t),
    whether the argmax predicted token t, and the predictive entropy (None unless asked for)."""
    logp: jax.Array
    correct: jax.Array
    entropy: Optional[jax.Array] = None


def tempered(logits, temperature=None):
    """float32 logits divided by the sampling temperature: a scalar or one per row ([B], for
    logits [B, ..., V]); None leaves them as they are (T = 1). The division is by a traced value,
    so an annealed temperature never recompiles anything."""
    logits = logits.astype(jnp.float32)
    if temperature is None:
        return logits
    t = jnp.asarray(temperature, jnp.float32)
    if t.ndim:  # per row
        t = t.reshape(t.shape + (1,) * (logits.ndim - t.ndim))
    return logits / t


def shifted_token_stats(logits, targets, entropy: bool = False, temperature=None):
    """Logits [B, n, V] that predict targets [B, n] (already shifted) -> (logp, correct, entropy
    or None), each [B, n] float32, of the distribution softmax(logits / temperature) (see
    `tempered`). The one formula behind the full and the chunked paths."""
    logits = tempered(logits, temperature)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return logp, correct, (_entropy(logits) if entropy else None)


def _entropy(logits):
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def align_to_tokens(x):
    """[B, T-1] values for targets 1..T-1 -> [B, T] aligned to tokens (position 0 is 0)."""
    return None if x is None else jnp.pad(x, ((0, 0), (1, 0)))


def token_stats(logits, tokens, entropy: bool = False, temperature=None) -> TokenStats:
    """TokenStats from full logits [B, T, V] (divided by `temperature`, scalar or [B], if given)."""
    stats = shifted_token_stats(logits[:, :-1], jnp.asarray(tokens)[:, 1:], entropy, temperature)
    return TokenStats(*map(align_to_tokens, stats))


def token_logprobs(logits, tokens, temperature=None) -> jax.Array:
    """[B, T] float32 log p(token t | tokens < t) from logits [B, T, V] (at `temperature`, scalar
    or [B]; None: T = 1); position 0 is 0."""
    return token_stats(logits, tokens, temperature=temperature).logp


# --------------------------------------------------------------------------- SFT
def cross_entropy(logits, batch, denom):
    """Token cross-entropy summed over targets / `denom` (the global batch's target count).
    `logits`: [B, T, V], or the TokenStats of the chunked path (no [B, T, V] array at all)."""
    stats = logits if isinstance(logits, TokenStats) else token_stats(logits, batch["tokens"])
    mask = target_mask(batch)
    nll = -jnp.sum(stats.logp * mask)
    return nll / denom, {"loss": nll / denom, "accuracy": jnp.sum(stats.correct * mask) / denom}


SFT_LOSSES: Dict[str, Callable] = {"ce": cross_entropy}


# --------------------------------------------------------------------------- DPO
# Each DPO loss maps the implicit-reward logit `h = (pi_c - pi_r) - (ref_c - ref_r)` to per-pair
# losses, exactly as trl's DPOTrainer.dpo_loss.
def _dpo_sigmoid(h, beta, label_smoothing):
    return (-jax.nn.log_sigmoid(beta * h) * (1 - label_smoothing)
            - jax.nn.log_sigmoid(-beta * h) * label_smoothing)


def _dpo_robust(h, beta, label_smoothing):
    # Chowdhury et al. 2024: unbiased under label noise rate `label_smoothing`.
    return ((-jax.nn.log_sigmoid(beta * h) * (1 - label_smoothing)
             + jax.nn.log_sigmoid(-beta * h) * label_smoothing) / (1 - 2 * label_smoothing))


def _dpo_hinge(h, beta, label_smoothing):
    del label_smoothing
    return jax.nn.relu(1 - beta * h)


def _dpo_ipo(h, beta, label_smoothing):
    # trl: IPO uses length-normalised log-probs (see DPO_LENGTH_NORMALISED).
    del label_smoothing
    return (h - 1 / (2 * beta)) ** 2


DPO_LOSSES: Dict[str, Callable] = {
    "sigmoid": _dpo_sigmoid, "ipo": _dpo_ipo, "hinge": _dpo_hinge, "robust": _dpo_robust}
DPO_LENGTH_NORMALISED = frozenset({"ipo"})


def dpo_loss(loss_type, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta,
             label_smoothing, n_pairs):
    """Per-micro-batch DPO loss (sum over pairs / global `n_pairs`) and metrics.

    Inputs are sequence log-probs [b] (already length-normalised for `ipo`)."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose from {sorted(DPO_LOSSES)}")
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = DPO_LOSSES[loss_type](h, beta, label_smoothing)
    chosen_r = jax.lax.stop_gradient(beta * (policy_chosen - ref_chosen))
    rejected_r = jax.lax.stop_gradient(beta * (policy_rejected - ref_rejected))
    loss = jnp.sum(losses) / n_pairs
    metrics = {
        "loss": loss,
        "rewards/chosen": jnp.sum(chosen_r) / n_pairs,
        "rewards/rejected": jnp.sum(rejected_r) / n_pairs,
        "rewards/accuracy": jnp.sum((chosen_r > rejected_r).astype(jnp.float32)) / n_pairs,
        "rewards/margin": jnp.sum(chosen_r - rejected_r) / n_pairs,
        "logps/chosen": jnp.sum(jax.lax.stop_gradient(policy_chosen)) / n_pairs,
        "logps/rejected": jnp.sum(jax.lax.stop_gradient(policy_rejected)) / n_pairs,
    }
    return loss, metrics


# --------------------------------------------------------------------------- policy gradient
class Norms(NamedTuple):
    """Global-batch normalisers (computed once per step, before micro-batching)."""
    sequences: jax.Array  # number of sequences in the global batch
    tokens: jax.Array  # number of target tokens in the global batch (>= 1)
    max_length: jax.Array  # dr_grpo's constant: max completion length


@dataclasses.dataclass(frozen=True)
class PGVariant:
    importance: str  # "token" ratio per token | "sequence": exp(mean token log-ratio) (GSPO)
    aggregate: str  # the default loss aggregation: a name in PG_AGGREGATIONS


def _seq_mean_token_mean(x, mask, norms: Norms):
    per_seq = jnp.sum(x * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    return jnp.sum(per_seq) / norms.sequences


# Loss aggregation, named as verl's `actor.loss_agg_mode` names them. x: per-token [b, T] values
# of one micro-batch, mask: its target tokens; the normalisers are the global batch's (`Norms`),
# so micro-batch results sum to the full batch's. B = sequences in the global batch (empty
# padding rows included: a short minibatch takes a proportionally smaller step), N = its target
# tokens, L = `Norms.max_length` (train.pg.max_completion_length, default the padded length).
PG_AGGREGATIONS: Dict[str, Callable] = {
    # sum over all tokens / N: every token weighs the same (DAPO; trl "dapo", verl's default)
    "token-mean": lambda x, mask, norms: jnp.sum(x * mask) / norms.tokens,
    # mean over each sequence's tokens, then over the B sequences (GRPO paper; trl "grpo")
    "seq-mean-token-mean": _seq_mean_token_mean,
    # each sequence's token sum, mean over the B sequences (verl; no trl loss_type)
    "seq-mean-token-sum": lambda x, mask, norms: jnp.sum(x * mask) / norms.sequences,
    # Dr. GRPO's constant normaliser: token sum / (B * L) (trl "dr_grpo"; verl's mode of this name
    # divides by its constant `loss_scale_factor`, default the padded response length)
    "seq-mean-token-sum-norm": lambda x, mask, norms: (
        jnp.sum(x * mask) / (norms.sequences * norms.max_length)),
}

# Each loss_type's default aggregation (train.pg.loss_agg overrides it). For reference: trl's
# GRPOConfig.loss_type defaults to "dapo" (= token-mean) and verl's actor.loss_agg_mode to
# "token-mean"; our default loss_type "grpo" keeps the GRPO paper's seq-mean-token-mean.
PG_VARIANTS = {
    "grpo": PGVariant("token", "seq-mean-token-mean"),
    "dr_grpo": PGVariant("token", "seq-mean-token-sum-norm"),
    "dapo": PGVariant("token", "token-mean"),
    "gspo": PGVariant("sequence", "seq-mean-token-mean"),
}


def _aggregate(per_token, mask, how, norms: Norms):
    if how not in PG_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {how!r}; choose from {sorted(PG_AGGREGATIONS)}")
    return PG_AGGREGATIONS[how](per_token, mask, norms)


def truncated_is_weights(old_logp, sampler_logp, cap):
    """Truncated importance sampling (TIS; Yao et al. 2025, verl's rollout_is=token): per-token
    min(exp(old - sampler), cap), the correction for sampling from the sampler's numerics while
    the loss uses the trainer's. A constant (no gradient)."""
    return lax.stop_gradient(jnp.minimum(jnp.exp(old_logp - sampler_logp), cap))


def policy_gradient_loss(variant: PGVariant, logp, old_logp, advantages, mask, norms: Norms, *,
                         epsilon_low, epsilon_high, beta=0.0, ref_logp=None, entropy=None,
                         entropy_coef=0.0, loss_agg=None, sampler_logp=None, tis_cap=None):
    """Clipped surrogate (trl GRPOTrainer semantics) for one micro-batch.

    logp / old_logp / ref_logp / entropy / sampler_logp / mask: [b, T] aligned to tokens;
    advantages [b]. loss per token = -w * min(r A, clip(r, 1-eps_low, 1+eps_high) A)
    + beta * k3_KL, aggregated by `loss_agg` (a PG_AGGREGATIONS name; None: the variant's own);
    minus `entropy_coef` * the entropy aggregated the same way. w = 1, or with `tis_cap` the
    truncated importance weight min(exp(old - sampler), tis_cap) (only the surrogate is weighted,
    as in verl; the KL and entropy terms are not)."""
    mask = mask.astype(jnp.float32)
    how = variant.aggregate if loss_agg is None else loss_agg
    log_ratio = logp - old_logp
    if variant.importance == "sequence":
        seq = jnp.sum(log_ratio * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
        log_ratio = jnp.broadcast_to(seq[:, None], logp.shape)
    ratio = jnp.exp(log_ratio)
    adv = advantages[:, None].astype(jnp.float32)
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    metrics = {}
    if tis_cap is not None:
        if sampler_logp is None:
            raise ValueError("policy_gradient_loss: truncated IS needs sampler_logprobs "
                             "in the batch")
        w = truncated_is_weights(old_logp, sampler_logp, tis_cap)
        per_token = per_token * w
        metrics["tis/weight_mean"] = jnp.sum(w * mask) / norms.tokens
        metrics["tis/clip_fraction"] = jnp.sum((w >= tis_cap).astype(jnp.float32)
                                               * mask) / norms.tokens
    if beta:
        if ref_logp is None:
            raise ValueError("policy_gradient_loss: beta > 0 needs ref_logprobs in the batch")
        d = ref_logp - logp
        kl = jnp.exp(d) - d - 1.0  # k3 estimator of KL(pi || ref)
        per_token = per_token + beta * kl
        metrics["kl"] = jnp.sum(jax.lax.stop_gradient(kl) * mask) / norms.tokens
    loss = _aggregate(per_token, mask, how, norms)
    if entropy is not None:
        if entropy_coef:
            loss = loss - entropy_coef * _aggregate(entropy, mask, how, norms)
        metrics["entropy"] = jnp.sum(jax.lax.stop_gradient(entropy) * mask) / norms.tokens
    r = jax.lax.stop_gradient(ratio)
    low = ((r < 1 - epsilon_low) & (adv < 0)).astype(jnp.float32)
    high = ((r > 1 + epsilon_high) & (adv > 0)).astype(jnp.float32)
    big = jnp.finfo(jnp.float32).max
    metrics.update({
        "loss": loss,
        "clip_fraction/low": jnp.sum(low * mask) / norms.tokens,
        "clip_fraction/high": jnp.sum(high * mask) / norms.tokens,
        "clip_fraction": jnp.sum(jnp.maximum(low, high) * mask) / norms.tokens,
        "ratio/mean": jnp.sum(r * mask) / norms.tokens,
        "ratio/max": jnp.max(jnp.where(mask > 0, r, -big)),
        "ratio/min": jnp.min(jnp.where(mask > 0, r, big)),
    })
    return loss, metrics


PG_LOSSES: Dict[str, Callable] = {
    name: functools.partial(policy_gradient_loss, variant) for name, variant in PG_VARIANTS.items()}


def reduce_micro_metrics(stacked: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """Combine metrics stacked over micro-batches [n, ...] (see module doc)."""
    return {k: (jnp.max(v, 0) if k.endswith("/max") else jnp.min(v, 0) if k.endswith("/min")
                else jnp.sum(v, 0)) for k, v in stacked.items()}
