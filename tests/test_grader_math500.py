"""Every MATH-500 gold grades correct against `\\boxed{<itself>}` and incorrect against the next
problem's gold; the 1,000 pairs go through the sandboxed pool with 2 workers (throughput
printed)."""
import json
import time

import pytest

from phi_reason.eval.grader import GraderPool

# Adjacent golds that really are the same answer (index i vs i + 1), checked by hand:
TRUE_COINCIDENCES = {
    22: ("5", "x=5"),   # x = 5 means 5
    186: ("7", "7"),
    403: ("3", "3"),
}


@pytest.mark.slow
def test_math500_golds_self_and_next(shared_math_dir, capsys):
    rows = [json.loads(line) for line in (shared_math_dir / "math500.jsonl").open()]
    assert len(rows) == 500
    golds = [r["answer"] for r in rows]
    pairs = []
    for i, gold in enumerate(golds):
        pairs.append((f"Let me work it out.\n\nThe answer is $\\boxed{{{gold}}}$.", gold))
        pairs.append((f"Let me work it out.\n\nThe answer is $\\boxed{{{gold}}}$.",
                      golds[(i + 1) % len(golds)]))
    assert len(pairs) == 1000

    with GraderPool(workers=2, timeout=5.0) as pool:
        pool.grade("\\boxed{1}", "1")  # start the workers outside the timed region
        start = time.monotonic()
        results = pool.grade_many(pairs)
        elapsed = time.monotonic() - start
    with capsys.disabled():
        print(f"\n[grader throughput] {len(pairs)} MATH pairs, 2 workers: "
              f"{len(pairs) / elapsed:.1f} items/s ({elapsed:.1f} s)")

    assert all(r.status == "ok" for r in results), [
        (i, r) for i, r in enumerate(results) if r.status != "ok"][:5]
    self_wrong = [i for i in range(500) if not results[2 * i].correct]
    assert self_wrong == [], [(i, golds[i]) for i in self_wrong]
    next_right = [i for i in range(500) if results[2 * i + 1].correct]
    assert sorted(next_right) == sorted(TRUE_COINCIDENCES), [
        (i, golds[i], golds[(i + 1) % 500]) for i in next_right]
    for i, (a, b) in TRUE_COINCIDENCES.items():
        assert (golds[i], golds[i + 1]) == (a, b)
    # the extracted answer is the gold itself, braces and all
    assert all(results[2 * i].extracted == golds[i].strip() for i in range(500))
