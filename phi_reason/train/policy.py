"""The policy's token log-probs (at the sampling temperature), sampling it at a temperature without
recompiling the sampler, and how far the sampler's log-probs are from the trainer's."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .token_stats import micro_batched, model_token_stats


def make_token_logprob_fn(cfg, mesh=None, logits_chunk: int = 0,
                          micro_batches: int = 1) -> Callable:
    """Jitted (params, batch) -> [B, T] log-prob of each token under params (aligned to tokens).
    With `batch["temperature"]` ([B], one per row) they are the log-probs of softmax(logits / T),
    the distribution the sampler drew from; the temperature is traced, so annealing it does not
    recompile. Computed `micro_batches` row-slices at a time and `logits_chunk` positions of
    logits at a time (0: all): with the train step's settings no [B, T, V] array exists. On a
    mesh the result comes back replicated, readable by every process."""
    constrain = None
    if mesh is not None:
        from ..sharding.rules import activation_constraint
        constrain = activation_constraint(mesh)

    def fn(params, batch):
        def one(mb):
            return model_token_stats(params, cfg, mb, constrain=constrain, chunk=logits_chunk,
                                     temperature=mb.get("temperature")).logp
        return micro_batched(one, batch, micro_batches)
    if mesh is None:
        return jax.jit(fn)
    from ..sharding.rules import replicated
    return jax.jit(fn, out_shardings=replicated(mesh))


def frozen_reference(params, cfg):
    """The frozen reference model (DPO `reference: params`, the RL KL term) from the policy's
    params: its own buffers (the train step donates the policy's), sharded as the policy is, and
    in the compute dtype when that is narrower than the params' (the forward casts every weight
    to the compute dtype before using it, so the log-probs are bit for bit the same at half the
    bytes)."""
    compute = jnp.dtype(cfg.dtype)

    def one(w):
        if jnp.issubdtype(w.dtype, jnp.floating) and jnp.dtype(w.dtype).itemsize > compute.itemsize:
            return w.astype(compute)
        return jnp.copy(w)
    return jax.tree_util.tree_map(one, params)


def fold_temperature(params, temperature: float):
    """Params whose logits are the originals divided by `temperature`: the final RMSNorm is linear
    in its scale and the LM head is linear, so scaling `final_norm` by 1/T scales every logit by
    1/T. Sampling these at temperature 1 is sampling the policy at T, and the sampler (whose
    temperature is a compile-time constant) compiles once however the temperature is annealed.
    The sampler's log-probs are then those of the tempered distribution."""
    scale = jnp.asarray(1.0 / temperature, jnp.float32)
    norm = params["final_norm"]
    return dict(params, final_norm=(norm.astype(jnp.float32) * scale).astype(norm.dtype))


def logprob_temperature(temperature: float, mode: str = "sampling") -> float:
    """The temperature the policy-gradient log-probs (old, new, reference) are computed at, for
    rollouts sampled at `temperature`: "sampling" -> that temperature (trl and verl divide the
    logits by it, so ratio and KL are those of the sampling distribution); "one" -> 1.0 (the policy
    itself, whatever it was sampled at). Greedy sampling (T = 0) uses 1.0."""
    if mode not in LOGPROB_TEMPERATURES:
        raise ValueError(f"unknown log-prob temperature mode {mode!r}; "
                         f"choose from {', '.join(LOGPROB_TEMPERATURES)}")
    return float(temperature) if mode == "sampling" and temperature > 0 else 1.0


LOGPROB_TEMPERATURES = ("sampling", "one")


def logprob_mismatch(sampler_logprobs, trainer_logprobs) -> dict:
    """How far the sampler's log-probs of the sampled tokens are from the trainer's recomputed
    ones (different programs: KV-cache decode vs full forward, bf16 rounding). Inputs: per-row
    sequences of per-token log-probs of the same tokens. With d = trainer - sampler per token
    (log of the ratio p_trainer / p_sampler, tokens drawn from the sampler):

      abs_logp_diff_mean = mean |d|;  k3_kl = mean(exp(d) - 1 - d), Schulman's k3 estimate of
      KL(sampler || trainer);  ratio_max / ratio_min = max / min exp(d) (what TIS truncates).

    NaN when there are no tokens."""
    s = [np.asarray(x, np.float64) for x in sampler_logprobs]
    t = [np.asarray(x, np.float64) for x in trainer_logprobs]
    if len(s) != len(t) or any(a.shape != b.shape for a, b in zip(s, t)):
        raise ValueError("logprob_mismatch: sampler and trainer log-probs differ in shape")
    d = np.concatenate([b - a for a, b in zip(s, t)] or [np.zeros(0)])
    if not d.size:
        nan = float("nan")
        return {"mismatch/abs_logp_diff_mean": nan, "mismatch/k3_kl": nan,
                "mismatch/ratio_max": nan, "mismatch/ratio_min": nan}
    return {"mismatch/abs_logp_diff_mean": float(np.abs(d).mean()),
            "mismatch/k3_kl": float(np.mean(np.expm1(d) - d)),
            "mismatch/ratio_max": float(np.exp(d.max())),
            "mismatch/ratio_min": float(np.exp(d.min()))}
