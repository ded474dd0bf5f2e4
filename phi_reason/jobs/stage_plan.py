"""`phi-reason plan CONFIG.yaml`: the per-device memory of every program a stage compiles, on the
hardware the config names (`target:`), from the config's own model, mesh, batch and lengths.

Programs (each one's peak is what is resident while it runs plus its own transients):
- train_step: one optimizer update at the micro-batch (`train.micro_batch_size`), as
  `plan.plan_memory` models it (with accumulation: the gradient sum and one micro-batch's).
- logprob_pass (RL): the old-policy and reference passes (`make_token_logprob_fn`), one
  micro-batch at a time, forward only (`plan.forward_estimate`).
- reference_precompute (DPO, `reference: precompute`): the same pass over the pairs, run before
  the optimizer state exists.
- rollout (RL, rollout-DPO; also the RL loop's held-out eval, which uses the same engine): the
  paged engine's inference weights (compute dtype, replicated over the batch axes, split over
  `tensor`; none when they are the trainer's own), its KV pool - ACCEL_KV_FRACTION of the memory
  left, as the engine sizes it on the device, KV heads over `tensor` - with the rows per device
  and rows at full length it holds (`engine.paged_sampler.pool_plan`), chunk buffers, and a
  prompt's prefill.
Sharded programs also hold FSDP-gathered weights (`plan.gathered_weight_bytes`: one layer and the
vocabulary table, in the parameter dtype; the train step its gradients too, see `plan_memory`).
Resident: the policy params (`model.param_dtype`), AdamW mu and nu (the parameter dtype, as optax
keeps them) for training stages, and the frozen reference in the compute dtype
(`train.policy.frozen_reference`) when the stage has one.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

import jax.numpy as jnp

from ..config import RunConfig, RunConfigError, load_run_config
from ..hardware import GiB
from ..model.config import ModelConfig
from ..sharding.mesh import MeshError, resolve_axis_sizes
from ..sharding.rules import merge_rules
from . import plan as planner

STAGES = ("sft", "dpo", "rl", "rollout-dpo")


@dataclasses.dataclass
class ProgramPlan:
    name: str
    shape: str  # what one device runs, in words
    parts: Dict[str, int]  # bytes per device by consumer
    total_bytes: int = 0
    largest: str = ""
    fits: Optional[bool] = None
    engine: Dict[str, int] = dataclasses.field(default_factory=dict)  # rollout: rows and pool

    def finish(self, usable: Optional[int]) -> "ProgramPlan":
        self.total_bytes = sum(self.parts.values())
        self.largest = max(self.parts, key=self.parts.get)
        self.fits = None if usable is None else self.total_bytes <= usable
        return self


@dataclasses.dataclass
class StagePlan:
    config: str
    stage: str
    model: str
    accelerator: Optional[str]
    devices: int
    mesh: Dict[str, int]
    capacity_bytes: Optional[int]
    usable_bytes: Optional[int]
    programs: List[ProgramPlan]
    fits: Optional[bool]
    notes: List[str]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def detect_stage(path: str) -> str:
    """The stage a config file is for, from its sections: `rl:` -> rl, `rollout:` ->
    rollout-dpo, `data.schema: dpo` -> dpo, else sft."""
    import yaml
    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    if "rl" in tree:
        return "rl"
    if "rollout" in tree:
        return "rollout-dpo"
    return "dpo" if (tree.get("data") or {}).get("schema") == "dpo" else "sft"


def load_stage_config(path: str, stage: str, overrides=()):
    if stage == "rl":
        from .rl_config import RLRunConfig
        return load_run_config(path, overrides, schema=RLRunConfig)
    if stage == "rollout-dpo":
        from .rollout_dpo import RolloutDPOConfig
        return load_run_config(path, overrides, schema=RolloutDPOConfig)
    return load_run_config(path, overrides)


def stage_model(run: RunConfig) -> ModelConfig:
    """The architecture: the checkpoint's config when `model.path` exists on this machine,
    else `model.preset` (plans are often made before the previous stage has written its
    model); the runtime fields (dtypes, remat, attention) from the config either way."""
    m = run.model
    if m.path and os.path.isdir(m.path):
        from ..checkpoint import load_config
        return load_config(m.path).replace(**m.runtime_fields())
    if m.preset is None:
        raise RunConfigError(f"plan: model.path {m.path!r} does not exist here and the config "
                             "sets no model.preset to plan its architecture")
    return m.build()


def _mesh_sizes(run: RunConfig, devices: int) -> Dict[str, int]:
    ms = run.mesh
    dcn = ms.dcn_data * ms.dcn_fsdp
    if devices % dcn:
        raise MeshError(f"target.devices={devices} is not divisible by the DCN axes "
                        f"(dcn_data x dcn_fsdp = {dcn})")
    sizes = resolve_axis_sizes(devices // dcn, ms.data, ms.fsdp, ms.tensor)
    sizes["data"] *= ms.dcn_data
    sizes["fsdp"] *= ms.dcn_fsdp
    return sizes


def plan_stage(run: RunConfig, stage: str, accelerator: Optional[str] = None,
               devices: Optional[int] = None, config_name: str = "") -> StagePlan:
    if stage not in STAGES:
        raise RunConfigError(f"plan: unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    accelerator = accelerator or run.target.accelerator
    devices = devices or run.target.devices
    if not devices:
        raise RunConfigError("plan: the config names no target.devices; give --devices N")
    cfg = stage_model(run)
    sizes = _mesh_sizes(run, devices)
    rules = merge_rules(None)
    acc, capacity, attention = planner._accelerator(accelerator)
    if cfg.attention == "reference":  # asked for by the config: T x T scores on any device
        attention = "reference"
    usable = int(capacity * planner.USABLE_FRACTION) if capacity else None
    local = planner._local_cfg(cfg, sizes, rules, cfg.dtype, cfg.param_dtype)
    elems = planner._param_elems(cfg, sizes, rules)
    pbytes, cbytes = jnp.dtype(cfg.param_dtype).itemsize, jnp.dtype(cfg.dtype).itemsize
    t = run.train
    training = stage != "rollout-dpo"
    has_ref = (stage == "dpo" and t.dpo.reference == "params") or (stage == "rl" and t.pg.beta > 0)
    gathered = sum(planner.gathered_weight_bytes(cfg, sizes, rules))
    resident = {"params": elems * pbytes}
    if training:
        resident["optimizer"] = 2 * elems * pbytes
    if has_ref:
        resident["reference"] = elems * min(pbytes, cbytes)

    def rows_local(rows: int, seq: int):
        b, s, _ = planner._local_shape(("batch", "seq", "embed"), (rows, seq, cfg.hidden_size),
                                       sizes, rules, "activation")
        return b, s

    programs: List[ProgramPlan] = []
    notes: List[str] = []
    micro = t.micro_batch_size or t.batch_size
    if stage == "rl":
        rl = run.rl
        seq = -(-(rl.max_prompt_tokens + rl.max_new_tokens) // rl.pad_multiple) * rl.pad_multiple
    else:
        seq = run.data.seq_len
    train_rows = 2 * micro if stage == "dpo" else micro  # chosen + rejected in one forward
    if stage in ("sft", "dpo"):
        from .build import check_context
        check_context(cfg, seq)
    if training:
        tp = planner.plan_memory(cfg, sizes, train_rows, seq, remat=cfg.remat, accelerator=None,
                                 param_dtype=cfg.param_dtype, compute_dtype=cfg.dtype,
                                 optimizer_dtype=cfg.param_dtype, rules=rules,
                                 attention=attention, logits_chunk=t.logits_chunk,
                                 accumulation_steps=t.accumulation_steps)
        programs.append(ProgramPlan(
            "train_step", f"{tp.local_batch} x {tp.local_seq} tokens per micro-batch x "
            f"{t.accumulation_steps}, remat {cfg.remat}, logits_chunk {t.logits_chunk}",
            dict(resident, grads=tp.grads_bytes, activations=tp.activations_bytes,
                 logits=tp.logits_bytes, gathered=tp.gathered_bytes)))
    if stage in ("rl", "dpo") and (stage == "rl" or t.dpo.reference == "precompute"):
        b, s = rows_local(train_rows, seq)
        fwd = planner.forward_estimate(local, b, s, attention, t.logits_chunk)
        if stage == "rl":
            programs.append(ProgramPlan(
                "logprob_pass", f"old-policy{' and reference' if has_ref else ''} log-probs, "
                f"{b} x {s} tokens per micro-batch",
                dict(resident, forward=fwd, gathered=gathered)))
        else:
            programs.append(ProgramPlan(
                "reference_precompute", f"reference log-probs of the pairs, {b} x {s} tokens per "
                "micro-batch (before the optimizer state exists)",
                {"params": resident["params"], "forward": fwd, "gathered": gathered}))
    if stage in ("rl", "rollout-dpo"):
        programs.append(_rollout_program(run, stage, cfg, local, sizes, resident, attention,
                                         gathered, usable))
        if stage == "rl" and run.rl.eval_problems:
            notes.append("held-out eval uses the rollout program (same sampler and slots)")
    for p in programs:
        p.finish(usable)
    fits = None if usable is None else all(p.fits for p in programs)
    return StagePlan(config_name, stage, run.model.preset or str(run.model.path), acc, devices,
                     sizes, capacity, usable, programs, fits, notes)


def _rollout_program(run, stage, cfg, local, sizes, resident, attention, gathered,
                     usable) -> ProgramPlan:
    """The paged engine as it sizes itself on the device: inference weights (compute dtype,
    decode layout), then a KV pool of ACCEL_KV_FRACTION of what is left, rows from `pool_plan`."""
    from ..engine import paged_sampler as engine
    from ..engine.sampler import bucket
    from ..engine.scheduler import kv_bytes_per_block
    if stage == "rl":
        from .rl_loop import rl_engine_rows
        r, rows = run.rl, run.rows_per_step()
        num_slots = rl_engine_rows(run, sizes["data"] * sizes["fsdp"])
    else:
        r = run.rollout
        rows, num_slots = r.prompts_per_chunk * r.samples_per_prompt, r.num_slots
    cap = cfg.max_position_embeddings
    shards = sizes["data"] * sizes["fsdp"]
    prompt = bucket(r.max_prompt_tokens, cap)
    limit = min(r.max_prompt_tokens + r.max_new_tokens, cap)
    cbytes = jnp.dtype(cfg.dtype).itemsize
    decode_rules = merge_rules(engine.DECODE_RULES)
    same_weights = shards == 1 and cbytes == jnp.dtype(cfg.param_dtype).itemsize
    parts = dict(resident)
    if not same_weights:  # the engine prepares a copy (engine.paged_sampler.inference_params)
        parts["inference_weights"] = planner._param_elems(cfg, sizes, decode_rules) * cbytes
    kv_heads = cfg.num_key_value_heads
    if kv_heads % sizes["tensor"] == 0:
        kv_heads //= sizes["tensor"]
    bs, chunk = engine.BLOCK_SIZE, engine.CHUNK_STEPS
    per_block = kv_bytes_per_block(cfg.num_hidden_layers, kv_heads, cfg.head_dim, bs, cbytes)
    local_cfg = cfg.replace(num_key_value_heads=kv_heads)

    def pool(transient):
        left = usable - sum(parts.values()) - transient if usable is not None else 0
        budget = (engine.CPU_KV_BYTES if usable is None else
                  max(int(left * engine.ACCEL_KV_FRACTION), 0))
        return engine.pool_plan(local_cfg, rows, shards, limit, r.max_prompt_tokens, bs, chunk,
                                cfg.dtype, budget, num_slots)

    # The transient: one prefill call (the rows a device admits at once, up to the engine's
    # prefill_rows) or a decode step's gathered weights; then the pool sized from what is left.
    def transient(n_rows):
        n_rows = min(n_rows, engine.prefill_rows(prompt))
        return max(planner.forward_estimate(local, n_rows, prompt, attention, 1),
                   0 if same_weights else gathered)

    parts["transient"] = transient(pool(transient(1))[0])
    per_shard, blocks = pool(0)
    parts["kv_pool"] = blocks * per_block
    parts["buffers"] = per_shard * (chunk * 8 + limit * 4)  # chunk outputs, block tables
    full_rows = (blocks - 1) // -(-(limit - 1) // bs)
    return ProgramPlan(
        "rollout", f"{per_shard} rows per device ({rows} per call over {shards}), KV pool "
        f"{blocks} blocks x {bs} = {blocks * bs} tokens ({full_rows} rows at the full "
        f"{limit} tokens; more wait or are preempted)", parts,
        engine={"rows_per_device": per_shard, "kv_blocks": blocks, "block_size": bs,
                "rows_at_full_length": full_rows})


# ------------------------------------------------------------------------------ output
def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def format_stage_plan(plan: StagePlan) -> str:
    mesh = ",".join(f"{a}={s}" for a, s in plan.mesh.items())
    on = (f"{plan.devices} x {plan.accelerator} ({plan.capacity_bytes / GiB:.1f} GiB, "
          f"{planner.USABLE_FRACTION:.0%} usable = {plan.usable_bytes / GiB:.1f} GiB)"
          if plan.accelerator else f"{plan.devices} devices (no accelerator: no verdict)")
    lines = [f"{plan.config or plan.stage}: stage {plan.stage}, model {plan.model}, mesh {mesh} "
             f"on {on}"]
    for p in plan.programs:
        verdict = "" if p.fits is None else ("  FITS" if p.fits else "  DOES NOT FIT")
        lines.append(f"program {p.name}: {p.shape}")
        for k, v in p.parts.items():
            lines.append(f"  {k:<18}{_gib(v)}")
        lines.append(f"  {'total':<18}{_gib(p.total_bytes)}   largest: {p.largest}{verdict}")
    if plan.fits is not None:
        lines.append("verdict: " + ("every program FITS" if plan.fits else "DOES NOT FIT: "
                                    + ", ".join(p.name for p in plan.programs if not p.fits)))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def main(config: str, stage: Optional[str] = None, accelerator: Optional[str] = None,
         devices: Optional[int] = None, overrides=(), json: bool = False) -> int:
    """`phi-reason plan CONFIG.yaml`: every program of the stage on the config's target."""
    import json as jsonlib
    if not os.path.isfile(config):
        raise RunConfigError(f"plan: config file {config!r} not found")
    stage = stage or detect_stage(config)
    run = load_stage_config(config, stage, overrides)
    plan = plan_stage(run, stage, accelerator, devices, os.path.basename(config))
    print(jsonlib.dumps(plan.to_json()) if json else format_stage_plan(plan))
    return 0
