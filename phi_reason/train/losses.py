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


def shifted_token_stats(logits, targets, entropy: bool = False):
    """Logits [B, n, V] that predict targets [B, n] (already shifted) -> (logp, correct, entropy
    or None), each [B, n] float32. The one formula behind the full and the chunked paths."""
    logits = logits.astype(jnp.float32)
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


def token_stats(logits, tokens, entropy: bool = False) -> TokenStats:
    """TokenStats from full logits [B, T, V]."""
    stats = shifted_token_stats(logits[:, :-1], jnp.asarray(tokens)[:, 1:], entropy)
    return TokenStats(*map(align_to_tokens, stats))


def token_logprobs(logits, tokens) -> jax.Array:
    """[B, T] float32 log p(token t | tokens < t) from logits [B, T, V]; position 0 is 0."""
    return token_stats(logits, tokens).logp


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
    aggregate: str  # "sequence_mean" | "fixed_length" | "global_token_mean"


PG_VARIANTS = {
    "grpo": PGVariant("token", "sequence_mean"),
    "dr_grpo": PGVariant("token", "fixed_length"),
    "dapo": PGVariant("token", "global_token_mean"),
    "gspo": PGVariant("sequence", "sequence_mean"),
}


def _aggregate(per_token, mask, how, norms: Norms):
    if how == "sequence_mean":  # mean over each sequence's tokens, then over sequences
        per_seq = jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
        return jnp.sum(per_seq) / norms.sequences
    if how == "fixed_length":  # token sum / (batch * max completion length)
        return jnp.sum(per_token * mask) / (norms.sequences * norms.max_length)
    if how == "global_token_mean":
        return jnp.sum(per_token * mask) / norms.tokens
    raise ValueError(f"unknown aggregation {how!r}")


def policy_gradient_loss(variant: PGVariant, logp, old_logp, advantages, mask, norms: Norms, *,
                         epsilon_low, epsilon_high, beta=0.0, ref_logp=None, entropy=None,
                         entropy_coef=0.0):
    """Clipped surrogate (trl GRPOTrainer semantics) for one micro-batch.

    logp / old_logp / ref_logp / entropy / mask: [b, T] aligned to tokens; advantages [b].
    loss per token = -min(r A, clip(r, 1-eps_low, 1+eps_high) A) + beta * k3_KL, aggregated per
    variant; minus `entropy_coef` * the entropy aggregated the same way."""
    mask = mask.astype(jnp.float32)
    log_ratio = logp - old_logp
    if variant.importance == "sequence":
        seq = jnp.sum(log_ratio * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
        log_ratio = jnp.broadcast_to(seq[:, None], logp.shape)
    ratio = jnp.exp(log_ratio)
    adv = advantages[:, None].astype(jnp.float32)
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    metrics = {}
    if beta:
        if ref_logp is None:
            raise ValueError("policy_gradient_loss: beta > 0 needs ref_logprobs in the batch")
        d = ref_logp - logp
        kl = jnp.exp(d) - d - 1.0  # k3 estimator of KL(pi || ref)
        per_token = per_token + beta * kl
        metrics["kl"] = jnp.sum(jax.lax.stop_gradient(kl) * mask) / norms.tokens
    loss = _aggregate(per_token, mask, variant.aggregate, norms)
    if entropy is not None:
        if entropy_coef:
            loss = loss - entropy_coef * _aggregate(entropy, mask, variant.aggregate, norms)
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
