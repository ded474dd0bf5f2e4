"""AdamW with warm-up + cosine/linear/constant schedules, global-norm clipping, and a
weight-decay mask derived from the parameter declarations (no decay on norm weights)."""
from __future__ import annotations

import optax

from ..model.config import ModelConfig
from ..model.params import param_specs, unflatten_params

# The decay after warm-up, by `train.schedule` name: (peak, min_lr_ratio, steps) -> optax schedule.
LR_SCHEDULES = {
    "cosine": lambda peak, ratio, n: optax.cosine_decay_schedule(peak, n, alpha=ratio),
    "linear": lambda peak, ratio, n: optax.linear_schedule(peak, peak * ratio, n),
    "constant": lambda peak, ratio, n: optax.constant_schedule(peak),
}


def learning_rate_schedule(train_cfg, total_steps: int):
    """Linear warm-up from 0 to `lr`, then cosine / linear decay to `lr * min_lr_ratio` at
    `total_steps`, or constant."""
    peak = train_cfg.lr
    warmup = train_cfg.warmup_steps or int(round(train_cfg.warmup_ratio * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    if train_cfg.schedule not in LR_SCHEDULES:
        raise ValueError(f"train.schedule: unknown schedule {train_cfg.schedule!r}; registered: "
                         f"{', '.join(LR_SCHEDULES)}")
    after = LR_SCHEDULES[train_cfg.schedule](peak, train_cfg.min_lr_ratio, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def weight_decay_mask(cfg: ModelConfig) -> dict:
    """True where weight decay applies: every weight except norm scales. A norm scale is a
    weight with one feature axis (besides the stacked "layers" axis): ln1, ln2, final_norm."""
    return unflatten_params({
        path: len([a for a in spec.axes if a != "layers"]) > 1
        for path, spec in param_specs(cfg).items()})


def make_optimizer(train_cfg, cfg: ModelConfig, total_steps: int | None = None):
    """optax chain: clip by global norm -> AdamW (decoupled decay, masked) with the schedule.

    `total_steps` defaults to `train_cfg.steps`; it sets the length of the decay."""
    total = total_steps or train_cfg.steps
    if total is None:
        raise ValueError("make_optimizer: total_steps unknown (set train.steps)")
    schedule = learning_rate_schedule(train_cfg, total)
    parts = []
    if train_cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                             weight_decay=train_cfg.weight_decay, mask=weight_decay_mask(cfg)))
    return optax.chain(*parts), schedule
