"""Sources and schema adapters: errors name file and line, skip_bad_records counts, formats read
the same records, and MATH answers extracted from solutions equal MATH-500's published answers."""
import json

import pytest

from phi_reason.data.boxed import gsm8k_answer, last_boxed
from phi_reason.data.sources import DataError, load_records, read_records

MATH_ROWS = [
    {"problem": "What is $1+1$?", "solution": "Clearly $1+1=\\boxed{2}$."},
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "We get $\\boxed{\\frac{1}{2}}$."},
    {"problem": "Solve $x^2=4$.", "solution": "So $x=\\boxed{\\pm 2}$ or \\boxed{\\{-2, 2\\}}."},
]


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- boxed / #### extraction
@pytest.mark.parametrize("text, expected", [
    ("$\\boxed{5}$", "5"),
    ("first \\boxed{1} then \\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),        # escaped braces are content
    ("\\fbox{7} is it", "7"),
    ("so $\\boxed 9$.", "9"),
    ("ok \\boxed{3} but then \\boxed{4", "3"),  # an unbalanced last box falls back to the previous
    ("no answer here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_gsm8k_answer():
    assert gsm8k_answer("He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7") == "7"
    assert gsm8k_answer("... #### 1,250") == "1250"
    assert gsm8k_answer("no marker") is None


def test_math_answers_match_math500(shared_math_dir):
    """The 500 MATH-500 problems also appear in math_test5000.jsonl; the answer our adapter extracts
    from that file's solutions equals MATH-500's separately published `answer` field."""
    test5000 = read_records(shared_math_dir / "math_test5000.jsonl", "math")
    by_problem = {r["messages"][0]["content"]: r["answer"] for r in test5000.records}
    math500 = [json.loads(line) for line in open(shared_math_dir / "math500.jsonl")]
    assert len(math500) == 500
    shared = [r for r in math500 if r["problem"] in by_problem]
    assert len(shared) == 500
    mismatches = [(r["answer"], by_problem[r["problem"]]) for r in shared
                  if by_problem[r["problem"]] != r["answer"]]
    assert mismatches == []


def test_gsm8k_file_adapter(shared_math_dir):
    gsm = read_records(shared_math_dir / "gsm8k.jsonl", "gsm8k")
    assert len(gsm) == 1319 and gsm.records[0]["answer"] == "18"
    assert all(a.lstrip("-").replace(".", "").isdigit() for a in (r["answer"] for r in gsm.records))


# ---------------------------------------------------------------- JSONL errors
def test_malformed_json_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl",
                        [json.dumps(MATH_ROWS[0]), "", '{"problem": "x", oops}'])
    with pytest.raises(DataError, match=f"{tmp_path / 'd.jsonl'}:3: malformed JSON"):
        read_records(path, "math")


def test_missing_field_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl",
                        [json.dumps(MATH_ROWS[0]), json.dumps({"problem": "p"})])
    with pytest.raises(DataError, match=f"{tmp_path / 'd.jsonl'}:2: missing field 'solution'"):
        read_records(path, "math")
    no_box = _write_jsonl(tmp_path / "e.jsonl", [json.dumps({"problem": "p", "solution": "4"})])
    with pytest.raises(DataError, match="e.jsonl:1: solution has no balanced"):
        read_records(no_box, "math")


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=f"{path}: no usable records"):
        read_records(path, "math")
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")


def test_skip_bad_records_counts(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        json.dumps(MATH_ROWS[0]), "{not json", json.dumps({"problem": "p"}), "[1, 2]",
        json.dumps(MATH_ROWS[1])])
    out = read_records(path, "math", skip_bad_records=True)
    assert [r["answer"] for r in out.records] == ["2", "\\frac{1}{2}"]
    assert out.where == [f"{path}:1", f"{path}:5"]
    assert out.skipped == 3
    assert [s.split(": ")[0] for s in out.skipped_reasons] == [f"{path}:{i}" for i in (2, 3, 4)]
    all_bad = _write_jsonl(tmp_path / "bad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match=r"no usable records \(2 bad records skipped\)"):
        read_records(all_bad, "math", skip_bad_records=True)


# ---------------------------------------------------------------- schemas
def test_schema_adapters(tmp_path):
    rows = {
        "chat": {"messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "yo"}]},
        "prompt_response": {"prompt": "hi", "response": "yo"},
        "dpo": {"prompt": "q", "chosen": "good", "rejected": "bad"},
        "rl": {"problem": "1+1?", "answer": 2},
    }
    out = {}
    for schema, row in rows.items():
        path = _write_jsonl(tmp_path / f"{schema}.jsonl", [json.dumps(row)])
        out[schema] = read_records(path, schema).records[0]
    qa = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert out["chat"] == {"messages": qa} and out["prompt_response"] == {"messages": qa}
    assert out["dpo"] == {"prompt": [{"role": "user", "content": "q"}], "chosen": "good",
                          "rejected": "bad"}
    assert out["rl"] == {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    no_assistant = _write_jsonl(tmp_path / "c.jsonl",
                                [json.dumps({"messages": [{"role": "user", "content": "x"}]})])
    with pytest.raises(DataError, match="c.jsonl:1: conversation has no assistant message"):
        read_records(no_assistant, "chat")
    bad_role = _write_jsonl(tmp_path / "r.jsonl", [json.dumps(rows["chat"]), json.dumps(
        {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]})])
    with pytest.raises(DataError, match="r.jsonl:2: message 1 must be"):
        read_records(bad_role, "chat")
    with pytest.raises(DataError, match="unknown schema"):
        read_records(no_assistant, "sft")


# ---------------------------------------------------------------- other formats
def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(MATH_ROWS), path)
    out = read_records(path, "math")
    assert [r["answer"] for r in out.records] == ["2", "\\frac{1}{2}", "\\{-2, 2\\}"]
    assert out.where[2] == f"{path}:row 2"
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": "1"}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet:row 0: missing field 'solution'"):
        read_records(tmp_path / "bad.parquet", "math")


