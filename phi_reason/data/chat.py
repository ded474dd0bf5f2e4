"""Chat formats: a conversation -> token ids and a loss mask.

The mask is 1 exactly on the assistant's tokens (its content and its end token) and 0 on system/user
turns and on every role header. It is built by construction: each message is rendered as three
separately tokenised segments (header, content, end) whose mask value is known when they are made;
nothing searches the rendered string afterwards.

Formats (PHI4_FACTS section 3):
  phi-4                 <|im_start|>{role}<|im_sep|>{content}<|im_end|> ...
                        <|im_start|>assistant<|im_sep|>
  phi-4-reasoning       phi-4 with its fixed system prompt first (unless the conversation has one)
  phi-4-mini            <|{role}|>{content}<|end|> ... <|assistant|>; a finished conversation
                        ends with <|endoftext|> (the published template appends eos_token
                        without a generation prompt)
  phi-4-mini-reasoning  phi-4-mini with its fixed system prompt
  plain                 no markup: a non-assistant turn is its text and "\n"; an assistant turn
                        is its text and the tokenizer's eos (for the char tokenizer / demo)
"""
from __future__ import annotations

import dataclasses

from ..errors import UsageError

ROLES = ("system", "user", "assistant")

# Phi-4-reasoning's fixed system message, reconstructed from the published model card and chat
# template. A checkpoint's tokenizer_config.json chat template overrides it: see
# `system_prompt_from_template` (callers pass the result as `system=`).
PHI4_REASONING_SYSTEM = (
    "You are Phi, a language model trained by Microsoft to help users. Your role as an assistant "
    "involves thoroughly exploring questions through a systematic thinking process before "
    "providing the final precise and accurate solutions. This requires engaging in a "
    "comprehensive cycle of "
    "analysis, summarizing, exploration, reassessment, reflection, backtracing, and iteration to "
    "develop well-considered thinking process. Please structure your response into two main "
    "sections: Thought and Solution using the specified format: <think> {Thought section} </think> "
    "{Solution section}. In the Thought section, detail your reasoning process in steps. Each step "
    "should include detailed considerations such as analysing questions, summarizing relevant "
    "findings, brainstorming new ideas, verifying the accuracy of the current steps, refining any "
    "errors, and revisiting previous steps. In the Solution section, based on various attempts, "
    "explorations, and reflections from the Thought section, systematically present the final "
    "solution that you deem correct. The Solution section should be logical, accurate, and concise "
    "and detail necessary steps needed to reach the conclusion. Now, try to solve the following "
    "question through the above guidelines:")
PHI4_MINI_REASONING_SYSTEM = "Your name is Phi, an AI math expert developed by Microsoft."

EOS = object()  # placeholder for "the tokenizer's first eos id" (plain format)


class ChatFormatError(UsageError):
    """A conversation or format that cannot be rendered."""


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    name: str
    headers: dict            # role -> text before the message content
    turn_ends: dict          # role -> text (or EOS) after the message content
    conversation_end: str    # after the last message of a finished conversation ("" for none)
    default_system: str | None
    stop_tokens: tuple       # special-token strings that end generation (() = tokenizer eos ids)
    required_specials: tuple  # special-token strings the tokenizer must know


def _im(role):
    return f"<|im_start|>{role}<|im_sep|>"


_PHI4 = dict(headers={r: _im(r) for r in ROLES}, turn_ends={r: "<|im_end|>" for r in ROLES},
             conversation_end="", stop_tokens=("<|im_end|>",),
             required_specials=("<|im_start|>", "<|im_sep|>", "<|im_end|>"))
_MINI = dict(headers={r: f"<|{r}|>" for r in ROLES}, turn_ends={r: "<|end|>" for r in ROLES},
             conversation_end="<|endoftext|>", stop_tokens=("<|end|>", "<|endoftext|>"),
             required_specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                "<|endoftext|>"))
FORMATS = {
    "phi-4": ChatFormat("phi-4", default_system=None, **_PHI4),
    "phi-4-reasoning": ChatFormat("phi-4-reasoning", default_system=PHI4_REASONING_SYSTEM, **_PHI4),
    "phi-4-mini": ChatFormat("phi-4-mini", default_system=None, **_MINI),
    "phi-4-mini-reasoning": ChatFormat("phi-4-mini-reasoning",
                                       default_system=PHI4_MINI_REASONING_SYSTEM, **_MINI),
    "plain": ChatFormat("plain", headers={r: "" for r in ROLES},
                        turn_ends={"system": "\n", "user": "\n", "assistant": EOS},
                        conversation_end="", default_system=None, stop_tokens=(),
                        required_specials=()),
}


