"""RL runs: `phi-reason rl CONFIG` and `train_rl(config, ...)` for in-memory configs.

`train_rl` builds the model, tokenizer, prompts and grader pool, then runs `RLLoop` (rl_loop.py) one
RL step per trainer step through the shared trainer loop (trainer.py): its Orbax checkpoints (the RL
step, prompt-stream position and retired prompts travel as the source's position), metrics log,
progress bar and SIGTERM/SIGINT handling (save, then exit cleanly; inside a step at the loop's safe
points, see rl_loop.py). `--resume` continues from the latest checkpoint exactly where the run
stopped.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from .rl_config import RLRunConfig
from .rl_loop import RLLoop
from .rl_pending import PendingUpdate
from .trainer import Trainer, json_safe


@dataclasses.dataclass
class RLResult:
    params: object
    steps: int  # RL steps completed
    history: list  # per-step metric records (this process)
    eval: dict  # last held-out evaluation (empty without held-out prompts)
    out: Path


class RLSteps:
    """The trainer's step source for RL: one RL step (rollouts, grading, updates) per trainer step,
    plus the held-out evaluation every `rl.eval_every` steps and at the last step."""

    position_is_global = True  # every process runs the same scheduler on the same prompt stream

    def __init__(self, loop: RLLoop, eval_prompts: Sequence, total_steps: int):
        self.loop, self.eval_prompts, self.total_steps = loop, list(eval_prompts), total_steps
        self.history: list = []
        self.last_eval: dict = {}

    @property
    def state(self):
        return self.loop.state

    @state.setter
    def state(self, value):
        self.loop.state = value

    def step(self, step: int) -> dict:
        metrics = self.loop.step()
        every = self.loop.rl.eval_every
        if self.eval_prompts and ((every and step % every == 0) or step == self.total_steps):
            self.last_eval = self.loop.evaluate(self.eval_prompts)
            metrics.update(self.last_eval)
        self.history.append(json_safe({"step": step, **metrics}))
        return metrics

    @property
    def interrupt(self):
        return self.loop.interrupt

    @interrupt.setter
    def interrupt(self, check):  # the trainer's stop check, asked at the loop's safe points
        self.loop.interrupt = check

    def pending_target(self, meta: dict) -> dict:
        return PendingUpdate.restore_target(meta)

    def restore_pending(self, arrays: dict, meta: dict) -> None:
        self.loop.pending = PendingUpdate.unpack(arrays, meta)

    def get_state(self) -> dict:
        return self.loop.extra_state()

    def set_state(self, state: dict) -> None:
        self.loop.load_extra_state(state)

    def postfix(self, m: dict) -> dict:
        return {"reward": f"{m['rollout/reward_mean']:.3f}",
                "acc": f"{m['rollout/accuracy']:.3f}"}


def train_rl(run: RLRunConfig, *, model=None, tokenizer=None, prompts=None, eval_prompts=None,
             resume: bool = False, hooks: Sequence[Callable] = ()) -> RLResult:
    """Run the RL loop described by an in-memory config. `model` = (ModelConfig, params) and
    `prompts` / `eval_prompts` (lists of `Prompt`) override what the config would load; hooks are
    called as hook(trainer, step) after each RL step (tests inject preemption there)."""
    from ..data.chat import stop_ids as format_stop_ids
    from ..data.tokenizer import load_tokenizer
    from ..eval.pool import GraderPool
    from .build import build_mesh, build_model, finish_run, publish_config
    from .prompts import load_prompts

    run.validate()
    rl = run.rl
    mesh = build_mesh(run)
    cfg, params = model if model is not None else build_model(run, mesh)
    tok = tokenizer or load_tokenizer(run.data.tokenizer)
    if prompts is None:
        prompts, loaded_eval = load_prompts(run, tok, rl.max_prompt_tokens, rl.eval_problems)
        eval_prompts = loaded_eval if eval_prompts is None else eval_prompts
    out = Path(run.output.dir).absolute()
    publish_config(run, out / "config.yaml")
    with GraderPool(rl.grader_workers, rl.grader_timeout) as pool:
        loop = RLLoop(run, cfg, params, tok, prompts, format_stop_ids(run.data.chat_format, tok),
                      pool, mesh=mesh)
        source = RLSteps(loop, eval_prompts or [], rl.steps)
        trainer = Trainer(run, cfg, source, rl.steps, hooks=hooks, desc="rl",
                          seq_len=rl.max_prompt_tokens + rl.max_new_tokens)
        finish_run(trainer, cfg, trainer.train(resume=resume))
    return RLResult(loop.state.params, loop.step_index, source.history, source.last_eval, out)


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
    train_rl(run, resume=resume, hooks=hooks)
    return 0
