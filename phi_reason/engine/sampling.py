"""Token choice from logits: greedy, temperature, top-k, top-p. Pure functions of (key, logits).

Order and semantics follow transformers' logits warpers: temperature first, then top-k (keep the
k largest), then top-p (keep the smallest set of most probable tokens whose tempered probability
mass reaches p; the most probable token is always kept). The log-probability reported for a chosen
token is always under the model's *untempered, unfiltered* distribution, which is what
policy-gradient losses need.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class SamplingParams(NamedTuple):
    """Static sampling settings (hashable: part of the compiled function's identity)."""
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 -> off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        return self


def greedy(logits):
    """[..., V] -> argmax ids (lowest id on ties, as torch.argmax)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_p_keep(sorted_logits, top_p: float):
    """Keep-mask over logits sorted in *descending* order: token r survives when the probability
    mass of the tokens ranked strictly above it is < top_p (so rank 0 always survives)."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    return mass_above < top_p


def filtered_logits(logits, sp: SamplingParams):
    """Tempered logits restricted to the candidate set.

    Returns (candidate_logits [..., C], candidate_ids [..., C] or None when the candidates are
    the whole vocabulary). Excluded candidates carry -inf.
    """
    x = logits.astype(jnp.float32) / jnp.float32(sp.temperature)
    if sp.top_k > 0:
        k = min(sp.top_k, x.shape[-1])
        vals, ids = lax.top_k(x, k)  # descending
        if sp.top_p < 1.0:
            vals = jnp.where(top_p_keep(vals, sp.top_p), vals, -jnp.inf)
        return vals, ids.astype(jnp.int32)
    if sp.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        vals = jnp.take_along_axis(x, order, axis=-1)
        vals = jnp.where(top_p_keep(vals, sp.top_p), vals, -jnp.inf)
        return vals, order.astype(jnp.int32)
    return x, None


def sample(key, logits, sp: SamplingParams):
    """One token from logits [V] under `sp` with PRNG `key`."""
    if sp.greedy:
        return greedy(logits)
    vals, ids = filtered_logits(logits, sp)
    choice = jax.random.categorical(key, vals).astype(jnp.int32)
    return choice if ids is None else ids[choice]


def token_logprob(logits, token):
    """log softmax(logits)[token] in float32 for logits [..., V], token [...]."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, token[..., None], axis=-1)[..., 0]


def row_keys(key, row_ids, token_index):
    """Per-row PRNG keys from (prompt id, index of the token being sampled): the draw for a prompt's
    n-th token does not depend on which slot or batch the prompt ran in."""
    def one(r, t):
        return jax.random.fold_in(jax.random.fold_in(key, r), t)

    return jax.vmap(one)(row_ids, token_index)


def sample_rows(key, logits, row_ids, token_index, sp: SamplingParams):
    """logits [B, V] -> (tokens [B] int32, untempered logprobs [B] float32)."""
    if sp.greedy:
        tokens = greedy(logits)
    else:
        keys = row_keys(key, row_ids, token_index)
        tokens = jax.vmap(lambda k, row_logits: sample(k, row_logits, sp))(keys, logits)
    return tokens, token_logprob(logits, tokens)
