"""`phi-reason generate` end to end on a tiny HF checkpoint with the char tokenizer: the streamed
text and the JSONL output equal what `generate` returns for the same prompt ids; bad prompt files
are rejected with the file and line named."""
import json
import re

import jax
import pytest

from phi_reason import cli
from phi_reason.checkpoint import save_pretrained
from phi_reason.data.tokenizer import load_tokenizer
from phi_reason.engine.sampler import generate
from phi_reason.jobs import generate as generate_job
from phi_reason.jobs.generate import GenerateInputError
from phi_reason.model.config import ModelConfig
from phi_reason.model.params import init_params

CFG = ModelConfig.preset("tiny", initializer_range=0.2, vocab_size=264)  # = char tokenizer
ARGS = ["--tokenizer", "char", "--max-new-tokens", "12", "--temperature", "0.7", "--seed", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    params = init_params(CFG, jax.random.key(0))
    out = tmp_path_factory.mktemp("tiny_hf")
    save_pretrained(CFG, params, str(out / "model"), format="hf")
    return str(out / "model"), params


def expected(params, texts, num_slots):
    tok = load_tokenizer("char")
    ids = [tok.encode(t) for t in texts]
    out = generate(params, CFG, ids, 12, temperature=0.7, seed=4, stop_tokens=tok.eos_ids,
                   num_slots=num_slots)
    return tok, out


def test_single_prompt_streams_the_completion(model_dir, capsys):
    path, params = model_dir
    assert cli.main(["generate", "--model", path, "--prompt", "2+2=", *ARGS]) == 0
    tok, out = expected(params, ["2+2="], 1)
    text = tok.decode([t for t in out.tokens[0] if t not in tok.eos_ids])
    captured = capsys.readouterr()
    assert captured.out == text + "\n"
    assert f"{out.finish_reasons[0]}: {len(out.tokens[0])} tokens" in captured.err


def test_prompts_file_to_jsonl(model_dir, tmp_path):
    path, params = model_dir
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    texts = ["1+1=", "what is 3*4?", "x"]
    src.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert cli.main(["generate", "--model", path, "--prompts", str(src), "--output", str(dst),
                     "--max-rows", "2", *ARGS]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    tok, out = expected(params, texts, 2)
    assert [r["id"] for r in rows] == [0, 1, 2]
    for r, toks, lps, reason in zip(rows, out.tokens, out.logprobs, out.finish_reasons):
        assert r["token_ids"] == toks and r["finish_reason"] == reason
        assert r["num_tokens"] == len(toks)
        assert r["logprob"] == pytest.approx(sum(lps), abs=1e-4)
        assert r["completion"] == tok.decode([t for t in toks if t not in tok.eos_ids])


def test_dtype_flag_samples_with_bf16_weights_and_compute(model_dir, tmp_path):
    """The checkpoint is float32; --dtype bfloat16 loads its weights as bf16 and computes (and
    caches keys/values) in bf16: the same tokens as the engine called on those weights."""
    from phi_reason.engine.paged_sampler import generate_paged

    path, params = model_dir
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    texts = ["1+1=", "what is 3*4?"]
    src.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    assert cli.main(["generate", "--model", path, "--prompts", str(src), "--output", str(dst),
                     "--dtype", "bfloat16", *ARGS]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    tok = load_tokenizer("char")
    bf16 = jax.tree_util.tree_map(lambda w: w.astype("bfloat16"), params)
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    out = generate_paged(bf16, cfg, [tok.encode(t) for t in texts], 12, temperature=0.7, seed=4,
                         stop_tokens=tok.eos_ids)
    assert out.stats["layout"] == "split" and [r["token_ids"] for r in rows] == out.tokens
    assert [r["logprob"] for r in rows] == pytest.approx([sum(x) for x in out.logprobs], abs=1e-4)
    fp32 = [sum(x) for x in expected(params, texts, 2)[1].logprobs]
    assert all(abs(r["logprob"] - f) > 1e-3 for r, f in zip(rows, fp32))  # not the fp32 model


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "ok"}\n{"prompt": 3}\n', r"in.jsonl:2: needs a 'prompt' string"),
    ('{"prompt": "ok"}\nnot json\n', r"in.jsonl:2: invalid JSON"),
    ('\n', r"in.jsonl: no prompts"),
])
def test_bad_prompt_file_names_file_and_line(model_dir, tmp_path, content, match, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    with pytest.raises(GenerateInputError, match=match):
        generate_job.main(model_dir[0], prompts=str(src))
    assert cli.main(["generate", "--model", model_dir[0], "--prompts", str(src), *ARGS]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_streamer_waits_for_split_characters_and_flushes_broken_ones():
    """A character split across tokens is printed whole once complete; bytes that never complete
    one (any byte sequence can come out of a model) are printed as U+FFFD at the end, so the
    streamed text always equals the decoded completion."""
    import io

    from phi_reason.jobs.generate import _Streamer

    tok = load_tokenizer("char")
    h, e1, e2 = tok.encode("hé")  # "é" is two UTF-8 bytes, one token each
    out = io.StringIO()
    s = _Streamer(tok, stops=(), out=out)
    s(0, [h, e1])
    assert out.getvalue() == ""  # ends in half of "é": held back
    s(0, [e2])
    assert out.getvalue() == "hé"
    s(0, [h, e1])
    assert out.getvalue() == "hé"
    s.finish()  # the last byte never completes a character
    assert out.getvalue() == "héh\ufffd" == tok.decode([h, e1, e2, h, e1])
