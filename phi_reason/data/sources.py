"""Record sources and schema adapters.

Sources (`data/readers.py`): JSONL, Parquet, ArrayRecord, TFDS (`tfds:NAME[:SPLIT][@DATA_DIR]`),
`datasets` saved to disk, and shards (a directory of Parquet / JSONL files such as a cloned Hugging
Face dataset repo, or a glob). Every record carries where it came from ("file:line", "file:row
N") so that errors name it.

`load_records` reads every record into memory (prompts, eval sets); `index_records` validates the
same way in one streaming pass but keeps only a locator per record and reads a record when it is
asked for (training corpora: each host of a multi-host run reads only its share).

Schemas (`load_records(..., schema=...)`) turn raw records into the normalised kinds the pipelines
eat:
  chat             {"messages": [...]}                         (SFT)
  prompt_response  {"messages": [user prompt, assistant response]}
  math             MATH problem/solution -> messages + "answer" (last balanced \\boxed{})
  gsm8k            question/answer -> messages + "answer" (after ####)
  dpo              {"prompt": messages, "chosen": str, "rejected": str}
  rl               {"prompt": messages, "answer": str}
"""
from __future__ import annotations

import array
import dataclasses
import os
from typing import Callable, Iterator, List

import numpy as np

from .boxed import gsm8k_answer, last_boxed
from .chat import ROLES
from .readers import DataError, Reader, open_readers


@dataclasses.dataclass
class Records:
    records: list            # normalised records
    where: list              # "file:line" of each record
    skipped: int = 0         # bad records skipped under skip_bad_records
    skipped_reasons: list = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.records)


# ------------------------------------------------------------------------------------------ schemas
def _field(record, where, *names):
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    raise DataError(f"{where}: missing field {' or '.join(repr(n) for n in names)} "
                    f"(record has {sorted(record)})")


