"""Setting up a run, shared by every job: mesh, model, records and batches, the train state, the
final export, and which errors are the user's (reported in one line, exit status 2)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..config import RunConfig, RunConfigError, dump_run_config
from ..model.config import ModelConfig
from ..model.params import init_params
from ..sharding import processes


def build_mesh(run: RunConfig):
    if not run.mesh.enabled:
        return None
    from ..sharding.mesh import initialize_distributed, mesh_from_config
    # Multi-host jobs (SLURM, TPU pods, explicit JAX_COORDINATOR_ADDRESS): start the runtime
    # before the mesh asks for the global device list; a no-op on one process.
    initialize_distributed()
    return mesh_from_config(run.mesh)


def job_mesh(spec: Optional[str] = None):
    """For commands without a run config (eval, generate): the mesh `spec` names ('data=4,tensor=2';
    unnamed axes 1, `fsdp` the rest), else every device of the job when there are several
    processes or accelerators (`fsdp` over all: decoding shards rows over it), else one device."""
    from ..sharding.mesh import initialize_distributed, mesh_from_config, parse_mesh
    initialize_distributed()
    if spec:
        return mesh_from_config(parse_mesh(spec))
    if processes.process_count() > 1 or (jax.default_backend() != "cpu"
                                         and jax.device_count() > 1):
        return mesh_from_config({})
    return None


def load_inference_model(model, dtype: str = "auto", mesh=None):
    """(cfg, params) of a checkpoint for sampling: weights and compute in `dtype` ('auto': the
    stored dtype, bf16 for the released Phi-4 checkpoints), loaded straight into the decode
    layout on a mesh (replicated over the batch axes, split over `tensor`)."""
    from ..checkpoint import detect_format, load_pretrained
    from ..engine.paged_sampler import DECODE_RULES

    detect_format(model)  # a missing or unreadable --model is named before anything loads
    cfg, params = load_pretrained(model, dtype=None if dtype == "auto" else dtype, mesh=mesh,
                                  rules=DECODE_RULES if mesh is not None else None)
    return cfg.replace(dtype=cfg.param_dtype), params


RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "attention", "scan_layers", "attention_chunk")
# Context extension changes no weight: Phi-4-reasoning is Phi-4 trained at 32K with RoPE theta
# 500K (PHI4_FACTS 1), so these may override a checkpoint's config.
CONTEXT_FIELDS = ("rope_theta", "max_position_embeddings", "original_max_position_embeddings")


def check_context(cfg, seq_len: int, what: str = "data.seq_len") -> None:
    """Rows longer than the model's positions would run RoPE past what it was configured for."""
    if seq_len > cfg.max_position_embeddings:
        raise RunConfigError(
            f"{what} {seq_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}; to extend the context set "
            f"model.overrides.max_position_embeddings (and rope_theta, as Phi-4-reasoning does)")


def build_model(run: RunConfig, mesh=None):
    """(cfg, params): from `model.path` (HF or Orbax dir), else a random init of the preset."""
    m = run.model
    if m.path:
        from ..checkpoint import load_pretrained
        cfg, params = load_pretrained(m.path, dtype=m.param_dtype, mesh=mesh)
        runtime = {k: v for k, v in m.runtime_fields().items() if k in RUNTIME_FIELDS
                   or k in CONTEXT_FIELDS}
        arch = set(m.overrides) - set(runtime)
        if arch:
            raise RunConfigError(f"model.overrides: {sorted(arch)} change the architecture of the "
                                 f"checkpoint at model.path {m.path!r}; only runtime and context-"
                                 f"length fields ({', '.join(CONTEXT_FIELDS)}) apply")
        return cfg.replace(**runtime), params
    cfg = m.build()
    key = jax.random.PRNGKey(m.init_seed)
    if mesh is not None:
        from ..model.sharded import sharded_init
        return cfg, sharded_init(cfg, key, mesh)
    return cfg, init_params(cfg, key)


def training_records(run: RunConfig, schema: str):
    """Training records: data.train_files, or synthetic verifiable math when data.synthetic."""
    d = run.data
    if d.train_files:
        # Indexed, not loaded: each host reads only the records of its share of the stream.
        from ..data.sources import index_records
        return index_records(d.train_files, d.schema or schema, d.skip_bad_records)
    if d.synthetic is not None:
        from ..data.synthetic import make_problems
        problems = make_problems(**d.synthetic)
        if schema == "chat":
            return [{"messages": [{"role": "user", "content": p["problem"]},
                                  {"role": "assistant", "content": p["solution"]}]}
                    for p in problems]
        # Preference pairs: chosen = the correct solution; rejected = the same solution ending
        # in the next problem's (different) answer.
        pairs = []
        for p, q in zip(problems, problems[1:] + problems[:1]):
            good = "\\boxed{" + str(p["answer"]) + "}"
            bad = "\\boxed{" + str(q["answer"]) + "}"
            if good in p["solution"] and str(q["answer"]) != str(p["answer"]):
                pairs.append({"prompt": p["problem"], "chosen": p["solution"],
                              "rejected": p["solution"].replace(good, bad)})
        return pairs
    raise RunConfigError("data: set data.train_files (or data.synthetic)")


