"""`phi-reason sft CONFIG [k=v ...] [--resume]`: supervised fine-tuning, packed or unpacked."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..config import load_run_config
from .build import finish_run, new_train_state, place_batch, setup_run
from .trainer import BatchSteps, Trainer


def run_sft(config: Optional[str], overrides: Sequence[str] = (), resume: bool = False,
            hooks: Sequence[Callable] = ()) -> int:
    """Train; returns the exit code (0). Bad inputs raise `UsageError`, a non-finite loss
    `NonFiniteError` (the CLI reports both in one line)."""
    from ..train.steps import make_sft_step

    run = load_run_config(config, overrides)
    mesh, cfg, params, data, total, train_cfg = setup_run(run, "sft")
    state = new_train_state(cfg, train_cfg, params, mesh)
    source = BatchSteps(state, make_sft_step(cfg, train_cfg, mesh), data,
                        prepare=lambda batch, step: place_batch(batch, mesh))
    trainer = Trainer(run, cfg, source, total, hooks=hooks)
    finish_run(trainer, cfg, trainer.train(resume=resume))
    return 0
