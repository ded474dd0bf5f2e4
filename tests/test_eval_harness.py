"""Benchmark harness: loading the real files, the sample -> grade -> report path with an injected
generate function, and the `grade` / `eval` CLI wiring."""
import json
import re

import pytest

from phi_reason import cli
from phi_reason.errors import UsageError
from phi_reason.eval.benchmarks import evaluate, load_benchmark
from phi_reason.jobs import eval as eval_job
from phi_reason.jobs.eval import guess_chat_format

FILES = {"math500": "math500.jsonl", "math": "math_test5000.jsonl", "gsm8k": "gsm8k.jsonl",
         "aime24": "aime24.jsonl", "aime25": "aime25.jsonl", "amc23": "amc23.jsonl",
         "minerva": "minerva_math.jsonl", "olympiadbench": "olympiadbench.jsonl"}


def test_load_real_benchmarks(shared_math_dir):
    sizes = {"math500": 500, "math": 5000, "gsm8k": 1319, "aime24": 30, "aime25": 30,
             "amc23": 40, "minerva": 272, "olympiadbench": 675}
    loaded = {name: load_benchmark(name, shared_math_dir / f) for name, f in FILES.items()}
    for name, problems in loaded.items():
        assert len(problems) == sizes[name], name
        assert len({p["id"] for p in problems}) == len(problems), name
        assert all(p["problem"] and p["answer"] for p in problems), name
    m5 = loaded["math500"][0]
    assert m5["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert (m5["subject"], m5["level"]) == ("Precalculus", 2)
    assert loaded["math"][0]["level"] == 3 and loaded["math"][0]["subject"] == "Algebra"
    assert loaded["gsm8k"][0]["answer"] == "18"          # from "... #### 18"
    assert loaded["amc23"][0]["answer"] == "27"          # float 27.0 in the file
    assert loaded["aime25"][0]["answer"] == "70"
    raw = json.loads((shared_math_dir / "olympiadbench.jsonl").open().readline())
    assert (loaded["olympiadbench"][0]["answer"]
            == ", ".join(a.strip("$") for a in raw["final_answer"]))


def test_load_errors_name_file_and_row(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n"
                 + json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"b\.jsonl: row 2: missing key 'answer'"):
        load_benchmark("math500", f)
    f.write_text('{"problem": "1+1?", "answer": "2"}\n{not json\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: invalid JSON"):
        load_benchmark("math500", f)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mmlu", f)
    with pytest.raises(UsageError, match=r"missing\.jsonl does not exist"):
        load_benchmark("math500", tmp_path / "missing.jsonl")


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"problem": ["What is 6*7?", "Solve x+1=3"], "answer": ["42", "2"],
                      "subject": ["Arithmetic", "Algebra"], "level": [1, 2],
                      "unique_id": ["p0", "p1"]})
    pq.write_table(table, tmp_path / "m.parquet")
    problems = load_benchmark("math500", tmp_path / "m.parquet")
    assert ([(p["id"], p["answer"], p["level"]) for p in problems]
            == [("p0", "42", 1), ("p1", "2", 2)])


PROBLEMS = [
    {"id": "p0", "problem": "What is 1/2 + 0?", "answer": "\\frac{1}{2}", "subject": "Algebra",
     "level": 1},
    {"id": "p1", "problem": "Solve x^2=4, x>0.", "answer": "2", "subject": "Algebra", "level": 2},
    {"id": "p2", "problem": "Interval?", "answer": "(3,4]", "subject": "Geometry", "level": 2},
]
# Per problem, 3 samples: (response text, num_tokens, finish_reason); verdicts decided by hand.
RESPONSES = {
    "What is 1/2 + 0?": [("<think>easy</think> \\boxed{0.5}", 10, "stop"),            # correct
                         ("so \\boxed{\\frac{2}{4}}", 12, "stop"),                     # correct
                         ("I think \\boxed{1}", 8, "stop")],                            # wrong
    "Solve x^2=4, x>0.": [("\\boxed{-2}", 30, "stop"),                                  # wrong
                          ("\\boxed{-2}", 31, "stop"),                                  # wrong
                          ("long thinking without end", 64, "length")],                 # no answer
    "Interval?": [("\\boxed{(3,4]}", 20, "stop"),                                       # correct
                  ("\\boxed{[3,4]}", 21, "stop"),                                       # wrong
                  ("\\boxed{(3, 4]}", 22, "stop")],                                     # correct
}