def build_data(run: RunConfig, kind: str):
    """(iterator, number of records) for kind "sft" or "dpo"."""
    from ..data.pipeline import dpo_batches, sft_batches
    from ..data.tokenizer import load_tokenizer

    d = run.data
    records = training_records(run, "chat" if kind == "sft" else "dpo")
    tok = load_tokenizer(d.tokenizer)
    # Several processes: every host assembles the global batches from the examples the hosts
    # exchange (each reads only its share), so batches and positions do not depend on the count.
    exchange = processes.exchange_objects if processes.process_count() > 1 else None
    if exchange is not None and d.workers > 0:
        raise RunConfigError(f"data.workers={d.workers}: with several processes the hosts "
                             "exchange examples in the training loop's thread; set data.workers=0")
    common = dict(seq_len=d.seq_len, batch_size=run.train.batch_size, seed=d.seed,
                  shuffle=d.shuffle, num_epochs=d.epochs, length_policy=d.length_policy,
                  workers=d.workers, drop_remainder=True, exchange=exchange)
    if kind == "sft":
        it = sft_batches(records, tok, d.chat_format, packed=d.packed, **common)
    else:
        it = dpo_batches(records, tok, d.chat_format, **common)
    return it, len(records)


def resolve_total_steps(run: RunConfig, n_records: int) -> int:
    t = run.train
    if t.steps is not None:
        return t.steps
    if run.data.epochs is None:
        raise RunConfigError("train.steps: required when data.epochs is not set")
    if run.data.packed:
        raise RunConfigError("train.steps: required for packed data (the number of packed rows "
                             "is not known before packing)")
    return max(1, (n_records * run.data.epochs) // t.batch_size)


def place_batch(batch: dict, mesh) -> dict:
    """Host numpy batch -> step inputs: as is without a mesh, else global arrays laid out over
    the batch mesh axes (each host contributes its rows)."""
    if mesh is None:
        return batch
    from ..train.steps import batch_shardings
    sh = batch_shardings(batch, mesh)
    return {k: jax.make_array_from_process_local_data(sh[k], np.asarray(v))
            for k, v in batch.items()}


def place_global(value: np.ndarray, sharding) -> jax.Array:
    """A global array from a value every process holds whole (e.g. precomputed per-row numbers
    of the global batch): each process fills only its addressable shards."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def place_global_batch(batch: dict, mesh) -> dict:
    """A batch every process holds whole (RL minibatches: each process ran the same rollouts) ->
    global arrays over the batch mesh axes; as is without a mesh."""
    if mesh is None:
        return batch
    from ..train.steps import batch_shardings
    shardings = batch_shardings(batch, mesh)
    return {k: place_global(v, shardings[k]) for k, v in batch.items()}


def setup_run(run: RunConfig, kind: str):
    mesh = build_mesh(run)
    cfg, params = build_model(run, mesh)
    check_context(cfg, run.data.seq_len)
    data, n_records = build_data(run, kind)
    total = resolve_total_steps(run, n_records)
    train_cfg = dataclasses.replace(run.train, steps=total)
    publish_config(run, Path(run.output.dir) / "config.yaml")
    return mesh, cfg, params, data, total, train_cfg


def new_train_state(cfg, train_cfg, params, mesh, ref_params=None):
    from ..train.optim import make_optimizer
    from ..train.state import TrainState

    optimizer, _ = make_optimizer(train_cfg, cfg)
    if mesh is None:
        return TrainState.create(params, optimizer, train_cfg.seed, ref_params)
    from ..model.sharded import param_shardings
    from ..sharding.init import sharded_opt_init
    opt_state = sharded_opt_init(optimizer, params, param_shardings(cfg, mesh), mesh)
    return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                      rng=jax.random.PRNGKey(train_cfg.seed), ref_params=ref_params)


def export_final(out: Path, cfg: ModelConfig, params) -> None:
    """Export the final weights as an Orbax model dir (`final/`) the next stage can load."""
    from ..checkpoint import save_pretrained
    save_pretrained(cfg, params, str(Path(out) / "final"), format="orbax", overwrite=True)


def publish_config(run, path: Path) -> None:
    """The run's resolved config beside its outputs, written once (process 0)."""
    if processes.is_lead():
        path.parent.mkdir(parents=True, exist_ok=True)
        dump_run_config(run, str(path))


def say(message: str) -> None:
    """A progress line on stderr, from process 0 only."""
    if processes.is_lead():
        print(message, file=sys.stderr)


def finish_run(trainer, cfg: ModelConfig, step: int) -> None:
    """After `trainer.train`: export `final/` (collectively) unless a signal stopped the run."""
    if not trainer.stopped:
        export_final(trainer.out, cfg, trainer.state.params)
        say(f"done: {step} steps; checkpoints in {trainer.out / 'checkpoints'}, "
            f"weights in {trainer.out / 'final'}")
