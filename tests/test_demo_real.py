"""`phi-reason demo --model DIR`: MATH-500 problems through a (tiny, random) HF checkpoint on disk,
with a byte-level HF tokenizer carrying Phi-4-mini's special tokens; checks the transcript/score
plumbing end to end (the random model's answers are of course wrong)."""
import json

import jax
import pytest
from byte_tokenizer import byte_level_tokenizer

from phi_reason import ModelConfig, init_params
from phi_reason.checkpoint import save_pretrained
from phi_reason.demo_real import run_real_model

SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>",
            "</think>"]


@pytest.fixture(scope="module")
def mini_reasoning_dir(tmp_path_factory):
    tok = byte_level_tokenizer(SPECIALS)
    root = tmp_path_factory.mktemp("models")
    tok_dir = root / "tokenizer"
    tok.save_pretrained(tok_dir)
    cfg = ModelConfig.preset("tiny", vocab_size=len(tok),
                             eos_token_id=tok.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"]))
    model_dir = root / "tiny-mini-reasoning"  # the name selects the phi-4-mini-reasoning format
    save_pretrained(cfg, init_params(cfg, jax.random.key(0)), str(model_dir), format="hf",
                    tokenizer_from=str(tok_dir))
    return model_dir


def test_demo_with_real_checkpoint_prints_transcripts_and_score(mini_reasoning_dir, tmp_path,
                                                                capsys):
    data = tmp_path / "math500.jsonl"
    rows = [{"problem": "What is $1+1$?", "answer": "2", "subject": "Algebra", "level": 1,
             "unique_id": "a"},
            {"problem": "What is $2\\cdot 3$?", "answer": "6", "subject": "Algebra", "level": 1,
             "unique_id": "b"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = run_real_model(str(mini_reasoning_dir), str(data), num_problems=2, max_new_tokens=8,
                        out=str(tmp_path / "out"))
    assert rc == 0
    text = capsys.readouterr().out
    assert "chat format phi-4-mini-reasoning" in text
    assert text.count("problem: ") == 2 and "What is $1+1$?" in text
    assert "score: pass@1 = 0.0" in text  # random weights: wrong (graded, not crashed)
    assert (tmp_path / "out" / "generations.jsonl").exists()


def test_demo_with_real_checkpoint_missing_data(mini_reasoning_dir, tmp_path, capsys):
    assert run_real_model(str(mini_reasoning_dir), str(tmp_path / "nope.jsonl")) == 2
    assert "not found" in capsys.readouterr().err
