"""Shared by the grader tests: Python's eval/exec refuse source text while grading (code objects
are fine: that is how sympy's lazy submodule imports run)."""
import builtins


def forbid_eval_of_text(monkeypatch) -> None:
    real = {"eval": builtins.eval, "exec": builtins.exec}

    def trap(name):
        def trapped(source, *args, **kwargs):
            if isinstance(source, (str, bytes)):
                raise AssertionError(f"{name} of source text during grading: {source[:80]!r}")
            return real[name](source, *args, **kwargs)
        return trapped

    monkeypatch.setattr(builtins, "eval", trap("eval"))
    monkeypatch.setattr(builtins, "exec", trap("exec"))
