"""RL runs: `phi-reason rl CONFIG` and `train_rl(config, ...)` for in-memory configs.

`train_rl` builds the model, tokenizer, prompts and grader pool, then drives `RLLoop` (rl_loop.py)
step by step with the trainer's machinery (loop.py): its Orbax CheckpointManager (the RL step,
prompt-stream position and retired prompts travel as the checkpoint's iterator state), its
metrics log (metrics.jsonl + TensorBoard), a tqdm bar and its SIGTERM/SIGINT handling (save, then
exit cleanly). `--resume` continues from the latest checkpoint exactly where the run stopped.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from .rl_config import RLRunConfig
from .rl_loop import (RLLoop, decode_completion, evaluate_policy, fold_temperature,  # noqa: F401
                      rollout_metrics, submit_grading)

class _RLProgress:
    """The trainer's checkpoints carry a data-iterator state; for RL it is the RL step, the prompt
    stream position and the retired prompts (the temperature follows from the step)."""

    def __init__(self, loop: RLLoop):
        self.loop = loop

    def get_state(self) -> dict:
        return self.loop.extra_state()

    def set_state(self, state: dict) -> None:
        self.loop.load_extra_state(state)

    def __next__(self):  # the trainer's own train() is not used for RL
        raise TypeError("RL progress is not a batch iterator")


@dataclasses.dataclass
class RLResult:
    params: object
    steps: int  # RL steps completed
    history: list  # per-step metric records (this process)
    eval: dict  # last held-out evaluation (empty without held-out prompts)
    out: Path


def _json_safe(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def build_rl_prompts(run: RLRunConfig, tokenizer) -> tuple:
    """(train prompts, held-out prompts) from data.train_files (schema "rl") or data.synthetic."""
    from ..config import RunConfigError
    from .rl_prompts import prompts_from_records, synthetic_prompts

    d, rl = run.data, run.rl
    if d.train_files:
        from ..data.sources import load_records
        recs = load_records(d.train_files, d.schema or "rl", d.skip_bad_records)
        prompts, skipped = prompts_from_records(recs.records, recs.where, tokenizer,
                                                d.chat_format, rl.max_prompt_tokens)
        if skipped:
            print(f"rl: skipped {skipped} prompts longer than rl.max_prompt_tokens="
                  f"{rl.max_prompt_tokens}", file=sys.stderr)
        return prompts, []
    if d.synthetic is not None:
        return synthetic_prompts(d.synthetic, tokenizer, d.chat_format, rl.max_prompt_tokens,
                                 rl.eval_problems)
    raise RunConfigError("data: set data.train_files (RL records: prompt + answer) or "
                         "data.synthetic")


def train_rl(run: RLRunConfig, *, model=None, tokenizer=None, prompts=None, eval_prompts=None,
             resume: bool = False, hooks: Sequence[Callable] = ()) -> RLResult:
    """Run the RL loop described by an in-memory config. `model` = (ModelConfig, params) and
    `prompts` / `eval_prompts` (lists of `Prompt`) override what the config would load; hooks are
    called as hook(loop, step) after each RL step (tests inject preemption there)."""
    from ..config import RunConfigError, dump_run_config
    from ..data.chat import stop_ids as format_stop_ids
    from ..data.tokenizer import load_tokenizer
    from ..eval.pool import GraderPool
    from .loop import MetricsLog, Trainer, _finish, build_mesh, build_model

    run.validate()
    rl = run.rl
    mesh = build_mesh(run)
    cfg, params = model if model is not None else build_model(run, mesh)
    tok = tokenizer or load_tokenizer(run.data.tokenizer)
    if prompts is None:
        prompts, loaded_eval = build_rl_prompts(run, tok)
        eval_prompts = loaded_eval if eval_prompts is None else eval_prompts
    eval_prompts = list(eval_prompts or [])
    out = Path(run.output.dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    dump_run_config(run, str(out / "config.yaml"))
    history: list = []
    last_eval: dict = {}
    with GraderPool(rl.grader_workers, rl.grader_timeout) as pool:
        loop = RLLoop(run, cfg, params, tok, prompts, format_stop_ids(run.data.chat_format, tok),
                      pool, mesh=mesh)
        trainer = Trainer(run, cfg, loop.state, loop.pg_step, _RLProgress(loop), rl.steps,
                          seq_len=rl.max_prompt_tokens + rl.max_new_tokens)
        latest = trainer.manager.latest_step()
        if resume and latest is not None:
            trainer.restore(latest)
            loop.state = trainer.state
            print(f"resumed RL from {out / 'checkpoints'} at step {latest}", file=sys.stderr)
        elif latest is not None:
            raise RunConfigError(f"{out}: already holds checkpoints (latest step {latest}); pass "
                                 "--resume to continue that run or choose a new output.dir")
        log = MetricsLog(out, run.output.tensorboard, loop.step_index if resume else None)
        bar = None
        if run.output.progress:
            from tqdm import tqdm
            bar = tqdm(total=rl.steps, initial=loop.step_index, desc="rl", file=sys.stderr,
                       dynamic_ncols=True)
        old = {s: signal.signal(s, trainer._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

        def save():
            trainer.state = loop.state
            trainer.save(loop.step_index, loop.extra_state())

        try:
            while loop.step_index < rl.steps:
                metrics = loop.step()
                step = loop.step_index
                last = step == rl.steps
                if eval_prompts and ((rl.eval_every and step % rl.eval_every == 0) or last):
                    last_eval = loop.evaluate(eval_prompts)
                    metrics.update(last_eval)
                record = _json_safe({"step": step, **metrics})
                history.append(record)
                if step % run.output.log_every == 0 or last:
                    log.write(record)
                if bar is not None:
                    bar.set_postfix({"reward": f"{metrics['rollout/reward_mean']:.3f}",
                                     "acc": f"{metrics['rollout/accuracy']:.3f}"}, refresh=False)
                    bar.update(step - bar.n)
                for hook in hooks:
                    hook(loop, step)
                stop = trainer._stop_signal is not None
                if stop or step % run.output.save_every == 0 or last:
                    save()
                if stop:
                    print(f"\n{signal.Signals(trainer._stop_signal).name}: saved RL checkpoint at "
                          f"step {step}; exiting", file=sys.stderr)
                    break
        finally:
            trainer.manager.wait_until_finished()
            for s, h in old.items():
                signal.signal(s, h)
            log.close()
            if bar is not None:
                bar.close()
        if trainer._stop_signal is None:
            trainer.state = loop.state
            _finish(trainer, cfg)
    return RLResult(loop.state.params, loop.step_index, history, last_eval, out)


def run_rl(config, overrides: Sequence[str] = (), resume: bool = False,
           hooks: Sequence[Callable] = ()) -> int:
    """`phi-reason rl CONFIG [k=v ...] [--resume]`; `config` may also be an RLRunConfig."""
    from .rl_config import load_rl_config

    if isinstance(config, RLRunConfig):
        run = config
        if overrides:
            raise ValueError("overrides apply to YAML configs; edit the RLRunConfig instead")
    else:
        run = load_rl_config(config, overrides)
    result = train_rl(run, resume=resume, hooks=hooks)
    print(f"done: {result.steps} RL steps; outputs in {result.out}", file=sys.stderr)
    return 0
