"""Record readers by format, each with a streaming scan and random access to one record.

A reader's `scan(bad)` yields (label, raw record, locator) for every record it can parse (bad ones
go to `bad(where, why)`); `get(locator)` reads that one record again; `where(label)` names it
("file:line", "file:row N", "tfds:NAME:SPLIT:record i"). Locators and labels are integers, so
an index of a corpus holds a few bytes per record (`sources.index_records`), and each host of a
multi-host run reads only the records it trains on.

Formats: JSONL (byte offsets), Parquet (row groups, the last two cached), ArrayRecord (JSON
records; the array_record package), TFDS (`tfds:NAME[:SPLIT][@DATA_DIR]`: a prepared
array_record or parquet dataset; tensorflow_datasets, no TensorFlow), a `datasets` directory
(`save_to_disk`, memory-mapped), and shards: a directory of Parquet (else JSONL) files such as a
cloned Hugging Face dataset repo, or a glob (`repo/data/train-*.parquet`), in name order.
"""
from __future__ import annotations

import bisect
import glob
import json
import os
import pathlib
import re
from typing import Iterator, List, Tuple

from ..errors import UsageError


class DataError(UsageError):
    """Bad input data; the message names the file and line (or row) and what was expected."""


class Reader:
    """One source: `scan`, `get`, `where` (see the module docstring). Handles and caches are
    opened on first use and not pickled (grain worker processes reopen them)."""

    _transient = ()  # attributes dropped when pickled

    def scan(self, bad) -> Iterator[Tuple[int, dict, int]]:
        raise NotImplementedError

    def get(self, loc: int) -> dict:
        raise NotImplementedError

    def where(self, label: int) -> str:
        raise NotImplementedError

    def __getstate__(self):
        return {k: (None if k in self._transient else v) for k, v in self.__dict__.items()}


class JsonlReader(Reader):
    _transient = ("_file",)

    def __init__(self, path: pathlib.Path):
        self.path, self._file = path, None

    def where(self, label):
        return f"{self.path}:{label}"

    def scan(self, bad):
        with open(self.path, "rb") as f:
            lineno, offset = 0, 0
            for line in f:
                lineno += 1
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                record = self._parse(line, self.where(lineno), bad)
                if record is not None:
                    yield lineno, record, start

    def get(self, loc):
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(loc)
        return self._parse(self._file.readline(), f"{self.path}@{loc}", None)

    @staticmethod
    def _parse(line: bytes, where, bad):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = (f"malformed JSON ({e.msg} at column {e.colno})"
                   if isinstance(e, json.JSONDecodeError) else f"not UTF-8 ({e})")
            if bad is None:
                raise DataError(f"{where}: {why}") from None
            return bad(where, why)
        if not isinstance(record, dict):
            why = f"expected a JSON object, got {type(record).__name__}"
            if bad is None:
                raise DataError(f"{where}: {why}")
            return bad(where, why)
        return record


class ParquetReader(Reader):
    _transient = ("_file", "_cache")

    def __init__(self, path: pathlib.Path):
        self.path, self._file, self._cache = path, None, None

    def where(self, label):
        return f"{self.path}:row {label}"

    def _open(self):
        if self._file is None:
            import pyarrow.parquet as pq
            self._file = pq.ParquetFile(self.path)
            meta = self._file.metadata
            self._starts = [0]
            for g in range(meta.num_row_groups):
                self._starts.append(self._starts[-1] + meta.row_group(g).num_rows)
            self._cache = {}
        return self._file

    def _group(self, g: int) -> list:
        if g not in self._cache:
            if len(self._cache) >= 2:  # a shuffled read order revisits groups: keep the last two
                self._cache.pop(next(iter(self._cache)))
            self._cache[g] = self._open().read_row_group(g).to_pylist()
        return self._cache[g]

    def scan(self, bad):
        f = self._open()
        for g in range(f.metadata.num_row_groups):
            for j, record in enumerate(f.read_row_group(g).to_pylist()):
                yield self._starts[g] + j, record, self._starts[g] + j

    def get(self, loc):
        self._open()
        g = bisect.bisect_right(self._starts, loc) - 1
        return self._group(g)[loc - self._starts[g]]


