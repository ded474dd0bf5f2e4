"""TFDS sources (`tfds:NAME[:SPLIT][@DATA_DIR]`) read from tiny datasets this file prepares in a
temporary data dir: array_record files written by a GeneratorBasedBuilder, offline, without
TensorFlow; read back through `load_records` the way a user's prepared dataset is (the builder
classes are not registered, so TFDS finds the data from its files alone)."""
import contextlib
import re
import sys

import numpy as np
import pytest

from phi_reason.data.readers import _parse_tfds
from phi_reason.data.sources import DataError, load_records, read_records

MATH = [
    {"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "level": 1},
    {"problem": "Halve 1.", "solution": "$\\boxed{\\frac{1}{2}}$", "level": 2},
    {"problem": "Solve $x^2=4$ - é ü.", "solution": "$\\boxed{\\{-2, 2\\}}$", "level": 3},
]
CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]
DPO = [{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
       {"prompt": "Say bye", "chosen": "Bye!", "rejected": "Hi."}]


@pytest.fixture(scope="module")
def tfds():
    tfds = pytest.importorskip("tensorflow_datasets",
                               reason="tensorflow_datasets not installed (the `tfds` extra)")
    tfds.disable_progress_bar()
    return tfds


def _prepare(tfds, data_dir, name, features, splits, file_format="array_record", register=False):
    """Prepare dataset `name` (snake_case) with `splits` {split: rows} under data_dir."""
    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(rows) for split, rows in splits.items()}

    def _generate_examples(self, rows):
        yield from enumerate(rows)

    class_name = "".join(part.title() for part in name.split("_"))
    with contextlib.nullcontext() if register else tfds.core.registered.skip_registration():
        builder_cls = type(class_name, (tfds.core.GeneratorBasedBuilder,), {
            "VERSION": tfds.core.Version("1.0.0"), "_info": _info,
            "_split_generators": _split_generators, "_generate_examples": _generate_examples})
    assert builder_cls.name == name
    builder = builder_cls(data_dir=str(data_dir), file_format=file_format)
    if not register:
        builder.download_and_prepare()


def _math_features(tfds):
    return {"problem": tfds.features.Text(), "solution": tfds.features.Text(), "level": np.int32}


def _by_prompt(records):
    return sorted(records, key=lambda r: r["messages"][0]["content"])


def test_math_and_chat_datasets_read_back(tfds, tmp_path):
    _prepare(tfds, tmp_path, "tiny_math", _math_features(tfds), {"train": MATH, "test": MATH[:1]})
    turn = tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})
    _prepare(tfds, tmp_path, "tiny_chat", {"messages": turn}, {"train": CHAT})

    out = load_records(f"tfds:tiny_math:train@{tmp_path}", schema="math")
    assert _by_prompt(out.records) == [
        {"messages": [{"role": "user", "content": r["problem"]},
                      {"role": "assistant", "content": r["solution"]}],
         "answer": a} for r, a in sorted(zip(MATH, ["2", "\\frac{1}{2}", "\\{-2, 2\\}"]),
                                         key=lambda ra: ra[0]["problem"])]
    assert out.where == [f"tfds:tiny_math:train:record {i}" for i in range(3)]

    chat = load_records(f"tfds:tiny_chat@{tmp_path}", schema="chat")  # SPLIT defaults to train
    assert sorted(chat.records, key=len) == sorted(CHAT, key=len)
    # The split, a TFDS slice, and several sources at once.
    assert len(read_records(f"tfds:tiny_math:test@{tmp_path}", "math")) == 1
    assert len(read_records(f"tfds:tiny_math:train[:2]@{tmp_path}", "math")) == 2
    both = load_records([f"tfds:tiny_math:test@{tmp_path}", f"tfds:tiny_math@{tmp_path}"], "math")
    assert len(both) == 4 and both.where[:2] == ["tfds:tiny_math:test:record 0",
                                                 "tfds:tiny_math:train:record 0"]


