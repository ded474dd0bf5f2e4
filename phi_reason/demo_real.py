"""`phi-reason demo --model DIR`: a few MATH-500 problems through a real checkpoint (no training).

Uses the evaluation harness end to end: the checkpoint's chat format (guessed from its config,
e.g. phi-4-mini-reasoning), the JAX sampler with the reasoning models' recommended sampling, and
the sandboxed grader; prints each transcript and the score.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT_MATH500 = Path(__file__).resolve().parents[2] / "shared" / "data" / "math" / "math500.jsonl"


def run_real_model(model: str, data=None, num_problems: int = 5, max_new_tokens: int = 4096,
                   out: str = "./demo_real_out") -> int:
    from .eval.benchmarks import evaluate, load_benchmark
    from .jobs.eval import model_generate_fn

    path = Path(data) if data else DEFAULT_MATH500
    if not path.is_file():
        print(f"error: MATH-500 file {path} not found; pass --data /path/to/math500.jsonl",
              file=sys.stderr)
        return 2
    problems = load_benchmark("math500", path)[:num_problems]
    generate_fn, fmt = model_generate_fn(model, temperature=0.8, top_p=0.95,
                                         max_new_tokens=max_new_tokens)
    print(f"model {model} (chat format {fmt}); {len(problems)} MATH-500 problems", flush=True)
    summary = evaluate(problems, generate_fn, 1, out, title=f"demo: {Path(model).name}",
                       settings={"model": model, "chat format": fmt})
    questions = {p["id"]: p["problem"] for p in problems}
    for line in (Path(out) / "generations.jsonl").read_text().splitlines():
        rec = json.loads(line)
        print("\n" + "=" * 80)
        print(f"problem: {questions.get(rec['problem_id'], rec['problem_id'])}")
        print(f"response ({rec['num_tokens']} tokens, {rec['finish_reason']}): {rec['response']}")
        print(f"gold: {rec['gold']}  extracted: {rec['extracted']}  correct: {rec['correct']}")
    print(f"\nscore: pass@1 = {summary.get('pass@1')}  (details in {out})")
    return 0
