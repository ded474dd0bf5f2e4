"""Orbax checkpoints of model parameters: saved leaf by leaf, restored into target shardings.

Layout (what `ocp.CheckpointManager(root)` sees as step `<step>`)::

    root/<step>/_CHECKPOINT_METADATA   custom_metadata["model_config"] = ModelConfig as JSON dict
    root/<step>/state/                 PyTree item (OCDBT + zarr3): {"params": <param tree>, ...}

The "state" item holds `{"params": ...}` so that a converted checkpoint and a training checkpoint
whose state item also has a "params" subtree (plus optimizer state) are read the same way: we
restore only the "params" subtree (`partial_restore`). Saving uses Orbax's partial-save API one
leaf at a time, so host memory holds one leaf, never the whole model. Measured peak beyond the
Python/JAX baseline: reading a leaf costs the leaf; writing costs about two (TensorStore stages
the whole array while writing it into OCDBT) -- see benchmarks/results/convert_memory_cpu.md.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Iterable, Iterator, Optional, Tuple

import jax
import numpy as np

from ..model.config import ModelConfig
from ..model.params import flatten_params, param_specs, unflatten_params
from .common import CheckpointError, atomic_output_dir, release_freed_memory, resolve_dtype

STATE_ITEM = "state"
PARAMS_KEY = "params"
CONFIG_KEY = "model_config"
METADATA_FILE = "_CHECKPOINT_METADATA"
CHUNK_BYTES = 64 * 2**20  # storage chunk: lets a sharded restore read only its own slices

Leaf = Tuple[Tuple[str, ...], object]


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: heavy, and only needed here
    return ocp


def _checkpointer():
    ocp = _ocp()
    handler = ocp.CompositeCheckpointHandler(**{STATE_ITEM: ocp.PyTreeCheckpointHandler()})
    return ocp.Checkpointer(handler)


def _save_context():
    from orbax.checkpoint.experimental import v1
    ctx = v1.Context()
    ctx.array.saving.use_compression = False  # weights barely compress; zstd costs throughput
    ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    # The default deep-copies every host array before writing (a guard for async saves whose
    # caller might mutate it): a second copy of each leaf. Our saves are synchronous and never
    # touch a leaf after handing it over.
    ctx.memory_options.deepcopy_host_arrays = False
    return ctx


@contextlib.contextmanager
def _fsync_deferred_to_publish():
    """Turn off TensorStore's per-file fsync (`file_io_sync`) while saving.

    With it on, every leaf's save waits for the disk before the next leaf is read, so reading and
    writing never overlap (the save ran at the disk's durable rate and the reads came on top).
    `atomic_output_dir` fsyncs every file and directory once before it renames the output into
    place, so the published checkpoint is exactly as durable. Orbax builds its TensorStore context
    in `get_ts_context` and takes no option for this, so the function is wrapped for the duration
    of the save; if that module moves in a later Orbax, saves keep the per-file fsync.
    """
    try:
        import tensorstore as ts
        from orbax.checkpoint._src.serialization import tensorstore_utils
        original = tensorstore_utils.get_ts_context
    except (ImportError, AttributeError):
        yield
        return

    def without_fsync(**kwargs):
        spec = original(**kwargs).spec.to_json()
        spec["file_io_sync"] = False
        return ts.Context(ts.Context.Spec(spec))

    tensorstore_utils.get_ts_context = without_fsync
    try:
        yield
    finally:
        tensorstore_utils.get_ts_context = original


def save_orbax(cfg: ModelConfig, leaves: Iterable[Leaf], out, step: int = 0,
               overwrite: bool = False, progress=None) -> str:
    """Write `out/<step>/` from (path, array) leaves arriving one at a time."""
    from orbax.checkpoint.experimental.v1 import partial
    specs = param_specs(cfg)
    with atomic_output_dir(out, overwrite) as tmp:
        step_dir = os.path.join(tmp, str(step))
        seen = set()
        with _save_context(), _fsync_deferred_to_publish():
            for path, leaf in leaves:
                if path not in specs:
                    raise CheckpointError(f"unexpected leaf {'/'.join(path)} for this config")
                if tuple(leaf.shape) != specs[path].shape:
                    raise CheckpointError(f"leaf {'/'.join(path)} has shape {tuple(leaf.shape)}, "
                                          f"config implies {specs[path].shape}")
                meta = {CONFIG_KEY: json.loads(cfg.to_json())} if not seen else None
                partial.save(step_dir, {PARAMS_KEY: unflatten_params({path: leaf})},
                             custom_metadata=meta)
                seen.add(path)
                if progress:
                    progress("/".join(path), int(np.prod(leaf.shape)) * leaf.dtype.itemsize)
                del leaf
                release_freed_memory()
            if seen != set(specs):
                raise CheckpointError(f"leaves missing: {sorted(set(specs) - seen)[:3]}")
            partial.finalize(step_dir)
    return os.path.abspath(os.fspath(out))


def save_params_orbax(cfg: ModelConfig, params: dict, out, step: int = 0,
                      overwrite: bool = False, progress=None) -> str:
    return save_orbax(cfg, flatten_params(params).items(), out, step, overwrite, progress)


# ------------------------------------------------------------------------------ reading


def is_orbax_dir(path) -> bool:
    try:
        find_step_dir(path)
        return True
    except CheckpointError:
        return False


def find_step_dir(path) -> str:
    """A step dir itself, or a CheckpointManager root (its latest complete step)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, STATE_ITEM)):
        return path
    steps = []
    if os.path.isdir(path):
        for name in os.listdir(path):
            if name.isdigit() and os.path.isdir(os.path.join(path, name, STATE_ITEM)):
                steps.append(int(name))
    if not steps:
        raise CheckpointError(f"{path}: not an Orbax checkpoint (no '{STATE_ITEM}' item and no "
                              "numbered step directories containing one)")
    return os.path.join(path, str(max(steps)))


