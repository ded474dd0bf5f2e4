"""The trainer loop that SFT, DPO and RL all run through: steps -> metrics, checkpoints, signals,
resume.

All I/O of training lives here (the steps are pure). A job hands the trainer a `StepSource`: the
TrainState to checkpoint, `step(n)` (one update of SFT/DPO, one whole RL step), its resumable
position (`get_state()` / `set_state()`, JSON-able) and the progress-bar fields. The trainer owns:

- metrics: one JSONL record per logged step (`metrics.jsonl`), TensorBoard (`tb/`), a tqdm bar.
  Metrics are read back one step late so the host never stalls the device queue (a save step
  syncs first); steps that report `tokens` also get tokens/s and estimated MFU;
- checkpoints: an Orbax `CheckpointManager` (async, keep-last-N) under `checkpoints/`, each holding
  the TrainState and the source's position. Saved every `output.save_every` steps, at the end, and
  on SIGTERM / SIGINT (then the run exits cleanly);
- non-finite loss or gradient (`finite` = 0 in a step's metrics): the step never applies such an
  update; the trainer stops with an error naming the step (the last checkpoint is the last good
  state) or, with `train.on_nonfinite=skip`, logs and goes on;
- resume: restores the latest checkpoint and the position and truncates `metrics.jsonl` to it, so a
  preempted-and-resumed run logs exactly what an uninterrupted run logs;
- stopping inside a step: a source with an `interrupt` attribute gets the trainer's agreed stop
  check (`stop_agreed`); at its own safe points it raises `StepInterrupted`, carrying nothing (the
  step's partial work is dropped and the last completed step is saved) or a partial step
  (`pack()` -> arrays + JSON; saved as checkpoint n + 1 marked partial, restored through the
  source's `restore_pending`, and replaced when step n + 1 completes);
- hooks: `hook(trainer, step)` after each step is dispatched (tests inject preemption there).
"""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import jax

from ..config import RunConfig, RunConfigError
from ..errors import RunFailed
from ..files import atomic_write_text
from ..hardware import peak_flops_per_device
from ..model.config import ModelConfig
from ..model.params import param_count
from ..sharding import processes
from .build import say


class StepSource(Protocol):
    state: object  # the TrainState the trainer checkpoints (the source updates it in step())

    def step(self, step: int) -> Optional[dict]: ...  # metrics of step `step`; None: no more data
    def get_state(self): ...
    def set_state(self, state) -> None: ...
    def postfix(self, metrics: dict) -> dict: ...  # progress-bar fields


class StepInterrupted(Exception):
    """Raised by a step source at a safe point inside a step once the processes agreed to stop.
    `partial`: None, or what resuming inside the step needs (`pack() -> (arrays, meta)`)."""

    def __init__(self, partial=None):
        super().__init__("step interrupted at a safe point")
        self.partial = partial


class NonFiniteError(RunFailed):
    """A step produced a non-finite loss or gradient norm (the update was not applied)."""


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 N for the matmul weights (the embedding lookup is not a matmul; a tied head is) plus
    causal attention scores and values: 6 * layers * heads * head_dim * seq (fwd + bwd, halved
    by the causal mask)."""
    n = param_count(cfg)
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6.0 * n + attn


def json_safe(record: dict) -> dict:
    """Non-finite floats as null: metrics.jsonl stays strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


