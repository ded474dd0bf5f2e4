"""Logical axis names -> mesh axes: the one table that decides how everything is sharded.

Model code names axes (`batch`, `seq`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`,
`layers`); this module turns a tuple of logical names plus a shape into a `PartitionSpec`.
Run configs override entries of `DEFAULT_RULES` (e.g. `{"seq": "tensor"}` for sequence
parallelism at layer boundaries, or `{"embed": None}` for pure tensor parallelism).

Policies, applied in `spec_for`:
- A mesh axis is used at most once per tensor: when two dims map to the same mesh axis, the first
  dim keeps it and the later one is replicated. This is how activations [B, T, H] get
  (batch=(data, fsdp), seq, embed=None): `embed`'s fsdp is already taken by `batch`.
- Mesh axes of size 1 are dropped from specs (they shard nothing).
- GQA: when `kv_heads` is not divisible by its mesh axis (e.g. 2 KV heads, tensor=4), the KV
  projections are replicated along that axis (logged once as a warning): each tensor shard then
  holds every KV head, which costs 2 * H * nKV * hd extra bytes per layer but keeps the math exact
  and needs no head_dim splitting. Any other dim that does not divide (heads, embed, mlp, vocab,
  batch, ...) is an error naming the tensor, the logical axis, the mesh axis and the sizes.
"""
from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .mesh import MESH_AXES, MeshError

log = logging.getLogger(__name__)

MeshAxes = Union[None, str, Tuple[str, ...]]

LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                "layers")
DEFAULT_RULES: Dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
}
# Logical axes whose non-divisible sharding is replicated instead of rejected (see module doc).
REPLICATE_IF_INDIVISIBLE = ("kv_heads",)
ACTIVATION_AXES = ("batch", "seq", "embed")
_warned: set = set()


def merge_rules(overrides: Optional[Mapping[str, MeshAxes]] = None) -> Dict[str, MeshAxes]:
    """DEFAULT_RULES updated with `overrides`; unknown logical or mesh axis names are errors."""
    rules = dict(DEFAULT_RULES)
    for name, target in (overrides or {}).items():
        if name not in LOGICAL_AXES:
            raise MeshError(f"sharding rules: unknown logical axis {name!r}; known: {LOGICAL_AXES}")
        if isinstance(target, list):
            target = tuple(target)
        for axis in _as_tuple(target):
            if axis not in MESH_AXES:
                raise MeshError(f"sharding rules: logical axis {name!r} maps to unknown mesh axis "
                                f"{axis!r}; mesh axes are {MESH_AXES}")
        rules[name] = target
    return rules


def _as_tuple(target: MeshAxes) -> Tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def _mesh_sizes(mesh) -> Mapping[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


def spec_for(axes: Sequence[str], shape: Sequence[int], mesh, rules=None,
             name: str = "tensor") -> P:
    """PartitionSpec for a tensor with logical `axes` and `shape` on `mesh` (a Mesh or a dict of
    axis sizes). Raises MeshError naming `name`, the logical and mesh axes when a size does not
    divide (except the GQA replication policy above)."""
    rules = merge_rules(rules)
    sizes = _mesh_sizes(mesh)
    if len(axes) != len(shape):
        raise MeshError(f"{name}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
    used: set = set()
    out = []
    for logical, dim in zip(axes, shape):
        if logical not in rules:
            raise MeshError(f"{name}: logical axis {logical!r} has no sharding rule")
        mesh_axes = tuple(a for a in _as_tuple(rules[logical])
                          if a not in used and sizes.get(a, 1) > 1)
        factor = 1
        for a in mesh_axes:
            factor *= sizes[a]
        if mesh_axes and dim % factor:
            joined = " x ".join(f"{a}={sizes[a]}" for a in mesh_axes)
            if logical in REPLICATE_IF_INDIVISIBLE:
                key = (logical, dim, joined)
                if key not in _warned:  # once per layout, not once per tensor
                    _warned.add(key)
                    log.warning("%s=%d is not divisible by mesh %s (first seen in %s); replicating "
                                "%s along %s (GQA policy)", logical, dim, joined, name, logical,
                                mesh_axes)
                mesh_axes = ()
            else:
                raise MeshError(f"{name}: logical axis {logical!r} of size {dim} is sharded over "
                                f"mesh axis {joined} (= {factor} shards), which does not divide "
                                f"{dim}; change the mesh or the sharding rule for {logical!r}")
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
    """NamedSharding for [B, T] batch arrays (tokens, positions, segment_ids, loss_mask)."""
    rules = merge_rules(rules)
    return NamedSharding(mesh, P(_joined(rules["batch"], mesh), _joined(rules["seq"], mesh)))


def _joined(target: MeshAxes, mesh) -> MeshAxes:
    axes = tuple(a for a in _as_tuple(target) if _mesh_sizes(mesh).get(a, 1) > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def activation_spec(shape: Sequence[int], mesh, rules=None) -> P:
    """Spec of a [B, T, H] activation at a layer boundary (batch, seq, embed)."""
    return spec_for(ACTIVATION_AXES[:len(shape)], shape, mesh, rules, name="activation")


def activation_constraint(mesh: Mesh, rules=None):
    """`constrain` callable for `forward(...)`: pins [B, T, H] layer-boundary activations."""
    rules = merge_rules(rules)

    def constrain(x):
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, activation_spec(x.shape, mesh, rules)))

    return constrain
