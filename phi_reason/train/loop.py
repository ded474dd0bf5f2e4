"""The trainer: data -> jitted step -> metrics, checkpoints, signals, resume.

All I/O of training lives here (the steps are pure). One `Trainer` serves SFT and DPO (and the RL
loop reuses its pieces):

- data: any iterator with `__next__`, `get_state()` and `set_state(state)` (JSON-able state), e.g.
  `phi_reason.data.pipeline.BatchIterator`;
- metrics: one JSONL record per step (`metrics.jsonl`), TensorBoard (`tb/`), a tqdm bar with
  loss, tokens/s and estimated MFU. Metrics are read back one step late so the host never stalls
  the device queue (a save step syncs first);
- checkpoints: an Orbax `CheckpointManager` (async, keep-last-N) under `checkpoints/`, each holding
  params, optimizer state, step, RNG and the data iterator state. Saved every
  `output.save_every` steps, at the end, and on SIGTERM / SIGINT (then the run exits cleanly);
- non-finite loss or gradient: the step never applies such an update; the trainer stops with an
  error naming the step (nothing more is saved, so the last checkpoint is the last good state) or,
  with `train.on_nonfinite=skip`, logs and goes on;
- resume: restores the latest checkpoint and the data position and truncates `metrics.jsonl` to
  it, so a preempted-and-resumed run logs exactly what an uninterrupted run logs.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import RunConfig, RunConfigError, dump_run_config, load_run_config
from ..files import atomic_open, atomic_write_text
from ..model.config import ModelConfig
from ..model.params import init_params, param_count


class DataIterator(Protocol):
    def __next__(self) -> dict: ...
    def get_state(self): ...
    def set_state(self, state) -> None: ...


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient norm (the update was not applied)."""


# Dense bf16 peak FLOP/s per device, for the MFU estimate (CPU and unknown devices: no MFU).
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "v4": 275e12,
              "v5 lite": 197e12, "v5e": 197e12, "v5p": 459e12, "v6": 918e12}