@pytest.mark.parametrize("file_format", ["array_record", "parquet"])
def test_raw_records_are_plain_python(tfds, tmp_path, file_format):
    _prepare(tfds, tmp_path, "tiny_raw", {
        **_math_features(tfds), "tags": tfds.features.Sequence(tfds.features.Text()),
        "ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "score": np.float32},
        {"train": [{**MATH[2], "tags": ["algebra", "ü"], "ids": [3, 1, 4], "score": 0.5}]},
        file_format=file_format)
    (record,) = read_records(f"tfds:tiny_raw@{tmp_path}").records
    assert record == {**MATH[2], "tags": ["algebra", "ü"], "ids": [3, 1, 4], "score": 0.5}
    assert [type(record[k]) for k in ("problem", "level", "ids", "score")] == [
        str, int, list, float]
    assert all(type(i) is int for i in record["ids"])


def test_dpo_and_rl_schemas(tfds, tmp_path):
    text = tfds.features.Text()
    _prepare(tfds, tmp_path, "tiny_pairs", {"prompt": text, "chosen": text, "rejected": text},
             {"train": DPO})
    out = read_records(f"tfds:tiny_pairs@{tmp_path}", "dpo")
    assert sorted(out.records, key=lambda r: r["chosen"]) == [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"],
         "rejected": r["rejected"]} for r in sorted(DPO, key=lambda r: r["chosen"])]

    _prepare(tfds, tmp_path, "tiny_rl", {"question": text, "answer": np.int32},
             {"train": [{"question": "1+1?", "answer": 2}]})
    assert read_records(f"tfds:tiny_rl@{tmp_path}", "rl").records == [
        {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}]


def test_bad_record_is_named(tfds, tmp_path):
    rows = [*MATH[:2], {"problem": "No box.", "solution": "The answer is 3.", "level": 4}]
    _prepare(tfds, tmp_path, "bad_math", _math_features(tfds), {"train": rows})
    raw = read_records(f"tfds:bad_math@{tmp_path}").records
    i = next(i for i, r in enumerate(raw) if r["problem"] == "No box.")
    spec = f"tfds:bad_math:train@{tmp_path}"
    with pytest.raises(DataError, match=re.escape(f"tfds:bad_math:train:record {i}: solution has "
                                                  "no balanced \\boxed{...}")):
        load_records(spec, schema="math")
    out = load_records(spec, schema="math", skip_bad_records=True)
    assert len(out) == 2 and out.skipped == 1
    assert out.skipped_reasons[0].startswith(f"tfds:bad_math:train:record {i}: ")
    with pytest.raises(DataError, match=r"record \d: missing field 'messages' or 'conversations'"):
        load_records(spec, schema="chat")


def test_missing_dataset_split_and_dir_are_usage_errors(tfds, tmp_path):
    _prepare(tfds, tmp_path, "tiny_math", _math_features(tfds), {"train": MATH})
    with pytest.raises(DataError, match=r"no prepared TFDS dataset 'nope' in .*\['tiny_math'\]"):
        read_records(f"tfds:nope@{tmp_path}", "math")
    with pytest.raises(DataError, match="Unknown split 'validation'"):
        read_records(f"tfds:tiny_math:validation@{tmp_path}", "math")
    with pytest.raises(DataError, match="no such TFDS data directory"):
        read_records(f"tfds:tiny_math@{tmp_path / 'absent'}", "math")


def test_registered_but_unprepared_dataset_is_not_downloaded(tfds, tmp_path):
    _prepare(tfds, tmp_path, "registered_unprepared", _math_features(tfds), {"train": MATH},
             register=True)  # a builder TFDS knows by name (as its catalogue datasets are)
    with pytest.raises(DataError, match="'registered_unprepared' is not prepared in "):
        read_records(f"tfds:registered_unprepared@{tmp_path}", "math")
    assert not list(tmp_path.rglob("*.array_record*"))  # nothing was prepared behind our back


def test_spec_syntax():
    assert _parse_tfds("tfds:gsm8k") == ("gsm8k", "train", None)
    assert _parse_tfds("tfds:gsm8k:test") == ("gsm8k", "test", None)
    assert _parse_tfds("tfds:my_set/cfg:1.2.0:train[:10%]@/data/tf ds") == (
        "my_set/cfg:1.2.0", "train[:10%]", "/data/tf ds")
    assert _parse_tfds("tfds:x@~/tfds")[2].endswith("/tfds")
    for bad in ("tfds:", "tfds::train", "tfds:x@"):
        with pytest.raises(DataError, match=re.escape("tfds:NAME[:SPLIT][@DATA_DIR]")):
            _parse_tfds(bad)


def test_without_tensorflow_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(DataError, match=r"tfds:gsm8k:test: .*tensorflow_datasets.*\[tfds\]"):
        read_records("tfds:gsm8k:test", "gsm8k")
