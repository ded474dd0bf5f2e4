"""The package's file edges: JSONL reading with line-numbered errors, and atomic writes (a temp
file in the same directory renamed over the target, so no reader ever sees half a file).
Standard library only, so every module (config included) can use it."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import IO, Iterator

from .errors import UsageError


class JSONLError(UsageError):
    """A JSONL file that is missing or has a bad line (the message names file:line)."""


def iter_jsonl(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a missing file or a line that is not a JSON
    object raises JSONLError naming file:line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise JSONLError(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise JSONLError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise JSONLError(f"{path}:{lineno}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            yield lineno, record


def read_jsonl(path, required: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file; a bad line or a missing key raises JSONLError naming file:line."""
    records = []
    for lineno, record in iter_jsonl(path):
        for key in required:
            if key not in record:
                raise JSONLError(f"{path}:{lineno}: missing key {key!r}")
        records.append(record)
    return records


@contextlib.contextmanager
def atomic_open(path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside `path`; on success rename it to `path`, on error delete it."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_jsonl(path, records) -> None:
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
