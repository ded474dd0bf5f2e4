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

    engine = report["engine"]
    assert engine["model"] == "tiny" and engine["weight_bytes"] > 0
    t = engine["throughput"]
    assert t["output_tok_s"] > 0 and t["rows"] == 4 and t["kv_blocks"] > 0
    assert [r["batch"] for r in engine["small_batches"]] == [2]
    tail = engine["long_tail"]
    assert 0 < tail["ceiling_seconds"] and tail["fraction_of_ceiling"] > 0
    assert tail["peak_used_blocks"] <= tail["kv_blocks"]

    md = (suite_output / "cpu-tiny.md").read_text()
    for heading in ("## Attention", "## Train step", "## Decode", "## Engine", "### long_tail"):
        assert heading in md
    assert "gpu_triton" in md and "roofline_fraction" in md


def test_train_depth_per_batch_and_one_layer_shallower_after_an_oom(monkeypatch):
    """No compilation: rows are faked so the depth logic alone is checked (OOM above 5 layers)."""
    spec = importlib.util.spec_from_file_location("gpu_suite_depth", SUITE)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)

    def fake_row(cfg, seq, batch, remat, peak_flops, packed=False, logits_chunk=0):
        row = {"layers": cfg.num_hidden_layers, "batch": batch, "remat": remat,
               "segments": "packed" if packed else "single"}
        row.update({"error": "OOM"} if cfg.num_hidden_layers > 5 else
                   {"mfu": batch / 10 + (remat == "a") / 100})
        return [row]

    monkeypatch.setattr(suite, "_train_row", fake_row)
    base = suite.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
    assert suite._layers_arg("2:7,4:5") == {2: 7, 4: 5} and suite._layers_arg("6") == 6
    rows = suite.bench_train(base, 16, (2, 4), ("a", "b"), 1.0, max_layers={2: 7, 4: 5})
    got = [(r["batch"], r["remat"], r["layers"], r.get("error")) for r in rows]
    assert got == [(2, "a", 7, "OOM"), (2, "a", 6, "OOM"), (2, "a", 5, None),
                   (2, "b", 7, "OOM"), (2, "b", 6, "OOM"), (2, "b", 5, None),
                   (4, "a", 5, None), (4, "b", 5, None),
                   (4, "a", 5, None)]  # the packed repeat of the best row, at its depth
    assert rows[-1]["segments"] == "packed"
    # two retries at most: a depth that still fails is reported, not searched further
    rows = suite.bench_train(base, 16, (2,), ("a",), 1.0, max_layers=9)
    assert [(r["layers"], r.get("error")) for r in rows] == [(9, "OOM"), (8, "OOM"), (7, "OOM")]