def test_array_record_source(tmp_path):
    pytest.importorskip("array_record")
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "math.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for row in MATH_ROWS:
        writer.write(json.dumps(row).encode())
    writer.write(b"\xff not json")
    writer.close()
    out = read_records(path, "math", skip_bad_records=True)
    assert [r["answer"] for r in out.records] == ["2", "\\frac{1}{2}", "\\{-2, 2\\}"]
    assert out.skipped == 1 and out.skipped_reasons[0].startswith(f"{path}:record 3")


def test_datasets_disk_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(MATH_ROWS).save_to_disk(str(tmp_path / "ds"))
    assert [r["answer"] for r in read_records(tmp_path / "ds", "math").records][0] == "2"


def test_load_records_concatenates_sources(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [json.dumps(MATH_ROWS[0])])
    b = _write_jsonl(tmp_path / "b.jsonl", [json.dumps(MATH_ROWS[1]), "{"])
    out = load_records([a, b], "math", skip_bad_records=True)
    assert [r["answer"] for r in out.records] == ["2", "\\frac{1}{2}"]
    assert out.where == [f"{a}:1", f"{b}:1"] and out.skipped == 1


def test_a_cloned_dataset_repo_of_parquet_shards_and_a_glob(tmp_path):
    """A Hugging Face dataset repo as `git clone` leaves it: README, parquet shards per split
    under data/. The directory reads every shard in name order; a glob picks one split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "competition_math"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    for rows, name in ((MATH_ROWS[:2], "train-00000-of-00002"),
                       (MATH_ROWS[2:], "train-00001-of-00002"),
                       (MATH_ROWS[:1], "test-00000-of-00001")):
        pq.write_table(pa.Table.from_pylist(rows), repo / "data" / f"{name}.parquet")
    whole = read_records(repo, "math")
    assert [r["answer"] for r in whole.records] == ["2", "2", "\\frac{1}{2}", "\\{-2, 2\\}"]
    assert whole.where[0].endswith("test-00000-of-00001.parquet:row 0")
    train = read_records(str(repo / "data" / "train-*.parquet"), "math")
    assert [r["answer"] for r in train.records] == ["2", "\\frac{1}{2}", "\\{-2, 2\\}"]
    with pytest.raises(DataError, match="no file matches"):
        read_records(str(repo / "data" / "validation-*.parquet"), "math")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="nor a directory of .parquet / .jsonl shards"):
        read_records(tmp_path / "empty", "math")


def test_a_directory_of_jsonl_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_jsonl(shards / "part-1.jsonl", [json.dumps(MATH_ROWS[1])])
    _write_jsonl(shards / "part-0.jsonl", [json.dumps(MATH_ROWS[0])])
    out = read_records(shards, "math")
    assert [r["answer"] for r in out.records] == ["2", "\\frac{1}{2}"]
