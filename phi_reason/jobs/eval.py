"""`phi-reason eval`: a checkpoint through a math benchmark - the model side (checkpoint, chat
format, sampler) of `phi_reason.eval.benchmarks.evaluate`, which loads, grades and reports."""
from __future__ import annotations

import pathlib

from ..eval.benchmarks import (
    REASONING_TEMPERATURE,
    REASONING_TOP_P,
    evaluate,
    load_benchmark,
    sample_responses,
)
from ..sharding import processes
from .build import job_mesh, load_inference_model
from .completions import ProgressBar, sample


def guess_chat_format(model_path) -> str:
    """Chat format from the checkpoint's directory name (pass --chat-format to override)."""
    name = pathlib.Path(model_path).name.lower()
    mini, reasoning = "mini" in name, "reason" in name
    return {(True, True): "phi-4-mini-reasoning", (True, False): "phi-4-mini",
            (False, True): "phi-4-reasoning", (False, False): "phi-4"}[(mini, reasoning)]


def model_generate_fn(model, tokenizer=None, chat_format=None, temperature=REASONING_TEMPERATURE,
                      top_p=REASONING_TOP_P, max_new_tokens=32768, seed=0, mesh=None,
                      dtype="auto", max_rows=None, progress=False):
    """A generate_fn backed by a checkpoint, the chat format and the paged engine (on `mesh`,
    with the weights loaded into its decode shardings, when given)."""
    from ..data.chat import render_prompt, stop_ids
    from ..data.tokenizer import load_tokenizer

    cfg, params = load_inference_model(model, dtype, mesh)
    fmt = chat_format or guess_chat_format(model)
    tok = load_tokenizer(tokenizer or str(model))
    stops = tuple(stop_ids(fmt, tok)) if fmt != "plain" else tuple(tok.eos_ids)

    def generate_fn(questions, samples):
        prompts = [render_prompt(q, tok, fmt) for q in questions for _ in range(samples)]
        with ProgressBar("sampling", progress and processes.is_lead()) as bar:
            out = sample(params, cfg, tok, prompts, stops, max_new_tokens,
                         temperature=temperature, top_p=top_p, seed=seed, mesh=mesh,
                         num_slots=max_rows, on_progress=bar)
        return [{"text": text, "num_tokens": len(ids), "finish_reason": reason}
                for text, ids, reason in zip(out.texts, out.tokens, out.finish_reasons)]

    return generate_fn, fmt


def main(model, benchmark, data=None, out="./eval_out", samples=1,
         temperature=REASONING_TEMPERATURE, top_p=REASONING_TOP_P, max_new_tokens=32768,
         chat_format=None, tokenizer=None, limit=None, seed=0, dtype="auto", mesh=None,
         max_rows=None, progress=True) -> int:
    problems = load_benchmark(benchmark, data)
    if limit is not None:
        problems = problems[:limit]
    mesh = job_mesh(mesh)
    generate_fn, fmt = model_generate_fn(model, tokenizer, chat_format, temperature, top_p,
                                         max_new_tokens, seed, mesh, dtype, max_rows, progress)
    if not processes.is_lead():  # sampling is collective; process 0 grades and writes
        sample_responses(problems, generate_fn, samples)
        processes.barrier("eval:written")
        return 0
    settings = {"model": model, "benchmark": benchmark, "chat format": fmt, "samples": samples,
                "temperature": temperature, "top_p": top_p, "max new tokens": max_new_tokens,
                "seed": seed, "dtype": dtype}
    summary = evaluate(problems, generate_fn, samples, out,
                       title=f"{benchmark} — {pathlib.Path(model).name}", settings=settings)
    k = summary["samples_per_problem"]
    print(f"{benchmark}: pass@1 {100 * summary['pass@1']:.1f}%  maj@{k} "
          f"{100 * summary[f'maj@{k}']:.1f}%  truncated {100 * summary['truncation_rate']:.1f}%  "
          f"-> {pathlib.Path(out) / 'report.md'}")
    processes.barrier("eval:written")
    return 0
