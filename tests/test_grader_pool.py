"""The sandbox: adversarial inputs finish within deadline + 1 s, are graded incorrect, execute
nothing, and leave the pool working; hung workers are killed and replaced; any thread may grade."""
import builtins
import threading
import time

import pytest

from phi_reason.eval.grader import GraderPool, grade, grade_many
from phi_reason.eval.single import grade_in_process

DEADLINE = 3.0


@pytest.fixture(scope="module")
def pool():
    with GraderPool(workers=2, timeout=DEADLINE) as p:
        assert p.grade("\\boxed{1}", "1").correct  # start (and warm) the workers once
        yield p


# Worker functions for the kill/replace tests (module-level: the worker imports them by name).
def hang_in_c(prediction, gold, mode):
    """`hang` -> one long C call (hours): signal-based timeouts cannot interrupt it; a process
    kill can.  Anything else is graded normally."""
    if prediction == "hang":
        return sum(range(10 ** 13))
    return grade_in_process(prediction, gold, mode)


def allocate_too_much(prediction, gold, mode):
    return len(bytearray(16 << 30))


def adversarial_inputs(marker):
    payload = f"__import__('os').system('touch {marker}')"
    sneaky = f"eval(compile('open(\"{marker}\", \"w\").close()', 'x', 'exec'))"
    return {
        "power_tower": "\\boxed{5^{5^{5^{5^{5^{5}}}}}}",
        "power_tower_parens": "\\boxed{((9^9)^9)^{9^{9^9}}}",
        "factorial_tower": "\\boxed{(10^{10^{10}})!}",
        "factorial_chain": "\\boxed{((100!)!)!}",
        "huge_binomial": "\\boxed{\\binom{10^{100}}{10^{50}}}",
        "megabyte_answer": "\\boxed{" + "9" * 1_000_000 + "}",
        "megabyte_text": "the answer is " + "1 a" * 350_000,
        "megabyte_unbalanced_boxes": "\\boxed{" * 150_000,
        "deep_braces": "\\boxed{" + "{" * 100_000 + "7" + "}" * 100_000 + "}",
        "deep_parens": "\\boxed{" + "(" * 990 + "8" + ")" * 990 + "}",  # (((8))) != 7
        "payload_boxed": "\\boxed{" + payload + "}",
        "payload_unboxed": "Final answer: " + payload,
        "payload_sneaky_boxed": "\\boxed{" + sneaky + "}",
        "payload_sneaky_unboxed": sneaky,
    }


def test_adversarial_inputs_are_bounded_wrong_and_inert(pool, tmp_path):
    marker = tmp_path / "pwned"
    for name, prediction in adversarial_inputs(marker).items():
        start = time.monotonic()
        result = pool.grade(prediction, "7")
        elapsed = time.monotonic() - start
        assert elapsed <= DEADLINE + 1.0, (name, elapsed, result)
        assert result.correct is False, (name, result)
        assert result.status in ("ok", "no_answer", "timeout", "error"), (name, result)
        assert not marker.exists(), name
        # the pool still grades the next ordinary item correctly
        assert pool.grade("\\boxed{\\frac{2}{4}}", "0.5").correct, name
    assert not marker.exists()


def test_no_eval_or_exec_reaches_model_text(monkeypatch, tmp_path):
    """In-process, with `eval`/`exec` of source text trapped: grading hostile and ordinary answers
    never calls them (sympy's parse_expr/sympify on strings would, e.g. via sympy.Number(str))."""
    grade_in_process("\\boxed{\\sqrt{2}x+\\frac{1}{2}}", "0.5+\\sqrt2 x")  # warm imports first
    calls = []

    real = {"eval": builtins.eval, "exec": builtins.exec}

    def trap(name):
        def trapped(source, *args, **kwargs):
            if isinstance(source, (str, bytes)):  # code objects: lazy imports inside sympy
                calls.append((name, source[:80]))
                raise AssertionError(f"{name} of source text during grading")
            return real[name](source, *args, **kwargs)
        return trapped

    monkeypatch.setattr(builtins, "eval", trap("eval"))
    monkeypatch.setattr(builtins, "exec", trap("exec"))
    marker = tmp_path / "pwned"
    inputs = [p for k, p in adversarial_inputs(marker).items() if "megabyte" not in k]
    inputs += ["\\boxed{(x+1)^2}", "\\boxed{\\{1,2\\}}", "\\boxed{(1,2]}", "\\boxed{0.5\\%}",
               "\\boxed{\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}}", "\\boxed{y=2x+3}",
               "\\boxed{a.__class__}", "\\boxed{\\text{os.system}(1)}", "\\boxed{lambda: 1}"]
    for prediction in inputs:
        for gold in ("7", "y = 2x+3"):
            grade_in_process(prediction, gold)
    assert calls == []
    assert not marker.exists()


def test_hung_worker_is_killed_and_replaced():
    timeout = 1.0
    with GraderPool(workers=1, timeout=timeout, grade_fn=hang_in_c) as pool:
        assert pool.grade("\\boxed{1}", "1").correct  # worker up and warm
        for _ in range(2):
            start = time.monotonic()
            result = pool.grade("hang", "1")
            elapsed = time.monotonic() - start
            assert (result.status, result.correct) == ("timeout", False)
            assert elapsed <= timeout + 1.0, elapsed
            # the killed worker was replaced: the next item is graded normally
            assert pool.grade("\\boxed{2}", "2").correct


def test_pool_survives_a_timeout(pool):
    with GraderPool(workers=1, timeout=1.0, grade_fn=hang_in_c) as hanging:
        assert hanging.grade("hang", "1").status == "timeout"
    assert pool.grade("\\boxed{3}", "3").correct


def test_memory_bomb_is_an_error_not_a_crash():
    with GraderPool(workers=1, timeout=DEADLINE, grade_fn=allocate_too_much,
                    max_memory=2 << 30) as limited:
        result = limited.grade("\\boxed{1}", "1")
    assert result.status == "error" and not result.correct


def test_grading_from_threads(pool):
    results = {}

    def work(i):
        results[i] = pool.grade_many([(f"\\boxed{{{i}}}", str(i)), (f"\\boxed{{{i}}}", str(i + 1))])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [0, 1, 2, 3]
    for i in range(4):
        assert [r.correct for r in results[i]] == [True, False]


def test_module_level_grade_and_grade_many():
    assert grade("<think>hmm</think> so \\boxed{\\frac{1}{2}}", "0.5", mode="reward").correct
    assert grade("<think>hmm \\boxed{0.5}", "0.5", mode="reward").status == "no_answer"
    results = grade_many([("\\boxed{2}", "2"), ("\\boxed{3}", "2"), ("nothing", "2")], workers=2)
    assert [(r.correct, r.status) for r in results] == [(True, "ok"), (False, "ok"),
                                                       (False, "no_answer")]


def test_bad_arguments():
    with pytest.raises(ValueError):
        GraderPool(workers=0)
    with pytest.raises(ValueError):
        GraderPool(timeout=0)
    with GraderPool(workers=1) as p:
        with pytest.raises(ValueError, match="mode"):
            p.submit("x", "y", mode="train")
    with pytest.raises(RuntimeError, match="closed"):
        p.submit("x", "y")
