"""The policy's token log-probs, and sampling it at a temperature without recompiling the
sampler."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ..model.decoder import forward
from .losses import token_logprobs


def make_token_logprob_fn(cfg, mesh=None) -> Callable:
    """Jitted (params, batch) -> [B, T] log-prob of each token under params (aligned to tokens).
    On a mesh the result comes back replicated, readable by every process."""
    def fn(params, batch):
        logits = forward(params, batch["tokens"], cfg, positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
        return token_logprobs(logits, batch["tokens"])
    if mesh is None:
        return jax.jit(fn)
    from ..sharding.rules import replicated
    return jax.jit(fn, out_shardings=replicated(mesh))


def fold_temperature(params, temperature: float):
    """Params whose logits are the originals divided by `temperature`: the final RMSNorm is linear
    in its scale and the LM head is linear, so scaling `final_norm` by 1/T scales every logit by
    1/T. Sampling these at temperature 1 is sampling the policy at T, and the sampler (whose
    temperature is a compile-time constant) compiles once however the temperature is annealed.
    The sampler's log-probs are then those of the tempered distribution."""
    scale = jnp.asarray(1.0 / temperature, jnp.float32)
    norm = params["final_norm"]
    return dict(params, final_norm=(norm.astype(jnp.float32) * scale).astype(norm.dtype))
