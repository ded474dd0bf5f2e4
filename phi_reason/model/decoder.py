"""The Phi-3 / Phi-4 decoder as pure functions over the parameter pytree.

`forward` is the public entry; the per-layer pieces (`attention_inputs`, `layer_output`) are
public too so the KV-cache sampler composes the same math instead of re-implementing it.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from .attention import attention
from .config import ModelConfig
from .rope import apply_rope, rope_tables

# Primitives through which a layer calls a fused attention kernel. Depending on the JAX version
# the policy sees the custom_vjp call itself or the call inside its forward rule (jax 0.10 shows
# the CPU kernel's `custom_partitioning` wrapper around its `ffi_call`, never `custom_vjp_call`).
_ATTENTION_KERNEL_PRIMITIVES = ("custom_vjp_call", "custom_partitioning", "ffi_call",
                                "pallas_call")


def _save_dots_and_attention_kernels(prim, *args, **params):
    """Matmul outputs (as save_dots) plus the outputs of the fused attention kernels (CPU FFI
    kernel, Pallas Triton, splash): their output and softmax statistics, so the backward pass
    runs the kernel's backward without re-running its forward. JAX's cuDNN call does not expose
    its residuals this way (benchmarks/check_remat_residuals.py)."""
    return (prim.name.startswith(_ATTENTION_KERNEL_PRIMITIVES)
            or jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims(prim, *args, **params))


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_dots_attn": _save_dots_and_attention_kernels,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("q", "k", "v"),
}


def remat_policy(name: str):
    """The `jax.checkpoint` policy behind `ModelConfig.remat` (every name but "none")."""
    return _REMAT[name]


def rms_norm(x, weight, eps):
    """Statistics in float32, cast back to the input dtype, then scale (HF Phi3RMSNorm)."""
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)


SKINNY_ROWS = 64  # at most this many rows: the weight-major product (see `dense`)


def dense(x, w, n_in: int = 1, preferred_element_type=None):
    """x [..., *in] times a linear weight w [*out, *in] (torch's layout: input dims trailing),
    computed over flattened tokens [N, *in] -> [..., *out].

    XLA CPU runs contractions with several batch-like dims (einsum "bth,ih->bti", and above all
    its weight gradient, which contracts over both b and t) ~1.6x slower than the same product
    over [B*T, ...]; the reshapes are free (row-major bitcasts) and GSPMD keeps the batch sharding
    on the merged leading dim. Both operands are viewed 2-D ([N, in] x [out, in]): with several
    output dims (wq's [nH, hd, H]) XLA CPU would copy the weight into [in, out] order on every
    call, while a 2-D product with a transposed operand runs natively. An `x` that is already
    [N, in] is used as is: callers flatten a shared input once, so the backward saves it once.
    """
    lead, out_shape = x.shape[:x.ndim - n_in], w.shape[:w.ndim - n_in]
    n_in_total = math.prod(w.shape[w.ndim - n_in:])
    x2 = x.reshape(-1, n_in_total)
    w2 = w.reshape(-1, n_in_total)  # [out, in]
    if x2.shape[0] <= SKINNY_ROWS and jax.default_backend() == "cpu":
        # Decode-sized products: [out, in] x [N, in]^T with the weight as the long operand reads
        # it 1.2-2x faster on XLA CPU than the [N, out] form (measured for N = 1..64). The barrier
        # stops the algebraic simplifier from folding the transpose back into the dot.
        y = lax.optimization_barrier(lax.dot_general(
            w2, x2, (((1,), (1,)), ((), ())), preferred_element_type=preferred_element_type)).T
    else:
        y = lax.dot_general(x2, w2, (((1,), (1,)), ((), ())),
                            preferred_element_type=preferred_element_type)
    return y.reshape(lead + out_shape)


def positions_from_segments(segment_ids):
    """Positions restarting at 0 at every segment boundary (packed rows)."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)[None, :]
    start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    seg_start = lax.cummax(jnp.where(start, idx, 0), axis=1)
    return idx - seg_start


def attention_inputs(lp, x, cfg: ModelConfig, cos, sin):
    """Pre-norm, QKV projections and RoPE. Returns q [B,T,nH,hd], k, v [B,T,nKV,hd]."""
    dt = jnp.dtype(cfg.dtype)
    b, t, _ = x.shape
    h = rms_norm(x, lp["ln1"], cfg.rms_norm_eps).reshape(b * t, -1)  # shared by q, k, v
    q = dense(h, lp["wq"].astype(dt)).reshape(b, t, cfg.num_attention_heads, -1)
    k = dense(h, lp["wk"].astype(dt)).reshape(b, t, cfg.num_key_value_heads, -1)
    v = dense(h, lp["wv"].astype(dt)).reshape(b, t, cfg.num_key_value_heads, -1)
    q = checkpoint_name(apply_rope(q, cos, sin), "q")
    k = checkpoint_name(apply_rope(k, cos, sin), "k")
    return q, k, checkpoint_name(v, "v")


def attention_output(lp, x, attn, cfg: ModelConfig):
    """Output projection + residual."""
    attn = checkpoint_name(attn, "attn_out")
    # wo [H, nH, hd]: (heads, head_dim) are its trailing dims, so both views are free bitcasts.
    return x + dense(attn, lp["wo"].astype(jnp.dtype(cfg.dtype)), n_in=2)


def mlp_block(lp, x, cfg: ModelConfig):
    """Pre-norm SwiGLU MLP + residual."""
    dt = jnp.dtype(cfg.dtype)
    h = rms_norm(x, lp["ln2"], cfg.rms_norm_eps).reshape(-1, x.shape[-1])  # shared by gate, up
    gate = dense(h, lp["w_gate"].astype(dt))
    up = dense(h, lp["w_up"].astype(dt))
    return x + dense(jax.nn.silu(gate) * up, lp["w_down"].astype(dt)).reshape(x.shape)


def layer_output(lp, x, attn, cfg: ModelConfig):
    """Output projection + residual, then the SwiGLU MLP block + residual."""
    return mlp_block(lp, attention_output(lp, x, attn, cfg), cfg)


def decoder_layer(lp, x, cfg: ModelConfig, cos, sin, segment_ids, impl: str,
                  constrain=None):
    q, k, v = attention_inputs(lp, x, cfg, cos, sin)
    attn = attention(q, k, v, segment_ids, segment_ids, impl=impl, block=cfg.attention_chunk)
    out = layer_output(lp, x, attn, cfg)
    return constrain(out) if constrain is not None else out


def embed_tokens(params, tokens, cfg: ModelConfig):
    return jnp.take(params["embed"], tokens, axis=0).astype(jnp.dtype(cfg.dtype))


def logits_from_hidden(params, h, cfg: ModelConfig):
    """Final norm and LM head ([V, H]: the embedding table when tied); float32 logits."""
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return dense(h, head.astype(h.dtype), preferred_element_type=jnp.float32)


def hidden_states(params, tokens, cfg: ModelConfig, positions=None, segment_ids=None,
                  constrain=None):
    """Decoder trunk: [B, T] tokens -> [B, T, H] hidden states before the final norm.

    `constrain` (optional) is applied to activations at layer boundaries; the sharding layer
    passes a `with_sharding_constraint` here.
    """
    tokens = jnp.asarray(tokens)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = positions_from_segments(segment_ids)
    cos, sin = rope_tables(cfg, positions)
    x = embed_tokens(params, tokens, cfg)
    if constrain is not None:
        x = constrain(x)
    layer = functools.partial(decoder_layer, cfg=cfg, cos=cos, sin=sin,
                              segment_ids=segment_ids, impl=cfg.attention, constrain=constrain)
    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=remat_policy(cfg.remat))
    if cfg.scan_layers:
        x, _ = lax.scan(lambda h, lp: (layer(lp, h), None), x, params["layers"])
    else:
        for i in range(cfg.num_hidden_layers):
            x = layer(jax.tree_util.tree_map(lambda w: w[i], params["layers"]), x)
    return x


def forward(params, tokens, cfg: ModelConfig, positions=None, segment_ids=None,
            constrain=None):
    """[B, T] int tokens -> [B, T, V] float32 logits.

    positions: [B, T] (default: restart at 0 per segment); segment_ids: [B, T] with 0 = padding
    (default: all ones). Tokens attend causally within their own segment only.
    """
    h = hidden_states(params, tokens, cfg, positions, segment_ids, constrain)
    return logits_from_hidden(params, h, cfg)
