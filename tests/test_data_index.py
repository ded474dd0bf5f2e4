"""Indexed records (`sources.index_records`): the records `load_records` returns, from every
on-disk format, read on demand; a host of a sharded pipeline reads only its share; the index
pickles into grain worker processes."""
import json
import pickle

import numpy as np
import pytest

from phi_reason.data.pipeline import sft_batches
from phi_reason.data.sources import DataError, index_records, load_records
from phi_reason.data.synthetic import make_problems
from phi_reason.data.tokenizer import CharTokenizer

PROBLEMS = make_problems(40, seed=5, difficulty="easy")
ROWS = [{"problem": p["problem"], "solution": p["solution"]} for p in PROBLEMS]


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _parquet(path, rows, row_group_size):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def sources(tmp_path):
    """Every format holding the same 40 MATH-schema rows (JSONL with a blank line and a bad
    line, Parquet in row groups of 7, a directory of two Parquet shards, a datasets dir)."""
    import datasets

    lines = [json.dumps(r) for r in ROWS]
    jsonl = _jsonl(tmp_path / "m.jsonl", lines[:10] + [""] + lines[10:20] + ["{bad"] + lines[20:])
    parquet = _parquet(tmp_path / "m.parquet", ROWS, 7)
    shards = tmp_path / "repo" / "data"
    shards.mkdir(parents=True)
    _parquet(shards / "train-00000-of-00002.parquet", ROWS[:25], 10)
    _parquet(shards / "train-00001-of-00002.parquet", ROWS[25:], 10)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    return {"jsonl": jsonl, "parquet": parquet, "shards": tmp_path / "repo",
            "hf": tmp_path / "hf"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "shards", "hf"])
def test_indexed_records_equal_loaded_ones(sources, fmt):
    spec = str(sources[fmt])
    skip = fmt == "jsonl"  # its bad line is skipped and counted the same way
    loaded = load_records(spec, "math", skip_bad_records=skip)
    indexed = index_records(spec, "math", skip_bad_records=skip)
    assert indexed.reads == 0  # validating reads nothing into the index
    assert len(indexed) == len(loaded) == 40
    assert list(indexed) == loaded.records
    assert [indexed.where(i) for i in range(len(indexed))] == loaded.where
    assert (indexed.skipped, indexed.skipped_reasons) == (loaded.skipped, loaded.skipped_reasons)
    order = np.random.default_rng(0).permutation(40)  # random access, as a shuffle reads
    assert [indexed[int(i)] for i in order] == [loaded.records[i] for i in order]
    assert indexed[-1] == loaded.records[-1] and indexed[2:4] == loaded.records[2:4]


def test_errors_name_the_line_as_loading_does(sources):
    with pytest.raises(DataError, match=r"m\.jsonl:22: malformed JSON"):
        index_records(str(sources["jsonl"]), "math")
    with pytest.raises(DataError, match=r"m\.jsonl:22: malformed JSON"):
        load_records(str(sources["jsonl"]), "math")


def test_several_specs_concatenate(sources):
    specs = [str(sources["parquet"]), str(sources["shards"])]
    assert list(index_records(specs, "math")) == load_records(specs, "math").records


def test_each_host_reads_only_its_share_and_batches_match_loaded_records(sources):
    tok = CharTokenizer()
    kw = dict(seq_len=160, batch_size=4, packed=False, seed=1, num_epochs=1, shard_count=2)
    loaded = load_records(str(sources["parquet"]), "math").records
    for host in range(2):
        indexed = index_records(str(sources["parquet"]), "math")
        got = list(sft_batches(indexed, tok, "plain", shard_index=host, **kw))
        want = list(sft_batches(loaded, tok, "plain", shard_index=host, **kw))
        assert len(got) == len(want) == 10
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(got, want) for k in a)
        assert indexed.reads == 20  # its half of the 40 records, each read once


def test_the_index_pickles_with_open_handles_and_feeds_worker_processes(sources):
    tok = CharTokenizer()
    indexed = index_records(str(sources["jsonl"]), "math", skip_bad_records=True)
    first = indexed[5]  # opens the file
    copy = pickle.loads(pickle.dumps(indexed))
    assert copy[5] == first and list(copy) == list(indexed)
    kw = dict(seq_len=160, batch_size=4, packed=True, seed=2, num_epochs=1, shard_index=0,
              shard_count=1)
    inline = list(sft_batches(indexed, tok, "plain", **kw))
    workers = list(sft_batches(indexed, tok, "plain", workers=1, **kw))
    assert len(inline) == len(workers) > 0
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(inline, workers) for k in a)
