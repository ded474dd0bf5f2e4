"""Tokenizers behind one small interface (CONTRACTS.md):

    encode(text) -> list[int]   no specials added; special-token strings in the text map to
                                their ids
    decode(ids) -> str
    vocab_size: int; special_tokens: dict[str, int]; eos_ids: tuple[int, ...]; pad_id: int

Three implementations: `Phi4Tokenizer` (tiktoken over a cl100k_base BPE file plus Phi-4's
special-token table, fully offline), `HFTokenizer` (a Hugging Face tokenizer directory, local files
only) and `CharTokenizer` (byte-level toy tokenizer for the demo and tests).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from typing import Protocol, runtime_checkable

from ..errors import UsageError


class TokenizerError(UsageError):
    """A tokenizer could not be built from the given spec or files."""


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    special_tokens: dict[str, int]
    eos_ids: tuple[int, ...]
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


# ------------------------------------------------------------------------------------------ Phi-4
# cl100k_base's pre-tokenisation pattern (tiktoken's openai_public.py).
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
                  r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_NUM_RANKS = 100256
PHI4_VOCAB_SIZE = 100352
BPE_FILE_ENV = "PHI_REASON_CL100K_BPE"

_PHI4_NAMED = {
    "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260, "<|im_start|>": 100264, "<|im_end|>": 100265, "<|im_sep|>": 100266,
    "<|endofprompt|>": 100276,
}
PHI4_THINK_IDS = {"<think>": 100350, "</think>": 100351}
PHI4_PAD_ID = 100349  # <|dummy_85|>: the pad token of the Phi-4(-reasoning) tokenizer configs


def phi4_special_tokens(reasoning: bool = False) -> dict[str, int]:
    """Phi-4's table for ids 100256..100351: the named tokens, every other id `<|dummy_N|>` numbered
    in id order from `<|dummy_0|>` = 100256; the reasoning models rename the last two dummies
    (100350, 100351) to `<think>` / `</think>`."""
    named_ids = set(_PHI4_NAMED.values())
    table = dict(_PHI4_NAMED)
    dummy = 0
    for token_id in range(CL100K_NUM_RANKS, PHI4_VOCAB_SIZE):
        if token_id in named_ids:
            continue
        table[f"<|dummy_{dummy}|>"] = token_id
        dummy += 1
    if reasoning:
        by_id = {v: k for k, v in table.items()}
        for text, token_id in PHI4_THINK_IDS.items():
            del table[by_id[token_id]]
            table[text] = token_id
    return dict(sorted(table.items(), key=lambda kv: kv[1]))


def load_bpe_ranks(bpe_file: str | os.PathLike, expected_sha256: str | None = CL100K_SHA256
                   ) -> dict[bytes, int]:
    """Mergeable ranks from a `.tiktoken` file (base64 token, space, rank per line), checked against
    the published cl100k_base hash so that a wrong or truncated file fails loudly here."""
    from tiktoken.load import load_tiktoken_bpe

    path = pathlib.Path(bpe_file)
    if not path.is_file():
        raise TokenizerError(f"{path}: BPE file not found")
    if expected_sha256 is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected_sha256:
            raise TokenizerError(f"{path}: sha256 {digest} is not cl100k_base's {expected_sha256}")
    return load_tiktoken_bpe(str(path))


class Phi4Tokenizer:
    """The exact Phi-4 tokenizer, offline: tiktoken over cl100k_base ranks plus Phi-4's specials."""

    def __init__(self, bpe_file: str | os.PathLike, reasoning: bool = False,
                 expected_sha256: str | None = CL100K_SHA256):
        import tiktoken

        ranks = load_bpe_ranks(bpe_file, expected_sha256)
        if len(ranks) != CL100K_NUM_RANKS:
            raise TokenizerError(f"{bpe_file}: {len(ranks)} ranks, "
                                 f"cl100k_base has {CL100K_NUM_RANKS}")
        self.name = "phi-4-reasoning" if reasoning else "phi-4"
        self.special_tokens = phi4_special_tokens(reasoning)
        self._encoding = tiktoken.Encoding(name=self.name, pat_str=CL100K_PATTERN,
                                           mergeable_ranks=ranks,
                                           special_tokens=self.special_tokens)
        self.vocab_size = PHI4_VOCAB_SIZE
        self.eos_ids = (self.special_tokens["<|im_end|>"], self.special_tokens["<|endoftext|>"])
        self.pad_id = PHI4_PAD_ID

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        return self._encoding.decode([int(i) for i in ids])


