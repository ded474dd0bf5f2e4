"""Math benchmarks: load one, sample K responses per problem, grade, report (`phi-reason eval`).

The pieces are separable so they can be tested without a model:
  load_benchmark(name, path)                  -> problems [{id, problem, answer, subject, level}]
  sample_responses(problems, generate_fn, K)  -> records (one per sample, ungraded)
  grade_records(records, pool)                -> records with correct/extracted/status
  summarize(problems, records)                -> numbers (metrics.py, pure)
  evaluate(...)                               -> all of the above plus files in `out`
`generate_fn(questions, samples) -> [{"text", "num_tokens", "finish_reason"}]` (question-major,
`samples` completions per question); `phi_reason.jobs.eval.model_generate_fn` builds one from a
checkpoint. This module imports neither JAX nor the model.
"""
from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass

from ..errors import UsageError
from ..files import atomic_open, read_jsonl, write_jsonl
from .extract import gold_answer, last_boxed
from .metrics import summarize

REASONING_TEMPERATURE = 0.8   # defaults recommended for the Phi-4 reasoning models
REASONING_TOP_P = 0.95


@dataclass(frozen=True)
class BenchmarkSpec:
    question: tuple[str, ...]           # candidate keys, first present wins
    answer: str | None = None           # key holding the final answer (or a "#### n" solution)
    answer_in_solution: str | None = None  # key of a solution whose last \boxed{} is the answer
    subject: str | None = None
    level: str | None = None
    id: str | None = None
    hf_dataset: str | None = None       # used only when no local file is given


BENCHMARKS = {
    "math500": BenchmarkSpec(("problem",), answer="answer", subject="subject", level="level",
                             id="unique_id", hf_dataset="HuggingFaceH4/MATH-500"),
    "math": BenchmarkSpec(("problem",), answer_in_solution="solution", subject="type",
                          level="level", id="idx"),
    "gsm8k": BenchmarkSpec(("question",), answer="answer", id="idx", hf_dataset="openai/gsm8k"),
    "aime24": BenchmarkSpec(("problem",), answer="answer", id="id"),
    "aime25": BenchmarkSpec(("problem",), answer="answer"),
    "amc23": BenchmarkSpec(("problem", "question"), answer="answer", id="id"),
    "minerva": BenchmarkSpec(("problem",), answer_in_solution="solution", subject="type", id="idx"),
    "olympiadbench": BenchmarkSpec(("question",), answer="final_answer", subject="subfield",
                                   id="id"),
}


class BenchmarkError(UsageError):
    """A benchmark name or file that cannot be read: the message names the file and row."""


def _read_rows(path: pathlib.Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    return read_jsonl(path)


def _level(value):
    """MATH levels: "Level 3" -> 3; ints stay; anything else is kept as text."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*Level\s*(\d+)\s*", value)
        return int(m.group(1)) if m else value
    return value


def _answer_text(value) -> str:
    """Gold answers as strings: lists (OlympiadBench) joined, `$...$` stripped, floats from AMC
    written without a spurious `.0`."""
    if isinstance(value, list):
        return ", ".join(_answer_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if text.startswith("$") and text.endswith("$") and len(text) > 1:
        text = text.strip("$").strip()
    return gold_answer(text)


def load_benchmark(name: str, path=None) -> list[dict]:
    """Problems of benchmark `name` from a local JSONL/Parquet file (or the Hugging Face hub when
    no path is given and `datasets` is installed)."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    if path is None:
        rows, where = _hub_rows(name, spec), spec.hf_dataset
    else:
        where = pathlib.Path(path)
        if not where.is_file():
            raise BenchmarkError(f"benchmark file {where} does not exist")
        rows = _read_rows(where)
    problems = []
    for index, row in enumerate(rows):
        key = next((k for k in spec.question if k in row), None)
        if key is None:
            raise BenchmarkError(f"{where}: row {index + 1}: none of the question keys "
                             f"{spec.question} present (keys: {sorted(row)})")
        if spec.answer_in_solution:
            if spec.answer_in_solution not in row:
                raise BenchmarkError(f"{where}: row {index + 1}: missing key "
                                 f"{spec.answer_in_solution!r}")
            answer = last_boxed(str(row[spec.answer_in_solution]))
            if answer is None:
                raise BenchmarkError(f"{where}: row {index + 1}: no \\boxed{{}} answer in "
                                 f"{spec.answer_in_solution!r}")
        else:
            if spec.answer not in row:
                raise BenchmarkError(f"{where}: row {index + 1}: missing key {spec.answer!r}")
            answer = _answer_text(row[spec.answer])
        problems.append({
            "id": str(row[spec.id]) if spec.id and spec.id in row else str(index),
            "problem": row[key],
            "answer": answer,
            "subject": row.get(spec.subject) if spec.subject else None,
            "level": _level(row.get(spec.level)) if spec.level else None,
        })
    ids = [p["id"] for p in problems]
    if len(set(ids)) != len(ids):  # duplicate ids in the source: fall back to row numbers
        for i, p in enumerate(problems):
            p["id"] = str(i)
    return problems


def _hub_rows(name: str, spec: BenchmarkSpec) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise BenchmarkError(f"no --data file given for {name!r} and the `datasets` package is not "
                         "installed: pass a local JSONL/Parquet file") from None
    if spec.hf_dataset is None:
        raise BenchmarkError(f"no Hugging Face dataset known for {name!r}: pass --data")
    config = "main" if name == "gsm8k" else None
    return list(datasets.load_dataset(spec.hf_dataset, config, split="test"))


# --------------------------------------------------------------------------- sampling + grading

def sample_responses(problems: list[dict], generate_fn, samples: int) -> list[dict]:
    """One ungraded record per (problem, sample)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    outputs = generate_fn([p["problem"] for p in problems], samples)
    if len(outputs) != len(problems) * samples:
        raise ValueError(f"generate_fn returned {len(outputs)} completions for "
                         f"{len(problems)} problems x {samples} samples")
    records = []
    for i, p in enumerate(problems):
        for s in range(samples):
            out = outputs[i * samples + s]
            records.append({
                "problem_id": p["id"], "sample": s, "subject": p["subject"], "level": p["level"],
                "gold": p["answer"], "response": out["text"],
                "num_tokens": int(out["num_tokens"]), "finish_reason": out["finish_reason"],
            })
    return records


def grade_records(records: list[dict], pool, mode: str = "eval") -> list[dict]:
    results = pool.grade_many([(r["response"], r["gold"]) for r in records], mode)
    return [{**r, "extracted": res.extracted, "correct": res.correct, "status": res.status}
            for r, res in zip(records, results)]


def evaluate(problems: list[dict], generate_fn, samples: int, out, title: str,
             settings: dict | None = None, workers: int = 2, timeout: float = 5.0) -> dict:
    """Sample, grade, summarise, write generations.jsonl, summary.json, report.md and plots."""
    from phi_reason.eval.pool import GraderPool
    from phi_reason.eval.report import write_report

    out = pathlib.Path(out)
    records = sample_responses(problems, generate_fn, samples)
    with GraderPool(workers=workers, timeout=timeout) as pool:
        records = grade_records(records, pool)
    summary = summarize(problems, records)
    write_jsonl(out / "generations.jsonl", records)
    with atomic_open(out / "summary.json") as f:
        json.dump({k: v for k, v in summary.items() if k != "per_problem"}, f, indent=2,
                  default=str)
    write_report(summary, records, out, title, settings)
    return summary
