"""The parameters on a mesh: PartitionSpecs and NamedShardings from each weight's logical axes (by
the rules table of `phi_reason.sharding.rules`), and init straight into those shardings.

Nothing here materialises a whole parameter on one device: `sharded_init` runs `init_params` under
`jax.jit` with `out_shardings`, so each device computes only its own shards.
"""
from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..sharding.rules import spec_for
from .config import ModelConfig
from .params import init_params, param_specs, unflatten_params


def param_partition_specs(cfg: ModelConfig, mesh, rules=None) -> dict:
    """Pytree (params structure) of PartitionSpecs derived from `param_specs(cfg)`; `mesh` may be
    a Mesh or a {axis: size} mapping (the planner's)."""
    return unflatten_params({
        path: spec_for(s.axes, s.shape, mesh, rules, name="/".join(path))
        for path, s in param_specs(cfg).items()})


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules=None) -> dict:
    """Pytree of NamedSharding with the same structure as the params."""
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec),
                                  param_partition_specs(cfg, mesh, rules),
                                  is_leaf=lambda x: isinstance(x, P))


def sharded_init_fn(cfg: ModelConfig, mesh: Mesh, rules=None, dtype=None):
    """The jitted `key -> params` that `sharded_init` runs (each device computes its shards)."""
    shardings = param_shardings(cfg, mesh, rules)
    return jax.jit(lambda k: init_params(cfg, k, dtype), out_shardings=shardings)


def sharded_init(cfg: ModelConfig, key: jax.Array, mesh: Mesh, rules=None, dtype=None) -> dict:
    """`init_params(cfg, key, dtype)` created directly in its NamedShardings on `mesh`."""
    return sharded_init_fn(cfg, mesh, rules, dtype)(key)
