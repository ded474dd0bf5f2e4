"""benchmarks/gpu_suite.py --tiny runs end to end on CPU and writes well-formed results."""
import importlib.util
import json
import pathlib

import pytest

SUITE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite_output(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    out = tmp_path_factory.mktemp("suite")
    assert suite.main(["--tiny", "--out-dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_tiny_suite_writes_json_and_markdown(suite_output):
    files = sorted(p.name for p in suite_output.iterdir())
    assert files == ["cpu-tiny.json", "cpu-tiny.md"]
    report = json.loads((suite_output / "cpu-tiny.json").read_text())
    meta = report["meta"]
    assert meta["tiny"] and meta["backend"] == "cpu" and meta["jax"]
    assert meta["peak_flops"] > 0 and meta["peak_bw"] > 0

    paths = {r["path"]: r for r in report["attention"]}
    assert set(paths) == {"reference", "chunked", "gpu_triton", "gpu_cudnn"}
    for name, r in paths.items():
        assert "error" not in r, (name, r)
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        # bf16 inputs: every path agrees with the reference to bf16 rounding of the output
        assert r["err_vs"] == "reference"
        assert r["max_abs_err"] < 2e-2, (name, r["max_abs_err"])
    assert paths["gpu_triton"]["segments"] == "packed"
    assert paths["gpu_cudnn"]["segments"] == "single"

    single = [r for r in report["train"] if r["segments"] == "single"]
    packed = [r for r in report["train"] if r["segments"] == "packed"]
    assert {r["remat"] for r in single} == {"full", "save_dots"}
    best = max(single, key=lambda r: r["mfu"])  # the packed row repeats the best pair
    assert [(r["batch"], r["remat"]) for r in packed] == [(best["batch"], best["remat"])]
    for r in report["train"]:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["layers"] == 2

    assert [r["batch"] for r in report["decode"]] == [1, 4]
    for r in report["decode"]:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["roofline_fraction"] > 0
        assert r["bytes_per_step"] > 0

    md = (suite_output / "cpu-tiny.md").read_text()
    for heading in ("## Attention", "## Train step", "## Decode"):
        assert heading in md
    assert "gpu_triton" in md and "roofline_fraction" in md
