"""Record sources and schema adapters.

Sources (`read_records`): JSONL, Parquet (pyarrow), ArrayRecord (JSON records; when
`array_record` is installed), TFDS (`tfds:NAME[:SPLIT][@DATA_DIR]`: a prepared array_record or
parquet dataset, read with tensorflow_datasets - the `tfds` extra - and no TensorFlow),
`datasets` saved to disk (`datasets.load_from_disk`, when installed), and shards: a directory of
Parquet (else JSONL) files such as a cloned Hugging Face dataset repo, or a glob
(`repo/data/train-*.parquet`), read in name order. Every record carries where it
came from ("file:line", "file:row N") so that errors name it.

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

import dataclasses
import glob
import json
import os
import pathlib
import re

from ..errors import UsageError
from .boxed import gsm8k_answer, last_boxed
from .chat import ROLES


class DataError(UsageError):
    """Bad input data; the message names the file and line (or row) and what was expected."""


@dataclasses.dataclass
class Records:
    records: list            # normalised records
    where: list              # "file:line" of each record
    skipped: int = 0         # bad records skipped under skip_bad_records
    skipped_reasons: list = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.records)


# ------------------------------------------------------------------------------------------ readers
def _read_jsonl(path: pathlib.Path, bad):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad(where, f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(record, dict):
                bad(where, f"expected a JSON object, got {type(record).__name__}")
                continue
            yield where, record


def _read_parquet(path: pathlib.Path, bad):
    import pyarrow.parquet as pq

    for i, record in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}:row {i}", record


def _read_array_record(path: pathlib.Path, bad):
    try:
        from array_record.python.array_record_data_source import ArrayRecordDataSource
    except ImportError as e:
        raise DataError(f"{path}: reading ArrayRecord files needs the array_record package") from e
    source = ArrayRecordDataSource([str(path)])
    for i in range(len(source)):
        where = f"{path}:record {i}"
        try:
            record = json.loads(source[i])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad(where, f"record is not a JSON object ({e})")
            continue
        yield where, record


TFDS_SPEC = "tfds:NAME[:SPLIT][@DATA_DIR]"
_TFDS_SPEC = re.compile(r"tfds:(?P<name>[^:@]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>[^@]+))?"
                        r"(?:@(?P<data_dir>.+))?")


def _parse_tfds(spec: str):
    """`tfds:NAME[:SPLIT][@DATA_DIR]` -> (name, split, data_dir or None). NAME may carry a config
    and a version (`name/config:1.0.0`); SPLIT defaults to train and takes TFDS slices
    (`train[:1000]`); DATA_DIR is the directory holding NAME/VERSION/ (TFDS's data_dir: default
    $TFDS_DATA_DIR, else ~/tensorflow_datasets)."""
    m = _TFDS_SPEC.fullmatch(spec)
    if not m:
        raise DataError(f"{spec}: expected {TFDS_SPEC}, e.g. tfds:my_math:train@/data/tfds")
    data_dir = m["data_dir"]
    return m["name"], m["split"] or "train", os.path.expanduser(data_dir) if data_dir else None


def _tfds_value(feature, value, tfds):
    """A decoded TFDS value as plain Python: text as str, numpy scalars and arrays as Python
    scalars and lists, and a Sequence of dicts (TFDS stores it as a dict of lists) as a list of
    dicts, so that e.g. `messages: Sequence({role, content})` reads as chat messages."""
    if isinstance(feature, tfds.features.Sequence) and isinstance(value, dict):
        inner = feature.feature
        columns = {k: list(v) for k, v in value.items()}
        n = len(next(iter(columns.values()), []))
        return [_tfds_value(inner, {k: v[i] for k, v in columns.items()}, tfds) for i in range(n)]
    if isinstance(feature, tfds.features.FeaturesDict) and isinstance(value, dict):
        return {k: _tfds_value(feature[k] if k in feature.keys() else None, v, tfds)
                for k, v in value.items()}
    if isinstance(feature, tfds.features.Sequence) and not isinstance(value, (bytes, str)):
        return [_tfds_value(feature.feature, v, tfds) for v in value]
    return _plain(value)


def _plain(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value] if value.dtype.kind in "OSU" else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value  # binary data stays bytes; a schema wanting text names the record
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_tfds(spec: str, bad):
    """A prepared TFDS dataset read by random access (`builder.as_data_source`): array_record or
    parquet files, which need no TensorFlow; nothing is downloaded or prepared. Records are named
    `tfds:NAME:SPLIT:record i`."""
    name, split, data_dir = _parse_tfds(spec)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"{spec}: TFDS sources need tensorflow_datasets installed "
                        "(pip install 'phi-reason[tfds]')") from e
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"{spec}: no such TFDS data directory {data_dir}")
    default_dir = "TFDS's default data_dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets)"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        found = sorted(p.name for p in pathlib.Path(data_dir).iterdir()
                       if p.is_dir() and p.name != "downloads") if data_dir else []
        raise DataError(f"{spec}: no prepared TFDS dataset {name!r} in {data_dir or default_dir}"
                        + (f" (it holds {found})" if found else "")
                        + f"; the spec is {TFDS_SPEC}") from None
    except (AssertionError, ValueError) as e:  # e.g. a version that is not there
        raise DataError(f"{spec}: {e}") from None
    if not builder.is_prepared():  # a registered dataset: never downloaded or prepared here
        raise DataError(f"{spec}: {name!r} is not prepared in {builder.data_dir}; prepare it "
                        "with file_format='array_record' (tfds build --file_format=array_record)")
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError:
        raise DataError(f"{spec}: the dataset is stored as {builder.info.file_format.value}, which "
                        "needs TensorFlow; prepare it with file_format='array_record' (or parquet)"
                        ) from None
    except (ValueError, KeyError, AssertionError) as e:  # unknown split, bad slice
        raise DataError(f"{spec}: {e}") from None
    features = source.dataset_info.features
    for i in range(len(source)):
        yield f"tfds:{name}:{split}:record {i}", _tfds_value(features, source[i], tfds)


def _read_hf_disk(path: pathlib.Path, bad):
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path}: a `datasets` directory needs the datasets package") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: holds splits {list(ds)}; point at one split's directory")
    for i, record in enumerate(ds):
        yield f"{path}:row {i}", record


def _read_shards(paths, bad):
    """Several files (shards of one dataset) read one after another, in name order."""
    for path in paths:
        reader, source = _reader_for(str(path))
        yield from reader(source, bad)


def _shards_in(path: pathlib.Path) -> list:
    """The data files of a directory that is not a `save_to_disk` output, e.g. a cloned Hugging
    Face dataset repo (`data/train-00000-of-00002.parquet`): its Parquet files, else its JSONL."""
    for pattern in ("*.parquet", "*.jsonl"):
        found = sorted(p for p in path.rglob(pattern) if p.is_file())
        if found:
            return found
    return []


def _reader_for(spec: str):
    """(reader, source) for a file, a directory, a glob or a TFDS spec (`TFDS_SPEC`)."""
    if spec.startswith("tfds:"):
        return _read_tfds, spec
    if any(c in spec for c in "*?["):  # a glob of shards, e.g. repo/data/train-*.parquet
        matches = sorted(pathlib.Path(p) for p in glob.glob(spec, recursive=True))
        if not matches:
            raise DataError(f"{spec}: no file matches")
        return _read_shards, matches
    path = pathlib.Path(spec)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return _read_hf_disk, path
        shards = _shards_in(path)
        if not shards:
            raise DataError(f"{path}: neither a `datasets.save_to_disk` output nor a directory "
                            "of .parquet / .jsonl shards")
        return _read_shards, shards
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl, path
    if suffix == ".parquet":
        return _read_parquet, path
    if suffix in (".array_record", ".arrayrecord") or ".array_record" in path.name:
        return _read_array_record, path
    raise DataError(f"{path}: unknown data file type {suffix!r} (expected .jsonl, .parquet, "
                    f".array_record, a datasets dir or {TFDS_SPEC})")


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


SCHEMAS = {"chat": _chat, "prompt_response": _prompt_response, "math": _math, "gsm8k": _gsm8k,
           "dpo": _dpo, "rl": _rl, "raw": lambda r, where: r}


def read_records(spec: str | os.PathLike, schema: str = "raw", skip_bad_records: bool = False
                 ) -> Records:
    """All records of one source, adapted to `schema`. A malformed line, a missing or mistyped field
    and an empty source raise DataError naming the file and line, unless `skip_bad_records`, which
    skips them and counts them in `Records.skipped` (an empty source still raises)."""
    try:
        adapt = SCHEMAS[schema]
    except KeyError:
        raise DataError(f"unknown schema {schema!r}; expected one of {sorted(SCHEMAS)}") from None
    out = Records([], [])

    def bad(where, why):
        if not skip_bad_records:
            raise DataError(f"{where}: {why}")
        out.skipped += 1
        out.skipped_reasons.append(f"{where}: {why}")

    reader, source = _reader_for(str(spec))
    for where, raw in reader(source, bad):
        try:
            out.records.append(adapt(raw, where))
            out.where.append(where)
        except DataError as e:
            bad(where, str(e).removeprefix(f"{where}: "))
    if not out.records:
        detail = f" ({out.skipped} bad records skipped)" if out.skipped else ""
        raise DataError(f"{spec}: no usable records{detail}")
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