def fake_generate(questions, samples):
    assert samples == 3
    return [{"text": t, "num_tokens": n, "finish_reason": r}
            for q in questions for t, n, r in RESPONSES[q][:samples]]


def test_evaluate_with_injected_generator(tmp_path):
    summary = evaluate(PROBLEMS, fake_generate, samples=3, out=tmp_path, title="fake",
                       settings={"temperature": 0.8})
    assert summary["pass@1"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    assert summary["maj@3"] == pytest.approx(2 / 3)        # p0 and p2 majorities are correct
    assert summary["pass@k"][2] == pytest.approx((1 + 0 + 1) / 3)  # p0, p2: no all-wrong pair
    assert summary["pass@k"][3] == pytest.approx(2 / 3)
    assert summary["truncation_rate"] == pytest.approx(1 / 9)
    assert summary["mean_tokens_correct"] == pytest.approx((10 + 12 + 20 + 22) / 4)
    assert summary["status_counts"] == {"ok": 8, "no_answer": 1}
    assert summary["by_level"]["2"]["pass@1"] == pytest.approx(1 / 3)

    lines = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 9
    assert [r["correct"] for r in lines] == [True, True, False, False, False, False, True, False,
                                             True]
    assert lines[0]["extracted"] == "0.5" and lines[5]["status"] == "no_answer"
    assert lines[5]["finish_reason"] == "length" and lines[0]["gold"] == "\\frac{1}{2}"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["pass@1"] == pytest.approx(summary["pass@1"])
    report = (tmp_path / "report.md").read_text()
    assert "| pass@1 (mean over K) | 44.4% |" in report
    assert "| maj@3 | 66.7% |" in report and "## By subject" in report
    for png in ("accuracy_by_level.png", "length_hist.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temp files


def test_generate_fn_count_is_checked(tmp_path):
    with pytest.raises(ValueError, match="returned 1 completions"):
        evaluate(PROBLEMS, lambda q, s: [{"text": "", "num_tokens": 0, "finish_reason": "stop"}],
                 samples=1, out=tmp_path, title="x")


def test_guess_chat_format():
    assert guess_chat_format("/ckpt/Phi-4-mini-reasoning") == "phi-4-mini-reasoning"
    assert guess_chat_format("/ckpt/phi-4-reasoning-plus") == "phi-4-reasoning"
    assert guess_chat_format("/ckpt/Phi-4-mini-instruct") == "phi-4-mini"
    assert guess_chat_format("/ckpt/phi-4") == "phi-4"


def test_eval_cli_wiring(tmp_path, monkeypatch):
    data = tmp_path / "m.jsonl"
    data.write_text("".join(json.dumps({"problem": p["problem"], "answer": p["answer"],
                                        "subject": p["subject"], "level": p["level"],
                                        "unique_id": p["id"]}) + "\n" for p in PROBLEMS))
    seen = {}

    def fake_model_generate_fn(model, tokenizer, chat_format, temperature, top_p, max_new_tokens,
                               seed, mesh, dtype, max_rows, progress):
        seen.update(model=model, temperature=temperature, top_p=top_p, seed=seed,
                    max_new_tokens=max_new_tokens, dtype=dtype, max_rows=max_rows)
        return fake_generate, "phi-4-reasoning"

    monkeypatch.setattr(eval_job, "model_generate_fn", fake_model_generate_fn)
    rc = cli.main(["eval", "--model", "/ckpt/phi-4-reasoning", "--benchmark", "math500",
                   "--data", str(data), "--out", str(tmp_path / "out"), "--samples", "3",
                   "--limit", "2", "--max-new-tokens", "64", "--dtype", "bfloat16",
                   "--max-rows", "4"])
    assert rc == 0
    assert seen == {"model": "/ckpt/phi-4-reasoning", "temperature": 0.8, "top_p": 0.95, "seed": 0,
                    "max_new_tokens": 64, "dtype": "bfloat16", "max_rows": 4}
    lines = (tmp_path / "out" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 6  # --limit 2 problems x 3 samples
    assert "| temperature | 0.8 |" in (tmp_path / "out" / "report.md").read_text()


def test_grade_cli(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [{"prediction": "<think>a</think> \\boxed{\\frac{1}{2}}", "gold": "0.5", "id": 1},
            {"prediction": "\\boxed{3}", "gold": "Blah #### 4", "id": 2},
            {"prediction": "<think>never closed \\boxed{5}", "gold": "5", "id": 3}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert cli.main(["grade", "--input", str(src), "--output", str(out), "--mode", "reward",
                     "--timeout", "5", "--workers", "2"]) == 0
    graded = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(g["id"], g["correct"], g["status"]) for g in graded] == [
        (1, True, "ok"), (2, False, "no_answer"), (3, False, "no_answer")]
    assert (graded[0]["extracted"] == "\\frac{1}{2}"
            and graded[0]["prediction"] == rows[0]["prediction"])
    # eval mode to stdout: the second row now has an answer (no think block needed)
    assert cli.main(["grade", "--input", str(src)]) == 0
    stdout = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(g["correct"], g["status"], g["extracted"]) for g in stdout] == [
        (True, "ok", "\\frac{1}{2}"), (False, "ok", "3"), (True, "ok", "5")]


def test_grade_cli_bad_input(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prediction": "x", "gold": "1"}) + "\n"
                   + json.dumps({"pred": "x"}) + "\n")
    assert cli.main(["grade", "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert re.search(r"error: .*in\.jsonl:2: missing key 'prediction'", capsys.readouterr().err)
    assert not (tmp_path / "o.jsonl").exists()


def test_model_generate_fn_wiring(monkeypatch):
    """The checkpoint path with the sampler and checkpoint loader faked (a real run needs a model):
    prompts are the chat-format renderings repeated K times, stop tokens are passed and stripped
    from the text but counted in num_tokens, and sampling settings reach the sampler."""
    import phi_reason.engine.paged_sampler as paged_sampler
    import phi_reason.engine.sampler as sampler
    from phi_reason.data.chat import render_prompt, stop_ids
    from phi_reason.data.tokenizer import load_tokenizer

    tok = load_tokenizer("char")
    stops = tuple(stop_ids("plain", tok))
    calls = {}

    def fake_generate(params, cfg, prompts, max_new_tokens, **kw):
        calls.update(prompts=prompts, max_new_tokens=max_new_tokens, **kw)
        # 300 is past the char tokenizer's 264 ids (the tiny model's table has 512): no text
        toks = [tok.encode("\\boxed{2}") + [300, stops[0]], tok.encode("\\boxed{3") + [511]]
        return sampler.GenerateOutput(tokens=[toks[i % 2] for i in range(len(prompts))],
                                      logprobs=[[] for _ in prompts],
                                      finish_reasons=["stop", "length"] * (len(prompts) // 2))

    loaded = {}
    monkeypatch.setattr(eval_job, "load_inference_model",
                        lambda path, dtype, mesh: loaded.update(dtype=dtype) or ("cfg", "params"))
    monkeypatch.setattr(paged_sampler, "generate_paged", fake_generate)
    fn, fmt = eval_job.model_generate_fn("/ckpt/x", tokenizer="char", chat_format="plain",
                                         temperature=0.8, top_p=0.95, max_new_tokens=16, seed=5,
                                         dtype="bfloat16", max_rows=3)
    out = fn(["1+1?", "1+2?"], 2)
    assert fmt == "plain"
    expected_prompts = [render_prompt(q, tok, "plain") for q in ("1+1?", "1+2?") for _ in range(2)]
    assert calls["prompts"] == expected_prompts
    assert (calls["temperature"], calls["top_p"], calls["seed"], calls["max_new_tokens"]) == (
        0.8, 0.95, 5, 16)
    assert calls["num_slots"] == 3 and loaded["dtype"] == "bfloat16"
    assert tuple(calls["stop_tokens"]) == stops
    assert out[0] == {"text": "\\boxed{2}", "num_tokens": len("\\boxed{2}") + 2,
                      "finish_reason": "stop"}
    assert out[1] == {"text": "\\boxed{3", "num_tokens": len("\\boxed{3") + 1,
                      "finish_reason": "length"}