def peak_flops_per_device(device=None) -> Optional[float]:
    kind = (device or jax.devices()[0]).device_kind.lower()
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 N for the matmul weights (the embedding lookup is not a matmul; a tied head is) plus
    causal attention scores and values: 6 * layers * heads * head_dim * seq (fwd + bwd, halved
    by the causal mask)."""
    n = param_count(cfg)
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6.0 * n + attn


class MetricsLog:
    """metrics.jsonl (+ TensorBoard). On resume, records past the restored step are dropped."""

    def __init__(self, out: Path, tensorboard: bool, resume_step: Optional[int]):
        self.path = out / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(out / "tb"))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Trainer:
    """Runs `step_fn` over `data` for `total_steps` updates with logging and checkpoints.

    `prepare(batch, step)` (optional) turns a host batch into step inputs (device placement,
    precomputed reference log-probs). `hooks` are called as `hook(trainer, step)` after each
    step is dispatched (tests use them to inject preemption)."""

    def __init__(self, run: RunConfig, cfg: ModelConfig, state, step_fn: Callable,
                 data: DataIterator, total_steps: int, *, prepare: Optional[Callable] = None,
                 hooks: Sequence[Callable] = (), seq_len: Optional[int] = None):
        import orbax.checkpoint as ocp

        self.run, self.cfg, self.state, self.step_fn, self.data = run, cfg, state, step_fn, data
        self.total_steps = total_steps
        self.prepare = prepare or (lambda batch, step: batch)
        self.hooks = list(hooks)
        self.out = Path(run.output.dir).absolute()
        self.out.mkdir(parents=True, exist_ok=True)
        self.manager = ocp.CheckpointManager(
            self.out / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=run.output.keep, create=True,
                enable_async_checkpointing=run.output.async_checkpoint))
        self._ocp = ocp
        seq = seq_len or run.data.seq_len
        peak = run.output.peak_flops or peak_flops_per_device()
        self._flops_per_token = train_flops_per_token(cfg, seq)
        self._peak_total = peak * jax.device_count() if peak else None
        self._stop_signal: Optional[int] = None
        self.skipped_steps = 0
        self.last_saved: Optional[int] = None

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int, data_state) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state.checkpoint_items()),
            data=ocp.args.JsonSave({"iterator": data_state})), force=True)
        self.last_saved = step

    def restore(self, step: Optional[int] = None) -> int:
        """Restore the latest (or given) checkpoint into this trainer; returns its step."""
        ocp = self._ocp
        step = self.manager.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                          self.state.checkpoint_items())
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        self.state = self.state.with_checkpoint_items(got["state"])
        self.data.set_state(got["data"]["iterator"])
        self.last_saved = step
        return step

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame):
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._stop_signal = signum

    # ------------------------------------------------------------------ main loop
    def train(self, resume: bool = False) -> int:
        """Run to `total_steps` (or the end of the data). Returns the last completed step."""
        latest = self.manager.latest_step()
        start = 0
        if resume and latest is not None:
            start = self.restore(latest)
            print(f"resumed from {self.out / 'checkpoints'} at step {start}", file=sys.stderr)
        elif latest is not None:
            raise RunConfigError(
                f"{self.out}: already holds checkpoints (latest step {latest}); pass --resume "
                "to continue that run or choose a new output.dir")
        elif resume:
            print(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting at step 0",
                  file=sys.stderr)
        log = MetricsLog(self.out, self.run.output.tensorboard, start if resume else None)
        bar = None
        if self.run.output.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=start, dynamic_ncols=True,
                       desc="train", file=sys.stderr)
        # Signals can only be caught on the main thread; elsewhere the caller owns them.
        on_main = threading.current_thread() is threading.main_thread()
        old_handlers = {s: signal.signal(s, self._on_signal)
                        for s in ((signal.SIGTERM, signal.SIGINT) if on_main else ())}
        step = start
        pending = None
        self._clock = time.perf_counter()
        try:
            while step < self.total_steps:
                try:
                    host_batch = next(self.data)
                except StopIteration:
                    break
                data_state = self.data.get_state()
                step += 1
                self.state, metrics = self.step_fn(self.state, self.prepare(host_batch, step))
                if pending is not None:
                    self._record(pending, log, bar)
                pending = (step, metrics)
                for hook in self.hooks:
                    hook(self, step)
                stop = self._stop_signal is not None
                if stop or step % self.run.output.save_every == 0 or step == self.total_steps:
                    self._record(pending, log, bar)
                    pending = None
                    self.save(step, data_state)
                if stop:
                    name = signal.Signals(self._stop_signal).name
                    print(f"\n{name}: saved checkpoint at step {step}; exiting", file=sys.stderr)
                    break
            if pending is not None:
                self._record(pending, log, bar)
            if self.last_saved != step and self._stop_signal is None:
                self.save(step, self.data.get_state())
        finally:
            self.manager.wait_until_finished()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            log.close()
            if bar is not None:
                bar.close()
        return step

    def _record(self, pending, log: MetricsLog, bar) -> None:
        step, metrics = pending
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt, self._clock = now - self._clock, now
        finite = m.pop("finite", 1.0) > 0
        if not finite:
            detail = f"loss={m.get('loss')}, grad_norm={m.get('grad_norm')}"
            if self.run.train.on_nonfinite == "stop":
                where = (f"the last checkpoint is step {self.last_saved} in "
                         f"{self.out / 'checkpoints'}" if self.last_saved is not None
                         else "no checkpoint was saved yet")
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {step} ({detail}); the update was not "
                    f"applied and the run stops; {where}. Set train.on_nonfinite=skip to skip "
                    "such steps instead.")
            self.skipped_steps += 1
            print(f"\nstep {step}: non-finite ({detail}); update skipped", file=sys.stderr)
            m["skipped"] = 1.0
        tokens = m.get("tokens", 0.0)
        m["tokens_per_s"] = tokens / dt if dt > 0 else 0.0
        if self._peak_total:
            m["mfu"] = m["tokens_per_s"] * self._flops_per_token / self._peak_total
        m["step_time_s"] = dt
        if step % self.run.output.log_every == 0 or not finite:
            log.write({"step": step, **m})
        if bar is not None:
            post = {"loss": f"{m['loss']:.4f}", "tok/s": f"{m['tokens_per_s']:.0f}"}
            if "mfu" in m:
                post["mfu"] = f"{100 * m['mfu']:.1f}%"
            bar.set_postfix(post, refresh=False)
            bar.update(step - bar.n)


# ---------------------------------------------------------------------------- building a run
def build_mesh(run: RunConfig):
    if not run.mesh.enabled:
        return None
    from ..sharding.mesh import initialize_distributed, mesh_from_config
    # Multi-host jobs (SLURM, TPU pods, explicit JAX_COORDINATOR_ADDRESS): start the runtime
    # before the mesh asks for the global device list; a no-op on one process.
    initialize_distributed()
    return mesh_from_config(run.mesh)


def build_model(run: RunConfig, mesh=None):
    """(cfg, params): from `model.path` (HF or Orbax dir), else a random init of the preset."""
    m = run.model
    if m.path:
        from ..checkpoint import load_pretrained
        cfg, params = load_pretrained(m.path, dtype=m.param_dtype, mesh=mesh)
        runtime = {k: v for k, v in m.runtime_fields().items() if k in (
            "param_dtype", "dtype", "remat", "attention", "scan_layers", "attention_chunk")}
        arch = set(m.overrides) - set(runtime)
        if arch:
            raise RunConfigError(f"model.overrides: {sorted(arch)} change the architecture of the "
                                 f"checkpoint at model.path {m.path!r}; only runtime fields apply")
        return cfg.replace(**runtime), params
    cfg = m.build()
    key = jax.random.PRNGKey(m.init_seed)
    if mesh is not None:
        from ..sharding.init import sharded_init
        return cfg, sharded_init(cfg, key, mesh)
    return cfg, init_params(cfg, key)


def _records(run: RunConfig, schema: str):
    """Training records: data.train_files, or synthetic verifiable math when data.synthetic."""
    d = run.data
    if d.train_files:
        from ..data.sources import load_records
        return load_records(d.train_files, d.schema or schema, d.skip_bad_records).records
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
    records = _records(run, "chat" if kind == "sft" else "dpo")
    tok = load_tokenizer(d.tokenizer)
    common = dict(seq_len=d.seq_len, batch_size=run.train.batch_size, seed=d.seed,
                  shuffle=d.shuffle, num_epochs=d.epochs, length_policy=d.length_policy,
                  workers=d.workers, drop_remainder=True)
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


def _setup(run: RunConfig, kind: str):
    mesh = build_mesh(run)
    cfg, params = build_model(run, mesh)
    data, n_records = build_data(run, kind)
    total = resolve_total_steps(run, n_records)
    train_cfg = dataclasses.replace(run.train, steps=total)
    out = Path(run.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_run_config(run, str(out / "config.yaml"))
    return mesh, cfg, params, data, total, train_cfg


def _new_state(cfg, train_cfg, params, mesh, ref_params=None):
    from .optim import make_optimizer
    from .state import TrainState

    optimizer, _ = make_optimizer(train_cfg, cfg)
    if mesh is None:
        return TrainState.create(params, optimizer, train_cfg.seed, ref_params)
    from ..sharding.init import sharded_opt_init
    from ..sharding.rules import param_shardings
    opt_state = sharded_opt_init(optimizer, params, param_shardings(cfg, mesh), mesh)
    return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                      rng=jax.random.PRNGKey(train_cfg.seed), ref_params=ref_params)


def _finish(trainer: Trainer, cfg: ModelConfig) -> None:
    """Export the final weights as an Orbax model dir (`final/`) the next stage can load."""
    from ..checkpoint import save_pretrained
    save_pretrained(cfg, trainer.state.params, str(trainer.out / "final"), format="orbax",
                    overwrite=True)


def _user_errors() -> tuple:
    """Errors caused by the run's inputs (config, data files): reported in one line, exit 2."""
    from ..model.config import ConfigError
    errors = [RunConfigError, ConfigError]
    try:
        from ..data.sources import DataError
        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def _run(trainer_factory, resume: bool) -> int:
    try:
        trainer, cfg = trainer_factory()
        step = trainer.train(resume=resume)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if trainer._stop_signal is None:
        _finish(trainer, cfg)
        print(f"done: {step} steps; checkpoints in {trainer.out / 'checkpoints'}, "
              f"weights in {trainer.out / 'final'}", file=sys.stderr)
    return 0