def _text(record, where, *names) -> str:
    value = _field(record, where, *names)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {names[0]!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value, where) -> list[dict]:
    """A prompt given as text or as a list of {role, content} messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected text or a list of {{role, content}} messages, "
                        f"got {value!r:.80}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {i} must be "
                            f"{{role: one of {ROLES}, content: text}}, got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _qa(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _chat(r, where):
    messages = _messages(_field(r, where, "messages", "conversations"), where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant message")
    return {"messages": messages}


def _prompt_response(r, where):
    return {"messages": _qa(_text(r, where, "prompt", "question", "problem"),
                            _text(r, where, "response", "completion", "solution"))}


def _math(r, where):
    solution = _text(r, where, "solution")
    answer = last_boxed(solution)
    if answer is None:
        raise DataError(f"{where}: solution has no balanced \\boxed{{...}} answer")
    return {"messages": _qa(_text(r, where, "problem"), solution), "answer": answer}


def _gsm8k(r, where):
    solution = _text(r, where, "answer")
    answer = gsm8k_answer(solution)
    if answer is None:
        raise DataError(f"{where}: answer has no '#### <final answer>' line")
    return {"messages": _qa(_text(r, where, "question"), solution), "answer": answer}


def _dpo(r, where):
    return {"prompt": _messages(_field(r, where, "prompt"), where),
            "chosen": _text(r, where, "chosen"), "rejected": _text(r, where, "rejected")}


def _rl(r, where):
    answer = _field(r, where, "answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise DataError(f"{where}: field 'answer' must be a string or number")
    return {"prompt": _messages(_field(r, where, "prompt", "problem", "question"), where),
            "answer": answer}


def _raw(r, where):
    return r


SCHEMAS = {"chat": _chat, "prompt_response": _prompt_response, "math": _math, "gsm8k": _gsm8k,
           "dpo": _dpo, "rl": _rl, "raw": _raw}


def _schema(schema: str) -> Callable:
    try:
        return SCHEMAS[schema]
    except KeyError:
        raise DataError(f"unknown schema {schema!r}; expected one of {sorted(SCHEMAS)}") from None


def _scan(spec, schema: str, skip_bad_records: bool, skipped: Records) -> Iterator[tuple]:
    """(reader index, reader, label, locator, where, adapted record) of every usable record of
    `spec`; bad ones raise DataError naming them, or are counted in `skipped` under
    skip_bad_records."""
    adapt = _schema(schema)

    def bad(where, why):
        if not skip_bad_records:
            raise DataError(f"{where}: {why}")
        skipped.skipped += 1
        skipped.skipped_reasons.append(f"{where}: {why}")

    usable = 0
    for r, reader in enumerate(open_readers(str(spec))):
        for label, raw, loc in reader.scan(bad):
            where = reader.where(label)
            try:
                record = adapt(raw, where)
            except DataError as e:
                bad(where, str(e).removeprefix(f"{where}: "))
                continue
            usable += 1
            yield r, reader, label, loc, where, record
    if not usable:
        detail = f" ({skipped.skipped} bad records skipped)" if skipped.skipped else ""
        raise DataError(f"{spec}: no usable records{detail}")


def read_records(spec: str | os.PathLike, schema: str = "raw", skip_bad_records: bool = False
                 ) -> Records:
    """All records of one source, adapted to `schema`. A malformed line, a missing or mistyped field
    and an empty source raise DataError naming the file and line, unless `skip_bad_records`, which
    skips them and counts them in `Records.skipped` (an empty source still raises)."""
    out = Records([], [])
    for *_, where, record in _scan(spec, schema, skip_bad_records, out):
        out.records.append(record)
        out.where.append(where)
    return out


def load_records(specs, schema: str = "raw", skip_bad_records: bool = False) -> Records:
    """Records of one or several sources, concatenated in order."""
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    total = Records([], [])
    for spec in specs:
        part = read_records(spec, schema, skip_bad_records)
        total.records += part.records
        total.where += part.where
        total.skipped += part.skipped
        total.skipped_reasons += part.skipped_reasons
    return total


class IndexedRecords:
    """The records `load_records` would return, read on demand: a sequence (len, [i]) that holds
    one (reader, locator, label) triple per record - 20 bytes - instead of the records. `reads`
    counts the records read since it was built (tests check a host reads only its share)."""

    def __init__(self, readers: List[Reader], schema: str, reader_ids, locators, labels,
                 skipped: int = 0, skipped_reasons=()):
        self.readers, self.schema = readers, schema
        self._adapt = _schema(schema)
        self._reader = np.asarray(reader_ids, np.int32)
        self._loc = np.asarray(locators, np.int64)
        self._label = np.asarray(labels, np.int64)
        self.skipped, self.skipped_reasons = skipped, list(skipped_reasons)
        self.reads = 0

    def __len__(self) -> int:
        return len(self._loc)

    def where(self, i: int) -> str:
        return self.readers[self._reader[i]].where(int(self._label[i]))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        i %= len(self)
        self.reads += 1
        raw = self.readers[self._reader[i]].get(int(self._loc[i]))
        return self._adapt(raw, self.where(i))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def index_records(specs, schema: str = "raw", skip_bad_records: bool = False) -> IndexedRecords:
    """`load_records` without holding the records: the sources are validated in one streaming pass
    (the same errors, naming file and line), and records are read again when indexed."""
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    skipped = Records([], [])
    readers: List[Reader] = []
    # typed arrays while scanning: ~20 bytes a record even for tens of millions of records
    ids, locs, labels = array.array("i"), array.array("q"), array.array("q")
    for spec in specs:
        seen = {}
        for r, reader, label, loc, _, _ in _scan(spec, schema, skip_bad_records, skipped):
            if r not in seen:
                seen[r] = len(readers)
                readers.append(reader)
            ids.append(seen[r])
            locs.append(loc)
            labels.append(label)
    return IndexedRecords(readers, schema, ids, locs, labels, skipped.skipped,
                          skipped.skipped_reasons)
