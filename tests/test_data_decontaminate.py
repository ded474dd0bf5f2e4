"""Decontamination: the n-gram boundary (12 shared words kept, 13 removed), normalisation, short
eval problems, field selection, the CLI's outputs and report, and atomic writes on failure."""
import json

import pytest

from phi_reason.cli import main as cli_main
from phi_reason.data.decontaminate import decontaminate, normalize_words, record_text
from phi_reason.data.sources import DataError

EVAL_PROBLEM = ("Let a and b be the roots of x^2 - 5x + 6 = 0. Find the value of a^3 + b^3 "
                "when both are positive integers.")
WORDS = normalize_words(EVAL_PROBLEM)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_normalize_words():
    assert (normalize_words("What is $2+2$?  Answer:\\boxed{4}")
            == ["what", "is", "2", "2", "answer", "boxed", "4"])
    assert len(WORDS) >= 20


def test_ngram_boundary_and_normalisation(tmp_path):
    eval_file = _jsonl(tmp_path / "eval.jsonl",
                       [{"problem": "unrelated short"}, {"problem": EVAL_PROBLEM}])
    twelve = " ".join(WORDS[3:15])
    thirteen = " ".join(WORDS[3:16])
    train = _jsonl(tmp_path / "train.jsonl", [
        {"problem": f"Consider this: {twelve}. Then stop."},    # 12 shared words: kept
        {"problem": f"Consider this: {thirteen}. Then stop."},  # 13 shared words: removed
        # same text, other case/spacing
        {"problem": EVAL_PROBLEM.upper().replace(" ", "  ").replace("^", " ^ ")},
        {"question": "Something else entirely about triangles and circles and their areas today."},
    ])
    kept, removed = decontaminate(train, [eval_file], ngram=13)
    assert [json.loads(k).get("problem", "")[:14] for k in kept] == ["Consider this:", ""]
    assert [r["line"] for r in removed] == [2, 3]
    assert all(r["eval"] == f"{eval_file}:2" for r in removed)
    assert removed[0]["ngram"].split() == WORDS[3:16]
    # with 12-grams the first record is contaminated too
    _, removed12 = decontaminate(train, [eval_file], ngram=12)
    assert [r["line"] for r in removed12] == [1, 2, 3]


def test_short_eval_problems(tmp_path):
    eval_file = _jsonl(tmp_path / "eval.jsonl",
                       [{"question": "Compute 17 times 23 exactly."},  # 5 words
                        {"question": "Compute 3."}])                  # 2 words
    train = _jsonl(tmp_path / "train.jsonl",
                   [{"prompt": "Please compute 17 times 23 exactly, thanks."},
                    {"prompt": "Compute 3 more things."}])
    kept, removed = decontaminate(train, [eval_file])
    # two-word problems are not matched
    assert [r["line"] for r in removed] == [1] and len(kept) == 1


def test_text_fields_and_messages(tmp_path):
    chat = {"messages": [{"role": "system", "content": "sys"},
                         {"role": "user", "content": EVAL_PROBLEM},
                         {"role": "assistant", "content": "5"}]}
    assert record_text(chat, "x") == EVAL_PROBLEM
    assert record_text({"prompt": [{"role": "user", "content": "hi"}]}, "x") == "hi"
    assert record_text({"problem": "p", "body": "b"}, "x", field="body") == "b"
    with pytest.raises(DataError, match="f.jsonl:4: no text field 'body'"):
        record_text({"problem": "p"}, "f.jsonl:4", field="body")
    eval_file = _jsonl(tmp_path / "eval.jsonl", [{"problem": EVAL_PROBLEM}])
    train = _jsonl(tmp_path / "train.jsonl",
                   [chat, {"messages": [{"role": "user", "content": "hello"}]}])
    kept, removed = decontaminate(train, [eval_file])
    assert [r["line"] for r in removed] == [1] and len(kept) == 1  # chat records: their user turns
    # --field applies to train and eval alike: a train record without it is an error naming its line
    body_eval = _jsonl(tmp_path / "body.jsonl", [{"body": EVAL_PROBLEM}])
    with pytest.raises(DataError, match=f"{train}:1: no text field 'body'"):
        decontaminate(train, [body_eval], field="body")


def test_cli_writes_kept_lines_and_report(tmp_path, capsys):
    eval_a = _jsonl(tmp_path / "a.jsonl", [{"problem": EVAL_PROBLEM}])
    eval_b = _jsonl(tmp_path / "b.jsonl",
                    [{"question": "How many positive divisors does the number "
                                  "three hundred and sixty have in total?"}])
    lines = [json.dumps({"problem": "Clean problem number one about apples and oranges "
                                    "and pears."}),
             json.dumps({"problem": "Copy: " + EVAL_PROBLEM, "solution": "..."}),
             json.dumps({"problem": "how many positive divisors does the number three hundred and "
                                    "sixty have in total? explain"}),
             json.dumps({"problem": "Clean problem number two."}, indent=None,
                        separators=(",", ":"))]
    train = _jsonl(tmp_path / "train.jsonl", lines)
    out = tmp_path / "out" / "clean.jsonl"
    rc = cli_main(["decontaminate", "--train", str(train), "--eval", str(eval_a), str(eval_b),
                   "--out", str(out)])
    assert rc == 0
    assert out.read_text() == lines[0] + "\n" + lines[3] + "\n"  # kept lines byte-for-byte
    report = [json.loads(line) for line in
              (tmp_path / "out" / "clean.jsonl.removed.jsonl").read_text().splitlines()]
    assert [(r["line"], r["eval"]) for r in report] == [(2, f"{eval_a}:1"), (3, f"{eval_b}:1")]
    printed = capsys.readouterr().out
    assert "kept 2 of 4" in printed and "removed 2" in printed
    assert f"1 matched {eval_a}" in printed and f"1 matched {eval_b}" in printed
    assert (sorted(p.name for p in out.parent.iterdir())
            == ["clean.jsonl", "clean.jsonl.removed.jsonl"])


def test_bad_input_leaves_no_output(tmp_path, capsys):
    eval_file = _jsonl(tmp_path / "eval.jsonl", [{"problem": EVAL_PROBLEM}])
    train = _jsonl(tmp_path / "train.jsonl", [{"problem": "fine"}, "{broken"])
    out = tmp_path / "clean.jsonl"
    with pytest.raises(DataError, match=f"{train}:2: malformed JSON"):
        decontaminate(train, [eval_file])
    assert cli_main(["decontaminate", "--train", str(train), "--eval", str(eval_file),
                     "--out", str(out)]) == 2
    assert f"error: {train}:2: malformed JSON" in capsys.readouterr().err
    bad_eval = _jsonl(tmp_path / "bad_eval.jsonl", [{"answer": "3"}])
    with pytest.raises(DataError, match="bad_eval.jsonl:1: no text field"):
        decontaminate(_jsonl(tmp_path / "t2.jsonl", [{"problem": "x"}]), [bad_eval])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=f"{empty}: empty file"):
        decontaminate(empty, [eval_file])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad_eval.jsonl", "empty.jsonl", "eval.jsonl", "t2.jsonl", "train.jsonl"]
