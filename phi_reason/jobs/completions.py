"""The one sample -> text -> grade path of every job: `generate`, `eval`, `rollout-dpo`, RL and
the demo all sample with the paged engine, cut each row's text at the chat format's stop tokens
the same way (`completion_text`) and grade through the grader pool.

`sample` returns the engine's output with the texts; `submit_grading` queues verdicts now and
returns a wait function, so callers do device work (log-prob passes) while the pool grades;
under several processes each grades its share and the verdicts are gathered.
`ProgressBar` is the engine's `on_progress` callback as a tqdm bar (rows done, tokens/s, ETA).
"""
from __future__ import annotations

import json
import time
from typing import Callable, List, NamedTuple, Sequence

from ..data.tokenizer import completion_text
from ..sharding import processes


class Completions(NamedTuple):
    texts: List[str]
    tokens: List[List[int]]
    logprobs: List[List[float]]
    finish_reasons: List[str]
    stats: dict


def sample(params, cfg, tokenizer, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int],
           max_new_tokens, **generate_kw) -> Completions:
    """Sample completions of token-id prompts (paged engine; `generate_kw` are its arguments:
    temperature, top_p, top_k, seed, num_slots, mesh, kv_bytes, interrupt, on_progress, ...)."""
    from ..engine.paged_sampler import generate_paged

    stops = tuple(stop_ids)
    out = generate_paged(params, cfg, prompts, max_new_tokens, stop_tokens=stops, **generate_kw)
    texts = [completion_text(tokenizer, t, stops) for t in out.tokens]
    return Completions(texts, out.tokens, out.logprobs, out.finish_reasons, out.stats or {})


def submit_grading(grader, pairs, mode: str) -> Callable[[], list]:
    """Queue (prediction, gold) pairs in the grader's worker pool now; the returned callable
    waits for the verdicts (list of bool). The caller does device work in between.

    Under several processes each grades its share (pairs p, p + n, ...) and waiting gathers
    every verdict on every process (a collective: all processes call it, in the same order), so
    each completion is graded once and all processes hold the same verdicts."""
    n, me = processes.process_count(), processes.process_index()
    futures = [grader.submit(*pairs[i], mode) for i in range(me, len(pairs), n)]

    def wait() -> list:
        mine = [bool(f.result().correct) for f in futures]
        if n == 1:
            return mine
        verdicts = [None] * len(pairs)
        for p, text in enumerate(processes.gather_texts(json.dumps(mine))):
            for i, v in zip(range(p, len(pairs), n), json.loads(text)):
                verdicts[i] = v
        return verdicts

    return wait


def grade(grader, texts: Sequence[str], answers: Sequence[str], mode: str) -> list:
    """Verdicts of texts against gold answers (submit and wait)."""
    return submit_grading(grader, list(zip(texts, answers)), mode)()


class ProgressBar:
    """The engine's `on_progress` callback as a tqdm bar over rows (rows done, ETA) with output
    tokens/s of wall time since it was made (compiles included); draws nothing when not enabled.
    A context manager."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc, self.enabled, self.bar = desc, enabled, None
        self.t0 = time.perf_counter()

    def __call__(self, progress: dict) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=progress["rows"], desc=self.desc, unit="row",
                            dynamic_ncols=True, leave=False)
        self.bar.update(progress["rows_done"] - self.bar.n)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{progress['tokens'] / elapsed:,.0f} tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
