"""An RL step stopped inside its updates: what `--resume` needs to finish that step exactly.

At paper scale one RL step (rollouts of 8-32K tokens, then mu passes of minibatch updates) takes
longer than a preemption grace period, so a stop signal is honoured between minibatches. The
rollouts are the expensive part and the state has already taken some updates, so instead of
discarding the step the checkpoint keeps its training rows (the scored, filtered rollouts with
their advantages and old / reference / sampler log-probs), the number of minibatch updates applied
and the metrics gathered so far. Resuming rebuilds the same minibatches (the shuffle is a function
of the step) and applies the rest: bitwise the uninterrupted step.

Rows are stored as flat arrays with offsets (binary, in the Orbax checkpoint next to the state:
~16 bytes per generated token, ~0.25 GB for a 16M-token step), the rest as JSON.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# (prompt ids, completion ids, advantage, old log-probs, reference log-probs or None,
#  log-prob temperature, sampler log-probs): one training row of an RL step
_RAGGED = {"prompt": np.int32, "completion": np.int32, "old": np.float32, "ref": np.float32,
           "sampler": np.float32}


@dataclasses.dataclass
class PendingUpdate:
    rows: list  # training rows, as above
    metrics: dict  # the step's rollout metrics (rewards, lengths, mismatch, tokens generated)
    done: int = 0  # minibatch updates already applied
    totals: dict = dataclasses.field(default_factory=dict)  # sums of their metrics
    trained: float = 0.0  # target tokens they trained on

    @property
    def kept(self) -> str:
        return (f"its {len(self.rows)} rollout rows and {self.done} minibatch update(s) kept; "
                "resume applies the rest")

    def pack(self) -> tuple:
        """(arrays, meta): numpy arrays for the checkpoint, and JSON-safe metadata."""
        arrays: dict = {}
        columns = {"prompt": [r[0] for r in self.rows], "completion": [r[1] for r in self.rows],
                   "old": [r[3] for r in self.rows], "sampler": [r[6] for r in self.rows]}
        has_ref = bool(self.rows) and self.rows[0][4] is not None
        if has_ref:
            columns["ref"] = [r[4] for r in self.rows]
        for name, seqs in columns.items():
            arrays[name] = np.asarray([x for s in seqs for x in s], _RAGGED[name])
            arrays[name + "_offsets"] = np.cumsum([0] + [len(s) for s in seqs], dtype=np.int64)
        arrays["advantage"] = np.asarray([r[2] for r in self.rows], np.float64)
        arrays["temperature"] = np.asarray([r[5] for r in self.rows], np.float64)
        metrics = {k: v if isinstance(v, (int, float)) else float(v)
                   for k, v in self.metrics.items()}
        meta = {"done": self.done, "metrics": metrics, "totals": self.totals,
                "trained": self.trained, "has_ref": has_ref,
                "shapes": {k: [list(v.shape), v.dtype.name] for k, v in arrays.items()}}
        return arrays, meta

    @staticmethod
    def restore_target(meta: dict) -> dict:
        """Arrays of the saved shapes and dtypes (Orbax restores numpy into a numpy target)."""
        return {k: np.zeros(shape, dtype) for k, (shape, dtype) in meta["shapes"].items()}

    @classmethod
    def unpack(cls, arrays: dict, meta: dict) -> "PendingUpdate":
        def column(name) -> list:
            flat, off = np.asarray(arrays[name]), np.asarray(arrays[name + "_offsets"])
            return [flat[off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]

        prompt, completion = column("prompt"), column("completion")
        old, sampler = column("old"), column("sampler")
        ref: list = column("ref") if meta["has_ref"] else [None] * len(prompt)
        advantage = np.asarray(arrays["advantage"]).tolist()
        temperature = np.asarray(arrays["temperature"]).tolist()
        rows = list(zip(prompt, completion, advantage, old, ref, temperature, sampler))
        return cls(rows, dict(meta["metrics"]), int(meta["done"]), dict(meta["totals"]),
                   float(meta["trained"]))


def training_rows(groups) -> list:
    """The training rows of scored groups (advantages and old log-probs set), group-major."""
    return [(grp.prompt.ids, grp.tokens[j], float(grp.advantages[j]), grp.old_logprobs[j],
             None if grp.ref_logprobs is None else grp.ref_logprobs[j], grp.temperature,
             grp.logprobs[j])
            for grp in groups for j in range(len(grp.tokens))]
