"""`phi-reason generate`: sample completions from a checkpoint (I/O around `sampler.generate`).

--prompt TEXT streams the completion to stdout as it is generated. --prompts FILE.jsonl reads one
JSON object per line with a "prompt" string or a "messages" list and writes each object back with
"completion", "finish_reason", "num_tokens", "token_ids" and "logprob" (sum over the completion)
added, in input order, to --output (written to a temporary file, renamed when complete) or stdout.
"""
from __future__ import annotations

import json
import sys
from typing import List, Optional

from ..data.tokenizer import completion_text
from ..errors import UsageError
from ..files import atomic_write_text, iter_jsonl
from ..sharding import processes
from .build import job_mesh, load_inference_model
from .completions import ProgressBar, sample

NO_CHAT = (None, "", "none")


class GenerateInputError(UsageError):
    """A bad --prompts file: the message names the file and line."""


def read_prompt_file(path: str) -> List[dict]:
    records = []
    try:
        lines = list(iter_jsonl(path))
    except ValueError as e:
        raise GenerateInputError(str(e)) from None
    for lineno, rec in lines:
        content = rec.get("messages", rec.get("prompt"))
        if isinstance(content, str) or (isinstance(content, list) and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in content)):
            records.append(rec)
        else:
            raise GenerateInputError(
                f"{path}:{lineno}: needs a 'prompt' string or a 'messages' list of "
                "{'role', 'content'} objects")
    if not records:
        raise GenerateInputError(f"{path}: no prompts")
    return records


def encode_prompt(content, tokenizer, chat_format: Optional[str]) -> List[int]:
    """Chat-formatted prompt ids ending with the assistant header, or the raw text's ids."""
    if chat_format in NO_CHAT:
        if not isinstance(content, str):
            raise GenerateInputError("a 'messages' prompt needs --chat-format")
        return tokenizer.encode(content)
    from ..data.chat import render_prompt

    return render_prompt(content, tokenizer, chat_format)


def stop_tokens(cfg, tokenizer, chat_format: Optional[str]) -> tuple:
    if chat_format in NO_CHAT:
        return tuple(dict.fromkeys(tuple(tokenizer.eos_ids) + cfg.stop_token_ids))
    from ..data.chat import stop_ids

    return tuple(stop_ids(chat_format, tokenizer))


class _Streamer:
    """Prints the decoded completion as tokens arrive (re-decoding the whole completion so that
    multi-byte characters split across tokens come out whole)."""

    def __init__(self, tokenizer, stops, out):
        self.tokenizer, self.stops, self.out = tokenizer, set(stops), out
        self.ids: List[int] = []
        self.printed = ""

    def __call__(self, _index, new_ids):
        self.ids.extend(t for t in new_ids if t not in self.stops)
        text = completion_text(self.tokenizer, self.ids, ())
        if not text.endswith("\ufffd"):  # else an incomplete character: wait for its bytes
            self._emit(text)

    def finish(self):
        """Print what is still held back: bytes that never completed a character (a model can
        emit any byte sequence) come out as U+FFFD, as in the final decoded completion."""
        self._emit(completion_text(self.tokenizer, self.ids, ()))

    def _emit(self, text):
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def main(model, prompt=None, prompts=None, output=None, chat_format=None, tokenizer=None,
         max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, seed=0, max_rows=None,
         dtype="auto", mesh=None, progress=True) -> int:
    from ..data.tokenizer import load_tokenizer

    if (prompt is None) == (prompts is None):
        raise GenerateInputError("give exactly one of --prompt and --prompts")
    records = [{"prompt": prompt}] if prompt is not None else read_prompt_file(prompts)
    mesh = job_mesh(mesh)
    cfg, params = load_inference_model(model, dtype, mesh)
    tok = load_tokenizer(tokenizer or model)
    lead = processes.is_lead()  # under several processes sampling is collective, output once
    ids = []
    for i, rec in enumerate(records):
        try:
            ids.append(encode_prompt(rec.get("messages", rec.get("prompt")), tok, chat_format))
        except GenerateInputError as e:
            raise GenerateInputError(f"{prompts}: record {i + 1}: {e}") from None
    stops = stop_tokens(cfg, tok, chat_format)
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, num_slots=max_rows,
              mesh=mesh)
    if prompt is not None:
        streamer = _Streamer(tok, stops, sys.stdout) if lead else None
        out = sample(params, cfg, tok, ids, stops, max_new_tokens, on_tokens=streamer, **kw)
        if lead:
            streamer.finish()
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(f"[{out.finish_reasons[0]}: {len(out.tokens[0])} tokens]", file=sys.stderr)
        return 0
    with ProgressBar("generate", progress and lead and output is not None) as bar:
        out = sample(params, cfg, tok, ids, stops, max_new_tokens, on_progress=bar, **kw)
    if not lead:
        return 0
    lines = []
    for rec, text, toks, lps, reason in zip(records, out.texts, out.tokens, out.logprobs,
                                            out.finish_reasons):
        result = dict(rec, completion=text, finish_reason=reason, num_tokens=len(toks),
                      token_ids=toks, logprob=float(sum(lps)))
        lines.append(json.dumps(result, ensure_ascii=False) + "\n")
    if output:
        atomic_write_text(output, "".join(lines))
    else:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    return 0
