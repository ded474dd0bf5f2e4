"""`load_pretrained` / `save_pretrained`: one entry point for HF and Orbax checkpoints."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import jax
import numpy as np

from ..model.config import ModelConfig
from ..model.params import flatten_params, param_specs, unflatten_params
from .common import CheckpointError, dtype_name, resolve_dtype
from .hf import HFCheckpoint, is_hf_dir, save_hf
from .orbax_io import is_orbax_dir, restore_orbax, save_params_orbax


def detect_format(path) -> str:
    """"hf" (config.json + *.safetensors) or "orbax" (a step dir or CheckpointManager root)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if is_hf_dir(path):
        return "hf"
    if is_orbax_dir(path):
        return "orbax"
    raise CheckpointError(f"{path}: neither a Hugging Face checkpoint (config.json + "
                          "*.safetensors) nor an Orbax checkpoint (<step>/state)")


def load_config(path) -> ModelConfig:
    """The ModelConfig of an HF or Orbax checkpoint directory, without reading its weights."""
    if detect_format(path) == "hf":
        from .hf import read_hf_config
        return read_hf_config(path)
    return _orbax_cfg(path)[0]


def load_pretrained(path, dtype=None, mesh=None, rules=None,
                    shardings: Optional[dict] = None) -> Tuple[ModelConfig, dict]:
    """(cfg, params) from an HF or Orbax checkpoint directory.

    Leaves are jax Arrays: placed by `shardings` (a NamedSharding pytree shaped like params)
    or, given `mesh`, by `phi_reason.model.sharded.param_shardings(cfg, mesh, rules)`;
    otherwise on the default device. Only one leaf at a time is held in host memory.
    `cfg.param_dtype` reports the dtype of the loaded weights.
    """
    fmt = detect_format(path)
    if fmt == "hf":
        with HFCheckpoint(path) as ck:
            cfg = _with_dtype(ck.cfg, dtype or ck.stored_dtype(("embed",)))
            flat_sh = _flat_shardings(cfg, mesh, rules, shardings)
            flat = {}
            for p, leaf in ck.iter_leaves(dtype):
                flat[p] = jax.device_put(leaf, flat_sh[p] if flat_sh else None)
                del leaf
        return cfg, unflatten_params(flat)
    cfg, _ = _orbax_cfg(path)
    flat_sh = _flat_shardings(cfg, mesh, rules, shardings)
    cfg, params = restore_orbax(path, unflatten_params(flat_sh) if flat_sh else None, dtype, cfg)
    if not flat_sh:
        params = jax.tree_util.tree_map(jax.device_put, params)
    return _with_dtype(cfg, np.dtype(params["embed"].dtype)), params


def save_pretrained(cfg: ModelConfig, params: dict, out, format: str = "hf",
                    tokenizer_from=None, max_shard_size="5GB", overwrite: bool = False,
                    dtype=None) -> str:
    """Write `params` as an HF safetensors dir (format="hf") or an Orbax checkpoint ("orbax")."""
    if format == "hf":
        return save_hf(cfg, params, out, tokenizer_from=tokenizer_from,
                       max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite)
    if format == "orbax":
        want = resolve_dtype(dtype)
        if want is not None:
            params = jax.tree_util.tree_map(lambda x: x.astype(want), params)
            cfg = cfg.replace(param_dtype=dtype_name(want))
        return save_params_orbax(cfg, params, out, overwrite=overwrite)
    raise CheckpointError(f"format must be 'hf' or 'orbax', got {format!r}")


def _orbax_cfg(path):
    from .orbax_io import find_step_dir, read_orbax_config
    step_dir = find_step_dir(path)
    return read_orbax_config(step_dir), step_dir


def _flat_shardings(cfg, mesh, rules, shardings):
    if shardings is None and mesh is not None:
        from ..model.sharded import param_shardings
        shardings = param_shardings(cfg, mesh, rules)
    if shardings is None:
        return None
    flat = flatten_params(shardings)
    if set(flat) != set(param_specs(cfg)):
        raise CheckpointError("shardings tree does not match the parameter tree of the config")
    return flat


def _with_dtype(cfg: ModelConfig, dtype) -> ModelConfig:
    return cfg.replace(param_dtype=dtype_name(resolve_dtype(dtype)))