class ArrayRecordReader(Reader):
    _transient = ("_source",)

    def __init__(self, path: pathlib.Path):
        self.path, self._source = path, None

    def where(self, label):
        return f"{self.path}:record {label}"

    def _open(self):
        if self._source is None:
            try:
                from array_record.python.array_record_data_source import ArrayRecordDataSource
            except ImportError as e:
                raise DataError(f"{self.path}: reading ArrayRecord files needs the array_record "
                                "package") from e
            self._source = ArrayRecordDataSource([str(self.path)])
        return self._source

    def _parse(self, i, bad):
        try:
            return json.loads(self._open()[i])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if bad is None:
                raise DataError(f"{self.where(i)}: record is not a JSON object ({e})") from None
            return bad(self.where(i), f"record is not a JSON object ({e})")

    def scan(self, bad):
        for i in range(len(self._open())):
            record = self._parse(i, bad)
            if record is not None:
                yield i, record, i

    def get(self, loc):
        return self._parse(loc, None)


class HfDiskReader(Reader):
    _transient = ("_ds",)

    def __init__(self, path: pathlib.Path):
        self.path, self._ds = path, None

    def where(self, label):
        return f"{self.path}:row {label}"

    def _open(self):
        if self._ds is None:
            try:
                import datasets
            except ImportError as e:
                raise DataError(f"{self.path}: a `datasets` directory needs the datasets "
                                "package") from e
            ds = datasets.load_from_disk(str(self.path))  # memory-mapped Arrow
            if isinstance(ds, datasets.DatasetDict):
                raise DataError(f"{self.path}: holds splits {list(ds)}; point at one split's "
                                "directory")
            self._ds = ds
        return self._ds

    def scan(self, bad):
        for i, record in enumerate(self._open()):
            yield i, record, i

    def get(self, loc):
        return self._open()[int(loc)]


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


def _open_tfds(spec: str):
    """A prepared TFDS dataset's random-access source (`builder.as_data_source`): array_record or
    parquet files, which need no TensorFlow; nothing is downloaded or prepared."""
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
    return source, source.dataset_info.features, tfds, name, split



class TfdsReader(Reader):
    _transient = ("_opened",)

    def __init__(self, spec: str):
        self.spec, self._opened = spec, None

    def _open(self):
        if self._opened is None:
            self._opened = _open_tfds(self.spec)
        return self._opened

    def where(self, label):
        _, _, _, name, split = self._open()
        return f"tfds:{name}:{split}:record {label}"

    def scan(self, bad):
        source = self._open()[0]
        for i in range(len(source)):
            yield i, self.get(i), i

    def get(self, loc):
        source, features, tfds, _, _ = self._open()
        return _tfds_value(features, source[int(loc)], tfds)


def _shards_in(path: pathlib.Path) -> list:
    """The data files of a directory that is not a `save_to_disk` output, e.g. a cloned Hugging
    Face dataset repo (`data/train-00000-of-00002.parquet`): its Parquet files, else its JSONL."""
    for pattern in ("*.parquet", "*.jsonl"):
        found = sorted(p for p in path.rglob(pattern) if p.is_file())
        if found:
            return found
    return []


def open_readers(spec: str) -> List[Reader]:
    """The readers of a file, a directory, a glob or a TFDS spec (`TFDS_SPEC`), in read order."""
    if spec.startswith("tfds:"):
        return [TfdsReader(spec)]
    if any(c in spec for c in "*?["):  # a glob of shards, e.g. repo/data/train-*.parquet
        matches = sorted(pathlib.Path(p) for p in glob.glob(spec, recursive=True))
        if not matches:
            raise DataError(f"{spec}: no file matches")
        return [r for m in matches for r in open_readers(str(m))]
    path = pathlib.Path(spec)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return [HfDiskReader(path)]
        shards = _shards_in(path)
        if not shards:
            raise DataError(f"{path}: neither a `datasets.save_to_disk` output nor a directory "
                            "of .parquet / .jsonl shards")
        return [r for s in shards for r in open_readers(str(s))]
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return [JsonlReader(path)]
    if suffix == ".parquet":
        return [ParquetReader(path)]
    if suffix in (".array_record", ".arrayrecord") or ".array_record" in path.name:
        return [ArrayRecordReader(path)]
    raise DataError(f"{path}: unknown data file type {suffix!r} (expected .jsonl, .parquet, "
                    f".array_record, a datasets dir or {TFDS_SPEC})")
