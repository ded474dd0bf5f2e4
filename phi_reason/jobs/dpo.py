"""`phi-reason dpo CONFIG [k=v ...] [--resume]`: direct preference optimisation; the init model is
the reference, held as frozen params (`train.dpo.reference: params`) or its sequence log-probs
precomputed in one pass before training (`precompute`, cached in `reference_logps.npz`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..config import load_run_config
from ..files import atomic_open
from ..sharding import processes
from .build import finish_run, new_train_state, place_batch, place_global, setup_run
from .trainer import BatchSteps, Trainer


def precompute_reference_logps(ref_fn, params, data, steps: int, prepare):
    """One pass over the next `steps` batches: reference sequence log-prob sums per pair.
    The iterator is rewound to where it was, so training then sees the same batches."""
    start = data.get_state()
    chosen, rejected = [], []
    for i in range(steps):
        try:
            batch = next(data)
        except StopIteration:
            break
        c, r = ref_fn(params, prepare(batch, i + 1))
        chosen.append(np.asarray(c, np.float32))
        rejected.append(np.asarray(r, np.float32))
    data.set_state(start)
    return np.stack(chosen), np.stack(rejected)


def run_dpo(config: Optional[str], overrides: Sequence[str] = (), resume: bool = False,
            hooks: Sequence[Callable] = ()) -> int:
    """Train; returns the exit code (0). Errors as `run_sft`."""
    from ..train.policy import frozen_reference
    from ..train.steps import batch_shardings, make_dpo_step, make_reference_logps_fn

    run = load_run_config(config, overrides)
    mesh, cfg, params, data, total, train_cfg = setup_run(run, "dpo")
    place = lambda batch, step: place_batch(batch, mesh)  # noqa: E731
    prepare = place
    ref_params = None
    if train_cfg.dpo.reference == "params":
        ref_params = frozen_reference(params, cfg)
    else:
        cache = Path(run.output.dir) / "reference_logps.npz"
        if resume and cache.exists():
            with np.load(cache) as z:
                chosen, rejected = z["chosen"], z["rejected"]
        else:
            ref_fn = make_reference_logps_fn(cfg, mesh, train_cfg.logits_chunk,
                                             train_cfg.accumulation_steps)
            chosen, rejected = precompute_reference_logps(ref_fn, params, data, total, place)
            if processes.is_lead():
                with atomic_open(cache, "wb") as f:
                    np.savez(f, chosen=chosen, rejected=rejected)
            processes.barrier("dpo:reference_logps")

        def prepare(batch, step):
            refs = {"chosen_ref_logps": chosen[step - 1], "rejected_ref_logps": rejected[step - 1]}
            if mesh is None:
                return dict(batch, **refs)
            # the sums are of the global batch's rows, in its order: placed as global arrays
            rows = batch_shardings({"r": chosen[0]}, mesh)["r"]
            return dict(place(batch, step), **{k: place_global(v, rows) for k, v in refs.items()})

    state = new_train_state(cfg, train_cfg, params, mesh, ref_params)
    source = BatchSteps(state, make_dpo_step(cfg, train_cfg, mesh), data, prepare=prepare)
    trainer = Trainer(run, cfg, source, total, hooks=hooks)
    finish_run(trainer, cfg, trainer.train(resume=resume))
    return 0
