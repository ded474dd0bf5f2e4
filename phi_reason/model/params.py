"""One declaration per weight: shape, logical axes, initializer and HF mapping.

Everything that needs to know about weights (init, sharding rules, HF conversion, the memory
planner, parameter counts) derives from `param_specs(cfg)`.

Layout (torch's `[out, in]` for every linear, layers stacked on axis 0):
  embed            [V, H]                 ("vocab", "embed")
  layers/ln1       [L, H]
  layers/wq        [L, nH, hd, H]          HF qkv_proj rows [0, nH*hd)
  layers/wk        [L, nKV, hd, H]         HF qkv_proj rows [nH*hd, +nKV*hd)
  layers/wv        [L, nKV, hd, H]         HF qkv_proj rows [.., +nKV*hd)
  layers/wo        [L, H, nH, hd]          HF o_proj
  layers/ln2       [L, H]
  layers/w_gate    [L, I, H]               HF gate_up_proj rows [0, I)
  layers/w_up      [L, I, H]               HF gate_up_proj rows [I, 2I)
  layers/w_down    [L, H, I]               HF down_proj
  final_norm       [H]
  lm_head          [V, H]                  absent when tie_word_embeddings

Every leaf is a reshape of (rows of) its HF tensor, so conversion never transposes: it moves
bytes. The model contracts a linear's trailing (input) dims (`decoder.dense`); XLA's dot takes
either operand order natively, and on CPU this layout is also the faster one for the weight
gradient and for skinny decode products (benchmarks in README).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    path: Tuple[str, ...]
    shape: Tuple[int, ...]
    axes: Tuple[str, ...]  # logical axis names, one per dim
    init: str  # "normal" (std = initializer_range) or "ones"
    hf_name: str  # HF state-dict name; "{i}" is the layer index for stacked weights
    hf_slice: Optional[Tuple[int, int]] = None  # row range [a, b) in the fused HF tensor

    @property
    def stacked(self) -> bool:
        return self.axes[0] == "layers"


def param_specs(cfg: ModelConfig) -> Dict[Tuple[str, ...], ParamSpec]:
    V, H, FF, L = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    nH, nKV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, kv = nH * hd, nKV * hd
    attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    specs = [
        ParamSpec(("embed",), (V, H), ("vocab", "embed"), "normal", "model.embed_tokens.weight"),
        ParamSpec(("layers", "ln1"), (L, H), ("layers", "embed"), "ones",
                  "model.layers.{i}.input_layernorm.weight"),
        ParamSpec(("layers", "wq"), (L, nH, hd, H), ("layers", "heads", "head_dim", "embed"),
                  "normal", attn + "qkv_proj.weight", (0, q)),
        ParamSpec(("layers", "wk"), (L, nKV, hd, H), ("layers", "kv_heads", "head_dim", "embed"),
                  "normal", attn + "qkv_proj.weight", (q, q + kv)),
        ParamSpec(("layers", "wv"), (L, nKV, hd, H), ("layers", "kv_heads", "head_dim", "embed"),
                  "normal", attn + "qkv_proj.weight", (q + kv, q + 2 * kv)),
        ParamSpec(("layers", "wo"), (L, H, nH, hd), ("layers", "embed", "heads", "head_dim"),
                  "normal", attn + "o_proj.weight"),
        ParamSpec(("layers", "ln2"), (L, H), ("layers", "embed"), "ones",
                  "model.layers.{i}.post_attention_layernorm.weight"),
        ParamSpec(("layers", "w_gate"), (L, FF, H), ("layers", "mlp", "embed"), "normal",
                  mlp + "gate_up_proj.weight", (0, FF)),
        ParamSpec(("layers", "w_up"), (L, FF, H), ("layers", "mlp", "embed"), "normal",
                  mlp + "gate_up_proj.weight", (FF, 2 * FF)),
        ParamSpec(("layers", "w_down"), (L, H, FF), ("layers", "embed", "mlp"), "normal",
                  mlp + "down_proj.weight"),
        ParamSpec(("final_norm",), (H,), ("embed",), "ones", "model.norm.weight"),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(ParamSpec(("lm_head",), (V, H), ("vocab", "embed"), "normal",
                               "lm_head.weight"))
    return {s.path: s for s in specs}


def linear_shape(spec: ParamSpec) -> Tuple[int, int]:
    """(out, in) of one layer of a matrix leaf, as torch's Linear sees it: the leading per-layer
    dim is `out` when its axis is "embed" (o_proj, down_proj), else the trailing dim (hidden) is
    `in` and the rest is `out`."""
    shape = spec.shape[1:] if spec.stacked else spec.shape
    axes = spec.axes[1:] if spec.stacked else spec.axes
    size = int(np.prod(shape))
    n_out = shape[0] if axes[0] == "embed" else size // shape[-1]
    return n_out, size // n_out


def _tree_from_flat(flat: Dict[Tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def flatten_params(params: dict) -> Dict[Tuple[str, ...], object]:
    """{path tuple: leaf}. Iterative on purpose: a recursive closure would form a reference
    cycle that keeps large leaves alive until the next garbage collection."""
    out = {}
    stack = [((), params)]
    while stack:
        prefix, node = stack.pop()
        for k, v in node.items():
            if isinstance(v, dict):
                stack.append((prefix + (k,), v))
            else:
                out[prefix + (k,)] = v
    return out


def unflatten_params(flat: Dict[Tuple[str, ...], object]) -> dict:
    return _tree_from_flat(flat)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=None) -> dict:
    """Random init: N(0, initializer_range) for matrices, ones for norms (as HF). One jitted
    program (op-by-op eager init compiles every op separately and is slow on CPU)."""
    return _init_params(cfg, key, jnp.dtype(dtype or cfg.param_dtype).name)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(cfg: ModelConfig, key: jax.Array, dtype: str) -> dict:
    specs = param_specs(cfg)
    keys = jax.random.split(key, len(specs))
    flat = {}
    for k, (path, s) in zip(keys, sorted(specs.items())):
        if s.init == "ones":
            flat[path] = jnp.ones(s.shape, dtype)
        elif path == ("embed",) or len(s.shape) < 2:
            flat[path] = _normal(cfg, k, s.shape, dtype)
        else:
            # Linears draw their values in [in, out] order (the layout before this one), so a
            # seed still names the same model and recorded runs (demo, tests) stay comparable.
            n_out, n_in = linear_shape(s)
            lead = s.shape[:1] if s.stacked else ()
            w = _normal(cfg, k, lead + (n_in, n_out), dtype)
            flat[path] = jnp.swapaxes(w, -1, -2).reshape(s.shape)
    return _tree_from_flat(flat)


def _normal(cfg: ModelConfig, key, shape, dtype):
    return (cfg.initializer_range * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def abstract_params(cfg: ModelConfig, dtype=None) -> dict:
    """ShapeDtypeStructs of the parameter tree, without allocating anything."""
    return jax.eval_shape(lambda k: init_params(cfg, k, dtype), jax.random.key(0))


def param_count(cfg: ModelConfig) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params(cfg))))


def logical_axes(cfg: ModelConfig) -> dict:
    """The parameter tree with each leaf replaced by its tuple of logical axis names."""
    return _tree_from_flat({p: s.axes for p, s in param_specs(cfg).items()})