def run_sft(config: Optional[str], overrides: Sequence[str] = (), resume: bool = False,
            hooks: Sequence[Callable] = ()) -> int:
    """`phi-reason sft CONFIG [k=v ...] [--resume]`. Returns the process exit code."""
    from .steps import make_sft_step

    try:
        run = load_run_config(config, overrides)
    except RunConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def factory():
        mesh, cfg, params, it, total, train_cfg = _setup(run, "sft")
        state = _new_state(cfg, train_cfg, params, mesh)
        step_fn = make_sft_step(cfg, train_cfg, mesh)
        return Trainer(run, cfg, state, step_fn, it, total,
                       prepare=lambda b, s: place_batch(b, mesh), hooks=hooks), cfg

    return _run(factory, resume)


def precompute_reference_logps(ref_fn, params, data: DataIterator, steps: int, prepare):
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
    """`phi-reason dpo CONFIG [k=v ...] [--resume]`: the init model is the reference."""
    from .steps import make_dpo_step, make_reference_logps_fn

    try:
        run = load_run_config(config, overrides)
    except RunConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def factory():
        mesh, cfg, params, it, total, train_cfg = _setup(run, "dpo")
        place = lambda b, s: place_batch(b, mesh)  # noqa: E731
        prepare = place
        ref_params = None
        if train_cfg.dpo.reference == "params":
            ref_params = jax.tree_util.tree_map(jnp.copy, params)  # own buffers (donation)
        else:
            cache = Path(run.output.dir) / "reference_logps.npz"
            if resume and cache.exists():
                with np.load(cache) as z:
                    chosen, rejected = z["chosen"], z["rejected"]
            else:
                ref_fn = make_reference_logps_fn(cfg, mesh)
                chosen, rejected = precompute_reference_logps(ref_fn, params, it, total, place)
                with atomic_open(cache, "wb") as f:
                    np.savez(f, chosen=chosen, rejected=rejected)

            def prepare(batch, step):
                batch = dict(batch, chosen_ref_logps=chosen[step - 1],
                             rejected_ref_logps=rejected[step - 1])
                return place(batch, step)

        state = _new_state(cfg, train_cfg, params, mesh, ref_params)
        step_fn = make_dpo_step(cfg, train_cfg, mesh)
        return Trainer(run, cfg, state, step_fn, it, total, prepare=prepare, hooks=hooks), cfg

    return _run(factory, resume)
