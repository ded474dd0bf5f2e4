"""Sharded optimizer state and jitted, sharded, donating step functions (model-free: they take
parameter pytrees and their shardings; `phi_reason.model.sharded` derives those for the model)."""
from __future__ import annotations

import jax
import optax
from jax.sharding import Mesh, NamedSharding

from .rules import replicated


def opt_state_shardings(optimizer: optax.GradientTransformation, params_abstract,
                        params_shardings, mesh: Mesh):
    """Shardings for `optimizer.init(params)`: every parameter-shaped leaf (AdamW mu, nu, ...)
    takes its parameter's sharding; everything else (step counts, scalars) is replicated."""
    state = jax.eval_shape(optimizer.init, params_abstract)
    return optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, state, params_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding))


def sharded_opt_init(optimizer: optax.GradientTransformation, params, params_shardings,
                     mesh: Mesh):
    """`optimizer.init(params)` with its state created directly sharded."""
    shardings = opt_state_shardings(optimizer, params, params_shardings, mesh)
    return jax.jit(optimizer.init, out_shardings=shardings)(params)
