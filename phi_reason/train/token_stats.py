"""Per-token statistics straight from the model, optionally without the [B, T, V] logits.

With a 200k vocabulary the float32 logits of one 4096-token row are 3.3 GB, and autodiff keeps
them (and their softmax) for the backward pass. `chunk > 0` computes the LM head, log-softmax,
argmax and entropy `chunk` positions at a time in a `lax.scan` whose body is rematerialised, so
only one chunk's logits ever exist, forward or backward. The numbers are the same formula
(`losses.shifted_token_stats`) on the same logits, so they agree with the full path to float32
rounding.

The log-prob passes that need no gradient (RL old-policy and reference log-probs, the DPO reference
precompute) also go through `micro_batched`: the batch is split into micro-batches run one after
another in a `lax.map`, so one micro-batch's activations exist at a time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ..model.config import ModelConfig
from ..model.decoder import forward, hidden_states, logits_from_hidden
from .losses import TokenStats, align_to_tokens, shifted_token_stats, target_mask, token_stats


def chunked_token_stats(params, h, tokens, cfg: ModelConfig, chunk: int,
                        entropy: bool = False, temperature=None) -> TokenStats:
    """TokenStats from hidden states h [B, T, H] (before the final norm), `chunk` positions of
    logits at a time (divided by `temperature`, scalar or [B], if given)."""
    tokens = jnp.asarray(tokens)
    b, t, _ = h.shape
    n = t - 1  # positions 0..T-2 predict tokens 1..T-1
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    hs = jnp.pad(h[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad)))
    # [n_chunks, B, chunk, ...]: scan over the sequence in chunks
    hs = hs.reshape(b, n_chunks, chunk, -1).swapaxes(0, 1)
    targets = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1)

    temp = None if temperature is None else jnp.asarray(temperature, jnp.float32)

    @jax.checkpoint
    def one_chunk(h_c, t_c, temp_):
        return shifted_token_stats(logits_from_hidden(params, h_c, cfg), t_c, entropy, temp_)

    def body(carry, xs):
        return carry, one_chunk(*xs, temp)

    _, stats = lax.scan(body, None, (hs, targets))
    unchunk = lambda x: None if x is None else x.swapaxes(0, 1).reshape(b, -1)[:, :n]  # noqa: E731
    return TokenStats(*(align_to_tokens(unchunk(x)) for x in stats))


def model_token_stats(params, cfg: ModelConfig, batch, prefix: str = "", constrain=None,
                      chunk: int = 0, entropy: bool = False, temperature=None) -> TokenStats:
    """TokenStats of `batch[prefix + "tokens"]` under the model (full logits when chunk == 0),
    of softmax(logits / temperature) when a temperature (scalar or [B]) is given."""
    tokens = batch[prefix + "tokens"]
    kw = dict(positions=batch.get(prefix + "positions"),
              segment_ids=batch[prefix + "segment_ids"], constrain=constrain)
    if not chunk:
        return token_stats(forward(params, tokens, cfg, **kw), tokens, entropy, temperature)
    return chunked_token_stats(params, hidden_states(params, tokens, cfg, **kw), tokens, cfg,
                               chunk, entropy, temperature)


def sequence_logprob_sums(params, cfg: ModelConfig, batch, prefix: str = "", constrain=None,
                          chunk: int = 0):
    """(sum of target-token log-probs [B], number of target tokens [B]) of the sequences under
    `prefix` in `batch`: what DPO needs from the policy and (precomputed once) the reference."""
    mask = target_mask({k: batch[prefix + k] for k in ("loss_mask", "segment_ids")})
    lp = model_token_stats(params, cfg, batch, prefix, constrain, chunk).logp
    return jnp.sum(lp * mask, -1), jnp.sum(mask, -1)


def micro_split(batch, n: int):
    """Every [B, ...] array of `batch` as [n, B / n, ...] (micro-batches along a new axis 0)."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch dimension {x.shape[0]} is not divisible by {n} micro-batches")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])
    return {k: split(v) for k, v in batch.items()}


def micro_batched(fn, batch, n_micro: int):
    """fn(micro_batch) -> pytree of [b, ...] arrays, run over `n_micro` micro-batches of `batch`
    one after another (a `lax.map`); the results concatenated back to [B, ...] in row order."""
    if n_micro <= 1:
        return fn(batch)
    stacked = lax.map(fn, micro_split(batch, n_micro))
    return jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), stacked)