# ------------------------------------------------------------------------------------------ HF dir
class HFTokenizer:
    """A Hugging Face tokenizer directory through `transformers.AutoTokenizer` (local files
    only)."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = pathlib.Path(path)
        try:
            self.hf = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as e:  # transformers raises several unrelated types for a bad dir
            raise TokenizerError(f"{self.path}: cannot load a tokenizer ({e})") from e
        self.name = str(self.path)
        specials = dict(self.hf.get_added_vocab())
        for text in self.hf.all_special_tokens:
            specials.setdefault(text, self.hf.convert_tokens_to_ids(text))
        self.special_tokens = dict(sorted(specials.items(), key=lambda kv: kv[1]))
        self.vocab_size = len(self.hf)
        self.eos_ids = self._eos_ids()
        pad = self.hf.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        self.chat_template = getattr(self.hf, "chat_template", None)

    def _eos_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        generation_config = self.path / "generation_config.json"
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            ids.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.hf.eos_token_id is not None and self.hf.eos_token_id not in ids:
            ids.append(self.hf.eos_token_id)
        if not ids:
            raise TokenizerError(f"{self.path}: tokenizer has no eos token")
        return tuple(int(i) for i in ids)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


# ------------------------------------------------------------------------------------------ char
CHAR_SPECIALS = ("<|pad|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                 "<think>", "</think>")


class CharTokenizer:
    """Byte-level toy tokenizer: ids 0..7 are `CHAR_SPECIALS`, ids 8..263 the 256 UTF-8 byte values,
    so any text round-trips and the vocabulary fits the "tiny" preset (vocab 512). `<think>` and
    `</think>` are single tokens, which keeps the demo's sequences short."""

    def __init__(self):
        self.name = "char"
        self.special_tokens = {text: i for i, text in enumerate(CHAR_SPECIALS)}
        self._byte_offset = len(CHAR_SPECIALS)
        self.vocab_size = self._byte_offset + 256
        self.pad_id = self.special_tokens["<|pad|>"]
        self.eos_ids = (self.special_tokens["<|endoftext|>"],)
        longest_first = sorted(CHAR_SPECIALS, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in longest_first) + ")")
        self._text_of = {i: text.encode() for text, i in self.special_tokens.items()}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            special = self.special_tokens.get(piece)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(b + self._byte_offset for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} outside the char vocabulary "
                                     f"[0, {self.vocab_size})")
            out += self._text_of[i] if i < self._byte_offset else bytes([i - self._byte_offset])
        return out.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------ loader
def load_tokenizer(spec: str, bpe_file: str | os.PathLike | None = None) -> Tokenizer:
    """`spec`: "char" | "phi-4" | "phi-4-reasoning" | a HF tokenizer dir. The Phi-4 specs need the
    cl100k_base BPE file: `bpe_file`, the form "phi-4:/path/cl100k_base.tiktoken", or the
    PHI_REASON_CL100K_BPE environment variable (nothing is downloaded)."""
    name, _, path_in_spec = spec.partition(":") if spec.startswith("phi-4") else (spec, "", "")
    if name == "char":
        return CharTokenizer()
    if name in ("phi-4", "phi-4-reasoning"):
        bpe = bpe_file or path_in_spec or os.environ.get(BPE_FILE_ENV)
        if not bpe:
            raise TokenizerError(
                f"tokenizer {name!r} needs a cl100k_base BPE file: pass bpe_file=, use "
                f"'{name}:/path/cl100k_base.tiktoken' or set {BPE_FILE_ENV}; or give the model's "
                "HF tokenizer directory instead")
        return Phi4Tokenizer(bpe, reasoning=name == "phi-4-reasoning")
    if name in ("phi-4-mini", "phi-4-mini-reasoning"):
        raise TokenizerError(f"tokenizer {name!r} (o200k_base) is not built in: pass the model's "
                             "HF tokenizer directory")
    if pathlib.Path(spec).is_dir():
        return HFTokenizer(spec)
    raise TokenizerError(f"unknown tokenizer spec {spec!r}: expected 'char', 'phi-4', "
                         "'phi-4-reasoning' or an existing HF tokenizer directory")


def completion_text(tokenizer, ids, stop_ids) -> str:
    """Generated ids -> response text, the one rule every caller (eval, generate, RL, Rollout DPO,
    the demo) uses: the stop token that ended the row is not part of the text, and ids past the
    tokenizer's vocabulary carry no text (a model's embedding table is often padded past its
    tokenizer - Phi-4-mini's 200,064 rows, the tiny preset's 512 for the byte tokenizer's 264 - and
    a sampler can draw those ids)."""
    ids = list(ids)
    if ids and ids[-1] in set(stop_ids):
        ids = ids[:-1]
    return tokenizer.decode([t for t in ids if 0 <= t < tokenizer.vocab_size])
