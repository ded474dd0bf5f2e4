"""Decontamination: drop training records that share a word n-gram with any eval problem.

Text is normalised (lower case, every run of non-alphanumeric characters becomes one space) and
split into words; a training record is removed when one of its word n-grams (default 13, as in
the Phi-4 and GPT-3 reports) is also an n-gram of an eval problem. An eval problem shorter than n
words contributes its whole word sequence, so short problems copied verbatim are still caught.
The text is taken from `--field`, else the first of problem / question / prompt, else the user
turns of chat `messages`.

`phi-reason decontaminate --train T.jsonl --eval E1.jsonl E2.jsonl --out CLEAN.jsonl` writes the
kept training lines unchanged (atomically) and `CLEAN.jsonl.removed.jsonl` with, for each removed
record, its line, the eval file:line it matched and the shared n-gram.
"""
from __future__ import annotations

import json
import os
import pathlib
import re

from ..files import atomic_open
from .sources import DataError, read_records

TEXT_FIELDS = ("problem", "question", "prompt")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize_words(text: str) -> list[str]:
    return _NON_ALNUM.sub(" ", text.lower()).split()


def record_text(record: dict, where: str, field: str | None = None) -> str:
    """The text of a record that decontamination compares (see module doc)."""
    names = (field,) if field else TEXT_FIELDS
    for name in names:
        value = record.get(name)
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # a prompt given as messages
            return _user_text(value)
    if not field and isinstance(record.get("messages"), list):
        return _user_text(record["messages"])
    wanted = repr(field) if field else "one of " + ", ".join(map(repr, TEXT_FIELDS + ("messages",)))
    raise DataError(f"{where}: no text field {wanted} (record has {sorted(record)})")


def _user_text(messages) -> str:
    return "\n".join(m.get("content", "") for m in messages
                     if isinstance(m, dict) and m.get("role") == "user"
                     and isinstance(m.get("content"), str))


MIN_SHORT_WORDS = 5  # an eval text shorter than n words is matched whole if it has this many


def ngrams(words: list[str], n: int):
    """Word n-grams; a text shorter than n words is one gram of its whole length (if it has at least
    MIN_SHORT_WORDS words: a two-word problem would match half the training set)."""
    if len(words) < n:
        return [tuple(words)] if len(words) >= min(n, MIN_SHORT_WORDS) else []
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


class EvalIndex:
    """Every n-gram of the eval problems, remembering the first eval record it came from."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"ngram must be >= 1, got {n}")
        self.n = n
        self.source: dict[tuple, str] = {}
        self.short_lengths: set[int] = set()  # lengths of eval texts shorter than n words

    def add(self, text: str, where: str) -> None:
        for gram in ngrams(normalize_words(text), self.n):
            self.source.setdefault(gram, where)
            if len(gram) < self.n:
                self.short_lengths.add(len(gram))

    def match(self, text: str) -> tuple[tuple, str] | None:
        """(shared gram, eval record) of the first match, or None."""
        words = normalize_words(text)
        for length in (self.n, *sorted(self.short_lengths)):
            for i in range(len(words) - length + 1):
                gram = tuple(words[i:i + length])
                hit = self.source.get(gram)
                if hit is not None:
                    return gram, hit
        return None


def _write_lines(path: pathlib.Path, lines) -> None:
    with atomic_open(path) as f:
        for line in lines:
            f.write(line if line.endswith("\n") else line + "\n")


def decontaminate(train_path, eval_paths, ngram: int = 13, field: str | None = None):
    """(kept lines, removed [{"line", "eval", "ngram"}]) for a JSONL training file."""
    index = EvalIndex(ngram)
    for eval_path in eval_paths:
        source = read_records(eval_path)
        for record, where in zip(source.records, source.where):
            index.add(record_text(record, where, field), where)
    train = pathlib.Path(train_path)
    if not train.is_file():
        raise DataError(f"{train}: training file not found")
    if train.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"{train}: the training file must be JSONL "
                        "(its lines are copied unchanged)")
    kept, removed = [], []
    with open(train, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise DataError(f"{train}: empty file (no records)")
    for lineno, line in lines:
        where = f"{train}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        hit = index.match(record_text(record, where, field))
        if hit is None:
            kept.append(line)
        else:
            removed.append({"line": lineno, "eval": hit[1], "ngram": " ".join(hit[0])})
    return kept, removed


def main(train, eval, out, ngram=13, field=None):  # noqa: A002 (CLI keyword names)
    eval_paths = [eval] if isinstance(eval, (str, os.PathLike)) else list(eval)
    kept, removed = decontaminate(train, eval_paths, ngram, field)
    out = pathlib.Path(out)
    _write_lines(out, kept)
    report = out.with_name(out.name + ".removed.jsonl")
    _write_lines(report, [json.dumps(r) for r in removed])
    total = len(kept) + len(removed)
    print(f"decontaminate: kept {len(kept)} of {total} training records, removed {len(removed)} "
          f"sharing a {ngram}-word n-gram with {len(eval_paths)} eval file(s)")
    by_eval: dict[str, int] = {}
    for r in removed:
        name = r["eval"].rsplit(":", 1)[0]
        by_eval[name] = by_eval.get(name, 0) + 1
    for name, count in sorted(by_eval.items()):
        print(f"  {count} matched {name}")
    for r in removed[:5]:
        print(f"  e.g. line {r['line']} matches {r['eval']}: \"{r['ngram']}\"")
    print(f"wrote {out} and {report}")
    return 0