class MetricsLog:
    """metrics.jsonl (+ TensorBoard). On resume, records past the restored step are dropped.
    Only process 0 writes (`enabled`); the others' logs are no-ops."""

    def __init__(self, out: Path, tensorboard: bool, resume_step: Optional[int],
                 enabled: bool = True):
        self.path = out / "metrics.jsonl"
        self._file = self._tb = None
        if not enabled:
            return
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
        if self._file is None:
            return
        self._file.write(json.dumps(json_safe(record)) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class BatchSteps:
    """The SFT / DPO source: one jitted `step_fn(state, batch)` per batch of a resumable iterator
    (`__next__`, `get_state()`, `set_state()`, e.g. `phi_reason.data.pipeline.BatchIterator`).
    `prepare(batch, step)` turns a host batch into step inputs (global arrays, precomputed
    reference log-probs)."""

    def __init__(self, state, step_fn: Callable, data, prepare: Optional[Callable] = None):
        self.state, self.step_fn, self.data = state, step_fn, data
        self.prepare = prepare or (lambda batch, step: batch)

    def step(self, step: int) -> Optional[dict]:
        try:
            batch = next(self.data)
        except StopIteration:
            return None
        self.state, metrics = self.step_fn(self.state, self.prepare(batch, step))
        return metrics

    def get_state(self):
        return self.data.get_state()

    def set_state(self, state) -> None:
        self.data.set_state(state)

    def remap_positions(self, saved: list, count: int, index: int):
        remap = getattr(self.data, "remap_positions", None)
        return None if remap is None else remap(saved, count, index)

    def postfix(self, m: dict) -> dict:
        post = {"loss": f"{m['loss']:.4f}", "tok/s": f"{m['tokens_per_s']:.0f}"}
        if "mfu" in m:
            post["mfu"] = f"{100 * m['mfu']:.1f}%"
        return post


class Trainer:
    """Runs `source` for `total_steps` steps with logging, checkpoints, signals and resume."""

    def __init__(self, run: RunConfig, cfg: ModelConfig, source: StepSource, total_steps: int, *,
                 hooks: Sequence[Callable] = (), seq_len: Optional[int] = None,
                 desc: str = "train"):
        import orbax.checkpoint as ocp

        self.run, self.cfg, self.source = run, cfg, source
        self.total_steps, self.hooks, self.desc = total_steps, list(hooks), desc
        self.out = Path(run.output.dir).absolute()
        self.out.mkdir(parents=True, exist_ok=True)
        self.manager = ocp.CheckpointManager(
            self.out / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=run.output.keep, create=True,
                enable_async_checkpointing=run.output.async_checkpoint))
        self._ocp = ocp
        peak = run.output.peak_flops or peak_flops_per_device()
        self._flops_per_token = train_flops_per_token(cfg, seq_len or run.data.seq_len)
        self._peak_total = peak * jax.device_count() if peak else None
        self.stop_signal: Optional[int] = None  # the signal this process received
        self.stopped = False  # the processes agreed to stop early (a signal reached one of them)
        self.skipped_steps = 0
        self.last_saved: Optional[int] = None

    @property
    def state(self):
        return self.source.state

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int, partial=None) -> None:
        """Checkpoint `step` (completed), or the partial step `step` (what it kept in `partial`).
        A checkpoint already at `step` (the partial one a resumed run started from) is replaced."""
        ocp = self._ocp
        position = self.source.get_state()
        data = {"iterator": position}
        if processes.process_count() > 1:  # each host reads its own share: one position each
            data["per_process"] = [json.loads(t) for t in
                                   processes.gather_texts(json.dumps(position, sort_keys=True))]
        items = {"state": ocp.args.StandardSave(self.source.state.checkpoint_items())}
        if partial is not None:
            arrays, data["partial"] = partial.pack()
            items["partial"] = ocp.args.StandardSave(arrays)
        if step in self.manager.all_steps():
            self.manager.wait_until_finished()
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.Composite(data=ocp.args.JsonSave(data), **items),
                          force=True)
        self.last_saved = step if partial is None else None

    def _own_position(self, data: dict, step: int):
        """This process's data position from a checkpoint written by any number of processes."""
        saved = data.get("per_process") or [data["iterator"]]
        n, me = processes.process_count(), processes.process_index()
        if len(saved) == n:
            return saved[me]
        if getattr(self.source, "position_is_global", False):
            return data["iterator"]
        remap = getattr(self.source, "remap_positions", None)
        position = None if remap is None else remap(saved, n, me)
        if position is not None:
            return position
        raise RunConfigError(
            f"{self.out / 'checkpoints'}: step {step} was written by {len(saved)} process(es), "
            f"this run has {n}; their data positions differ (packed rows or dropped examples "
            f"read a different number of records per host) and cannot be mapped onto {n}: "
            f"resume with {len(saved)} process(es) (the weights restore into any mesh)")

    def restore(self, step: Optional[int] = None) -> int:
        """Restore the latest (or given) checkpoint into the source; returns its step."""
        ocp = self._ocp
        step = self.manager.latest_step() if step is None else step
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                          self.source.state.checkpoint_items())
        got = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        position = self._own_position(got["data"], step)
        self.source.state = self.source.state.with_checkpoint_items(got["state"])
        self.source.set_state(position)
        self.last_saved = step
        meta = got["data"].get("partial")
        if meta is not None:  # stopped inside step `step`: the source finishes it first
            target = self.source.pending_target(meta)
            arrays = self.manager.restore(step, args=ocp.args.Composite(
                partial=ocp.args.StandardRestore(target)))["partial"]
            self.source.restore_pending(arrays, meta)
            self.last_saved, step = None, step - 1
        return step

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame):
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_signal = signum

    def stop_agreed(self) -> bool:
        """Whether the processes agreed to stop (a signal reached one of them). A collective
        under several processes: every process must ask at the same points."""
        if not self.stopped:
            self.stopped = processes.any_process(self.stop_signal is not None)
        return self.stopped

    def _signal_name(self) -> str:
        return (signal.Signals(self.stop_signal).name if self.stop_signal
                else "a signal to another process")

    def _start(self, resume: bool) -> int:
        latest = self.manager.latest_step()
        if resume and latest is not None:
            start = self.restore(latest)
            say(f"resumed from {self.out / 'checkpoints'} at step {start}")
            return start
        if latest is not None:
            raise RunConfigError(
                f"{self.out}: already holds checkpoints (latest step {latest}); pass --resume "
                "to continue that run or choose a new output.dir")
        if resume:
            say(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting at step 0")
        return 0

    # ------------------------------------------------------------------ main loop
    def train(self, resume: bool = False) -> int:
        """Run to `total_steps` (or the end of the data). Returns the last completed step."""
        start = self._start(resume)
        lead = processes.is_lead()
        log = MetricsLog(self.out, self.run.output.tensorboard, start if resume else None, lead)
        bar = None
        if self.run.output.progress and lead:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=start, dynamic_ncols=True,
                       desc=self.desc, file=sys.stderr)
        # Signals can only be caught on the main thread; elsewhere the caller owns them.
        on_main = threading.current_thread() is threading.main_thread()
        old_handlers = {s: signal.signal(s, self._on_signal)
                        for s in ((signal.SIGTERM, signal.SIGINT) if on_main else ())}
        step = start
        pending = None
        self._clock = time.perf_counter()
        if hasattr(self.source, "interrupt"):
            self.source.interrupt = self.stop_agreed
        try:
            while step < self.total_steps:
                try:
                    metrics = self.source.step(step + 1)
                except StepInterrupted as inside:
                    if pending is not None:
                        self._record(pending, log, bar)
                        pending = None
                    if inside.partial is not None:
                        self.save(step + 1, inside.partial)
                        saved = f"partial step {step + 1}"
                    else:
                        if self.last_saved != step:
                            self.save(step)
                        saved = f"step {step}"
                    kept = getattr(inside.partial, "kept", "the partial work is redone on resume")
                    say(f"\n{self._signal_name()} inside step {step + 1}: saved checkpoint "
                        f"({saved}; {kept}); exiting")
                    break
                if metrics is None:
                    break
                step += 1
                if pending is not None:
                    self._record(pending, log, bar)
                pending = (step, metrics)
                for hook in self.hooks:
                    hook(self, step)
                # a signal may reach the processes at different steps: they agree on stopping
                stop = self.stop_agreed()
                if stop or step % self.run.output.save_every == 0 or step == self.total_steps:
                    self._record(pending, log, bar)
                    pending = None
                    self.save(step)
                if stop:
                    say(f"\n{self._signal_name()}: saved checkpoint at step {step}; exiting")
                    break
            if pending is not None:
                self._record(pending, log, bar)
            if self.last_saved != step and not self.stopped:
                self.save(step)
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
        m = {k: v if isinstance(v, (int, float)) else float(v)
             for k, v in jax.device_get(metrics).items()}
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
            say(f"\nstep {step}: non-finite ({detail}); update skipped")
            m["skipped"] = 1.0
        if "tokens" in m:
            m["tokens_per_s"] = m["tokens"] / dt if dt > 0 else 0.0
            if self._peak_total:
                m["mfu"] = m["tokens_per_s"] * self._flops_per_token / self._peak_total
            m["step_time_s"] = dt
        if step % self.run.output.log_every == 0 or step == self.total_steps or not finite:
            log.write({"step": step, **m})
        if bar is not None:
            bar.set_postfix(self.source.postfix(m), refresh=False)
            bar.update(step - bar.n)
