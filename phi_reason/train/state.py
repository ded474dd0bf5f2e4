"""TrainState: everything a training step reads and writes, as one pytree."""
from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    params: Any  # float32 master weights (ModelConfig.param_dtype)
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer updates taken (skipped non-finite steps included)
    rng: jax.Array  # uint32[2] raw key, split once per step by steps that sample
    # Frozen reference weights (DPO with reference="params", PG with KL): never updated, never
    # checkpointed (reloaded from the init checkpoint on resume).
    ref_params: Optional[Any] = None

    @classmethod
    def create(cls, params, optimizer, seed: int = 0, ref_params=None) -> "TrainState":
        return cls(params=params, opt_state=optimizer.init(params),
                   step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed),
                   ref_params=ref_params)

    def checkpoint_items(self) -> dict:
        """The parts that go into a checkpoint (reference params are not trained state)."""
        return {"params": self.params, "opt_state": self.opt_state, "step": self.step,
                "rng": self.rng}

    def with_checkpoint_items(self, items: dict) -> "TrainState":
        return self.replace(params=items["params"], opt_state=items["opt_state"],
                            step=items["step"], rng=items["rng"])
