"""`phi-reason eval`: a checkpoint through a math benchmark - the model side (checkpoint, chat
format, sampler) of `phi_reason.eval.benchmarks.evaluate`, which loads, grades and reports."""
from __future__ import annotations

import pathlib

from ..data.tokenizer import completion_text
from ..eval.benchmarks import (
    REASONING_TEMPERATURE,
    REASONING_TOP_P,
    evaluate,
    load_benchmark,
    sample_responses,
)
from ..sharding import processes
from .build import job_mesh


def guess_chat_format(model_path) -> str:
    """Chat format from the checkpoint's directory name (pass --chat-format to override)."""
    name = pathlib.Path(model_path).name.lower()
    mini, reasoning = "mini" in name, "reason" in name
    return {(True, True): "phi-4-mini-reasoning", (True, False): "phi-4-mini",
            (False, True): "phi-4-reasoning", (False, False): "phi-4"}[(mini, reasoning)]


def model_generate_fn(model, tokenizer=None, chat_format=None, temperature=REASONING_TEMPERATURE,
                      top_p=REASONING_TOP_P, max_new_tokens=32768, seed=0, mesh=None):
    """A generate_fn backed by a checkpoint, the chat format and the JAX sampler (on `mesh`, with
    the weights loaded into its shardings, when given)."""
    from ..checkpoint import detect_format, load_pretrained
    from ..data.chat import render_prompt, stop_ids
    from ..data.tokenizer import load_tokenizer
    from ..engine.sampler import generate

    detect_format(model)  # a missing or unreadable --model is named before anything loads
    fmt = chat_format or guess_chat_format(model)
    tok = load_tokenizer(tokenizer or str(model))
    cfg, params = load_pretrained(model, mesh=mesh)
    stops = tuple(stop_ids(fmt, tok)) if fmt != "plain" else tuple(tok.eos_ids)

    def generate_fn(questions, samples):
        prompts = [render_prompt(q, tok, fmt) for q in questions for _ in range(samples)]
        out = generate(params, cfg, prompts, max_new_tokens, temperature=temperature,
                       top_p=top_p, stop_tokens=stops, seed=seed, mesh=mesh)
        return [{"text": completion_text(tok, ids, stops), "num_tokens": len(ids),
                 "finish_reason": reason} for ids, reason in zip(out.tokens, out.finish_reasons)]

    return generate_fn, fmt


def main(model, benchmark, data=None, out="./eval_out", samples=1,
         temperature=REASONING_TEMPERATURE, top_p=REASONING_TOP_P, max_new_tokens=32768,
         chat_format=None, tokenizer=None, limit=None, seed=0) -> int:
    problems = load_benchmark(benchmark, data)
    if limit is not None:
        problems = problems[:limit]
    mesh = job_mesh()
    generate_fn, fmt = model_generate_fn(model, tokenizer, chat_format, temperature, top_p,
                                         max_new_tokens, seed, mesh)
    if not processes.is_lead():  # sampling is collective; process 0 grades and writes
        sample_responses(problems, generate_fn, samples)
        processes.barrier("eval:written")
        return 0
    settings = {"model": model, "benchmark": benchmark, "chat format": fmt, "samples": samples,
                "temperature": temperature, "top_p": top_p, "max new tokens": max_new_tokens,
                "seed": seed}
    summary = evaluate(problems, generate_fn, samples, out,
                       title=f"{benchmark} — {pathlib.Path(model).name}", settings=settings)
    k = summary["samples_per_problem"]
    print(f"{benchmark}: pass@1 {100 * summary['pass@1']:.1f}%  maj@{k} "
          f"{100 * summary[f'maj@{k}']:.1f}%  truncated {100 * summary['truncation_rate']:.1f}%  "
          f"-> {pathlib.Path(out) / 'report.md'}")
    processes.barrier("eval:written")
    return 0