def _step_metadata(step_dir):
    try:
        return _checkpointer().metadata(step_dir)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{step_dir}: unreadable Orbax metadata ({e})") from None


def read_orbax_config(step_dir) -> ModelConfig:
    custom = _step_metadata(step_dir).custom_metadata or {}
    if CONFIG_KEY not in custom:
        raise CheckpointError(f"{step_dir}/{METADATA_FILE}: no custom_metadata[{CONFIG_KEY!r}] "
                              "(save the model config with the checkpoint, or pass cfg=)")
    return ModelConfig(**custom[CONFIG_KEY])


def orbax_leaf_dtypes(step_dir, cfg: ModelConfig) -> Dict[Tuple[str, ...], np.dtype]:
    """Each parameter leaf's stored dtype, from metadata only; checks shapes against `cfg`."""
    items = _step_metadata(step_dir).item_metadata
    tree = items[STATE_ITEM] if items is not None else None
    tree = getattr(tree, "tree", tree)
    if not tree or PARAMS_KEY not in tree:
        raise CheckpointError(f"{step_dir}/{STATE_ITEM}: has no '{PARAMS_KEY}' subtree")
    flat = flatten_params(dict(tree[PARAMS_KEY]))
    specs = param_specs(cfg)
    if set(flat) != set(specs):
        raise CheckpointError(f"{step_dir}: parameters do not match the model config: missing "
                              f"{sorted(set(specs) - set(flat))[:3]}, unexpected "
                              f"{sorted(set(flat) - set(specs))[:3]}")
    for p, m in flat.items():
        if tuple(m.shape) != specs[p].shape:
            raise CheckpointError(f"{step_dir}: {'/'.join(p)} has shape {tuple(m.shape)}, the "
                                  f"model config implies {specs[p].shape}")
    return {p: np.dtype(m.dtype) for p, m in flat.items()}


def _restore(step_dir, abstract: dict, restore_args: dict) -> dict:
    ocp = _ocp()
    args = ocp.args.PyTreeRestore(item={PARAMS_KEY: abstract},
                                  restore_args={PARAMS_KEY: restore_args}, partial_restore=True)
    restored = _checkpointer().restore(step_dir, args=ocp.args.Composite(**{STATE_ITEM: args}))
    return restored[STATE_ITEM][PARAMS_KEY]


def _leaf_at(tree: dict, path: Tuple[str, ...]):
    # Not flatten_params: its recursive closure is a reference cycle that keeps the flat dict,
    # and so the leaf, alive until the next garbage collection (one more leaf of RSS per leaf).
    for k in path:
        tree = tree[k]
    return tree


def iter_orbax_leaves(step_dir, cfg: ModelConfig, dtype=None) -> Iterator[Leaf]:
    """Host numpy leaves, one at a time (each restore reads only that leaf)."""
    ocp = _ocp()
    want = resolve_dtype(dtype)
    for path, spec in param_specs(cfg).items():
        leaf = _leaf_at(_restore(
            step_dir, unflatten_params({path: 0}),
            unflatten_params({path: ocp.RestoreArgs(restore_type=np.ndarray, dtype=want)})), path)
        yield path, leaf
        del leaf  # before the next restore: at most one leaf alive at a time
        release_freed_memory()


def restore_orbax(path, shardings: Optional[dict] = None, dtype=None,
                  cfg: Optional[ModelConfig] = None) -> Tuple[ModelConfig, dict]:
    """(cfg, params). With `shardings` (a pytree of NamedSharding shaped like the params), each
    device reads only its own slices; without, leaves come back as host numpy arrays."""
    step_dir = find_step_dir(path)
    cfg = cfg or read_orbax_config(step_dir)
    stored = orbax_leaf_dtypes(step_dir, cfg)
    want = resolve_dtype(dtype)
    if shardings is None:
        return cfg, unflatten_params(dict(iter_orbax_leaves(step_dir, cfg, dtype)))
    ocp = _ocp()
    flat_sh = flatten_params(shardings)
    specs = param_specs(cfg)
    if set(flat_sh) != set(specs):
        raise CheckpointError(f"shardings tree does not match the params: missing "
                              f"{sorted(set(specs) - set(flat_sh))[:3]}")
    abstract = {p: jax.ShapeDtypeStruct(specs[p].shape, want or stored[p], sharding=flat_sh[p])
                for p in specs}
    args = {p: ocp.ArrayRestoreArgs(sharding=flat_sh[p], global_shape=specs[p].shape,
                                    dtype=want or stored[p]) for p in specs}
    return cfg, _restore(step_dir, unflatten_params(abstract), unflatten_params(args))
