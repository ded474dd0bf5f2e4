"""The policy's token log-probs (at the sampling temperature), sampling it at a temperature without
recompiling the sampler, and how far the sampler's log-probs are from the trainer's."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..model.decoder import forward
from .losses import token_logprobs


def make_token_logprob_fn(cfg, mesh=None) -> Callable:
    """Jitted (params, batch) -> [B, T] log-prob of each token under params (aligned to tokens).
    With `batch["temperature"]` ([B], one per row) they are the log-probs of softmax(logits / T),
    the distribution the sampler drew from; the temperature is traced, so annealing it does not
    recompile. On a mesh the result comes back replicated, readable by every process."""
    def fn(params, batch):
        logits = forward(params, batch["tokens"], cfg, positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
        return token_logprobs(logits, batch["tokens"], batch.get("temperature"))
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
