"""Benchmark scoring: pure functions over (problems, graded generation records).

A record is one sampled response: {"problem_id", "sample", "correct", "extracted", "status",
"num_tokens", "finish_reason", ...}.  A problem is {"id", "answer", "subject", "level", ...}.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict

from phi_reason.eval.equivalence import plain_number
from phi_reason.eval.normalize import normalize


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): P(at least one of k draws without replacement from n
    samples, c of them correct, is correct) = 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def answer_key(extracted: str | None, correct: bool):
    """Voting key: every correct answer is one class (they all equal the gold); a wrong answer is
    keyed by its exact value when it is a plain number, else by its normalised text."""
    if extracted is None:
        return None
    if correct:
        return ("gold",)
    text = normalize(extracted).text
    number = plain_number(text)
    return ("value", number.value) if number is not None else ("text", text.replace(" ", ""))


def majority_correct(samples: list[dict]) -> bool:
    """maj@K for one problem: is the most frequent answer (unanswered samples do not vote; ties
    go to the answer seen first) a correct one?"""
    keys = [answer_key(s.get("extracted"), bool(s.get("correct"))) for s in samples]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return False
    best = max(votes.values())
    winner = next(k for k in keys if k is not None and votes[k] == best)
    return winner == ("gold",)


def ks_for(n: int) -> list[int]:
    """k values to report for n samples: powers of two up to n, and n itself."""
    ks = [1 << i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []
    return sorted(set(ks + [n]))


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(problems: list[dict], records: list[dict]) -> dict:
    """All report numbers.  Every problem must have the same number of samples K."""
    by_problem: dict = defaultdict(list)
    for r in records:
        by_problem[r["problem_id"]].append(r)
    ids = [p["id"] for p in problems]
    missing = [i for i in ids if i not in by_problem]
    if missing:
        raise ValueError(f"no generations for problems {missing[:5]} ({len(missing)} in all)")
    counts = {len(by_problem[i]) for i in ids}
    if len(counts) != 1:
        raise ValueError(f"problems have different sample counts {sorted(counts)}")
    k_samples = counts.pop()

    per_problem = []
    for p in problems:
        samples = by_problem[p["id"]]
        c = sum(bool(s["correct"]) for s in samples)
        per_problem.append({
            "id": p["id"], "subject": p.get("subject"), "level": p.get("level"),
            "n": k_samples, "c": c, "pass@1": c / k_samples,
            "maj": majority_correct(samples),
        })

    def breakdown(field):
        groups = defaultdict(list)
        for row in per_problem:
            if row[field] is not None:
                groups[row[field]].append(row)
        return {str(key): {"problems": len(rows), "pass@1": _mean(r["pass@1"] for r in rows),
                           f"maj@{k_samples}": _mean(float(r["maj"]) for r in rows)}
                for key, rows in sorted(groups.items(), key=lambda kv: str(kv[0]))}

    lengths_ok = [r["num_tokens"] for r in records if r["correct"] and "num_tokens" in r]
    lengths_bad = [r["num_tokens"] for r in records if not r["correct"] and "num_tokens" in r]
    return {
        "problems": len(problems),
        "samples_per_problem": k_samples,
        "generations": len(records),
        "pass@1": _mean(row["pass@1"] for row in per_problem),
        f"maj@{k_samples}": _mean(float(row["maj"]) for row in per_problem),
        "pass@k": {k: _mean(pass_at_k(k_samples, row["c"], k) for row in per_problem)
                   for k in ks_for(k_samples)},
        "by_subject": breakdown("subject"),
        "by_level": breakdown("level"),
        "mean_tokens_correct": _mean(lengths_ok),
        "mean_tokens_incorrect": _mean(lengths_bad),
        "truncation_rate": _mean(float(r.get("finish_reason") == "length") for r in records),
        "status_counts": dict(Counter(r.get("status", "ok") for r in records)),
        "per_problem": per_problem,
    }


__all__ = ["pass_at_k", "majority_correct", "answer_key", "ks_for", "summarize"]
