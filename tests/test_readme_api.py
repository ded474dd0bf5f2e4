"""The README's Python API block, run as a user would: in order, twice, in a fresh interpreter
(importing a submodule must never shadow a public function such as `pr.generate`)."""
import pathlib
import pkgutil
import re
import subprocess
import sys
import textwrap

import phi_reason

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_api_block() -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index("Python API:"):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_no_public_name_is_a_submodule():
    submodules = {m.name for m in pkgutil.iter_modules(phi_reason.__path__)}
    assert submodules & set(phi_reason.__all__) == set()


def test_readme_python_api_runs_twice(tmp_path):
    block = readme_api_block()
    # The README's shapes are the real model's; the run uses the tiny preset and temp paths.
    for real, toy in (('"phi-4-mini-reasoning"', '"tiny"'), ('"ckpt_or_hf_dir"', "CKPT"),
                      ('"out_dir"', "OUT"), ("max_new_tokens=256", "max_new_tokens=4")):
        assert real in block, f"README Python API no longer shows {real}: update this test"
        block = block.replace(real, toy)
    script = textwrap.dedent(f"""
        import pathlib
        import jax, phi_reason as pr

        cfg0 = pr.ModelConfig.preset("tiny")
        CKPT = {str(tmp_path / "ckpt")!r}
        pr.save_pretrained(cfg0, pr.init_params(cfg0, jax.random.key(1)), CKPT, format="orbax")
        tokens = jax.numpy.array([[1, 2, 3, 4]])
        prompts = [[1, 2, 3], [4, 5]]
        for run in range(2):
            OUT = {str(tmp_path)!r} + f"/out{{run}}"
            exec(compile({block!r}, "README.md", "exec"))
            assert logits.shape == (1, 4, cfg.vocab_size), logits.shape
            assert len(out.tokens) == 2 and all(1 <= len(t) <= 4 for t in out.tokens)
            assert (pathlib.Path(OUT) / "config.json").is_file()
            assert pr.grade(r"... \\boxed{{\\frac{{1}}{{2}}}}", "0.5").correct
            assert callable(pr.generate), type(pr.generate)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