def get_format(fmt: str) -> ChatFormat:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ChatFormatError(f"unknown chat format {fmt!r}; "
                              f"expected one of {sorted(FORMATS)}") from None


def _check_tokenizer(chat: ChatFormat, tokenizer) -> None:
    missing = [t for t in chat.required_specials if t not in tokenizer.special_tokens]
    if missing:
        raise ChatFormatError(f"chat format {chat.name!r} needs special tokens {missing} that "
                              f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} does not have")


def _validated(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError(f"messages must be a non-empty list of {{role, content}}, "
                              f"got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"message {i}: expected a dict with 'role' and 'content', "
                                  f"got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ChatFormatError(f"message {i}: role {m['role']!r} is not one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"message {i}: content must be a string, "
                                  f"got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _with_system(messages: list[dict], chat: ChatFormat, system: str | None) -> list[dict]:
    has_system = messages[0]["role"] == "system"
    if system is not None:
        return [{"role": "system", "content": system}] + (messages[1:] if has_system else messages)
    if chat.default_system is not None and not has_system:
        return [{"role": "system", "content": chat.default_system}] + messages
    return messages


def _piece_ids(piece, tokenizer) -> list[int]:
    return [tokenizer.eos_ids[0]] if piece is EOS else tokenizer.encode(piece)


def _render(messages, tokenizer, chat: ChatFormat, system, finished: bool):
    ids: list[int] = []
    mask: list[int] = []
    for m in _with_system(_validated(messages), chat, system):
        target = 1 if m["role"] == "assistant" else 0
        for piece, value in ((chat.headers[m["role"]], 0), (m["content"], target),
                             (chat.turn_ends[m["role"]], target)):
            piece_ids = _piece_ids(piece, tokenizer)
            ids += piece_ids
            mask += [value] * len(piece_ids)
    if finished and chat.conversation_end:
        end_ids = tokenizer.encode(chat.conversation_end)
        ids += end_ids
        mask += [1 if messages[-1]["role"] == "assistant" else 0] * len(end_ids)
    return ids, mask


def render_conversation(messages, tokenizer, fmt: str, system: str | None = None
                        ) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on assistant content and its end tokens) of a whole conversation.
    Reasoning formats insert their fixed system prompt unless the conversation starts with one;
    `system` replaces any system prompt."""
    chat = get_format(fmt)
    _check_tokenizer(chat, tokenizer)
    return _render(messages, tokenizer, chat, system, finished=True)


def render_prompt(messages_or_question, tokenizer, fmt: str, system: str | None = None
                  ) -> list[int]:
    """Ids of a generation prompt: the conversation so far followed by the assistant header."""
    chat = get_format(fmt)
    _check_tokenizer(chat, tokenizer)
    messages = ([{"role": "user", "content": messages_or_question}]
                if isinstance(messages_or_question, str) else messages_or_question)
    ids, _ = _render(messages, tokenizer, chat, system, finished=False)
    return ids + _piece_ids(chat.headers["assistant"], tokenizer)


def render_completion(prompt_ids: list[int], completion: str, tokenizer, fmt: str
                      ) -> tuple[list[int], list[int]]:
    """A prompt from `render_prompt` followed by an assistant completion and its end token(s):
    ids and loss mask (1 on the completion and end). Used for preference pairs and rollouts."""
    chat = get_format(fmt)
    completion_ids = (tokenizer.encode(completion)
                      + _piece_ids(chat.turn_ends["assistant"], tokenizer))
    if chat.conversation_end:
        completion_ids += tokenizer.encode(chat.conversation_end)
    return list(prompt_ids) + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def stop_ids(fmt: str, tokenizer) -> tuple[int, ...]:
    """Token ids that end an assistant turn in this format."""
    chat = get_format(fmt)
    if not chat.stop_tokens:
        return tuple(tokenizer.eos_ids)
    _check_tokenizer(chat, tokenizer)
    return tuple(tokenizer.special_tokens[t] for t in chat.stop_tokens)


def system_prompt_from_template(hf_tokenizer, fmt: str) -> str | None:
    """The default system prompt a checkpoint's chat template inserts (rendering it for a
    one-message conversation and reading the system turn), or None when the template inserts none.
    This lets a checkpoint's tokenizer_config.json override the shipped default texts above."""
    chat = get_format(fmt)
    if getattr(hf_tokenizer, "chat_template", None) is None:
        return None
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False,
                                            add_generation_prompt=True)
    header, end = chat.headers["system"], chat.turn_ends["system"]
    start = text.find(header)
    if not header or start == -1:
        return None
    stop = text.find(end, start + len(header))
    return text[start + len(header):stop] if stop != -1 else None
