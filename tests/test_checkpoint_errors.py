"""Bad checkpoints fail with a message naming the problem, and leave no output behind."""
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
from checkpoint_fixtures import FAMILIES, hf_tensors, make_hf_model
from safetensors.torch import load_file, save_file

from phi_reason import cli
from phi_reason.checkpoint import CheckpointError, save_pretrained
from phi_reason.checkpoint.convert import hf_to_orbax, orbax_to_hf
from phi_reason.checkpoint.hf import save_hf
from phi_reason.model.params import abstract_params, flatten_params

CFG = FAMILIES["phi4"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    make_hf_model(CFG, seed=1).save_pretrained(root / "hf")  # one file: model.safetensors
    hf_to_orbax(root / "hf", root / "orbax", progress=False)
    return root


def _copy(good, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(good / "hf", bad)
    return bad


def _rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _no_output_left(out):
    assert not out.exists()
    assert [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.")] == []


def _edit_config(bad, **kw):
    d = json.loads((bad / "config.json").read_text())
    d.update(kw)
    (bad / "config.json").write_text(json.dumps(d))


def _truncate(bad):
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _corrupt_header(bad):
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"#not json header"
    f.write_bytes(bytes(data))


CASES = {
    "missing_config": (lambda b: (b / "config.json").unlink(), r"config\.json not found"),
    "architecture": (lambda b: _edit_config(b, architectures=["LlamaForCausalLM"]),
                     r"LlamaForCausalLM.*only Phi3ForCausalLM"),
    "missing_tensor": (lambda b: _rewrite(b / "model.safetensors", lambda t: t.pop(
        "model.layers.1.mlp.down_proj.weight")),
        r"missing tensor model\.layers\.1\.mlp\.down_proj\.weight"),
    "extra_tensor": (lambda b: _rewrite(b / "model.safetensors", lambda t: t.update(
        {"model.layers.0.mystery.weight": torch.zeros(3)})),
        r"unexpected tensor model\.layers\.0\.mystery\.weight"),
    "shape": (lambda b: _rewrite(b / "model.safetensors", lambda t: t.update(
        {"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 60)})),
        r"model\.layers\.0\.self_attn\.o_proj\.weight has shape \[64, 60\], config\.json "
        r"implies \[64, 64\]"),
    "config_disagrees": (lambda b: _edit_config(b, intermediate_size=80),
                         r"gate_up_proj\.weight has shape \[192, 64\].*implies \[160, 64\]"),
    "truncated": (_truncate, r"model\.safetensors: not a readable safetensors file"),
    "corrupt": (_corrupt_header, r"model\.safetensors: not a readable safetensors file"),
    "no_weights": (lambda b: (b / "model.safetensors").unlink(), r"no \*\.safetensors files"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_hf_input(good, tmp_path, case):
    mutate, message = CASES[case]
    bad = _copy(good, tmp_path)
    mutate(bad)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=message):
        hf_to_orbax(bad, out, progress=False)
    _no_output_left(out)


def test_tied_config_with_lm_head_is_named(good, tmp_path):
    bad = _copy(good, tmp_path)
    _edit_config(bad, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match=r"unexpected tensor lm_head\.weight.*tie_word"):
        hf_to_orbax(bad, tmp_path / "out", progress=False)


def test_index_pointing_at_wrong_file(good, tmp_path):
    bad = _copy(good, tmp_path)
    names = list(hf_tensors(bad))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors, which does not"):
        hf_to_orbax(bad, tmp_path / "out", progress=False)


@pytest.mark.parametrize("direction", ["hf-to-orbax", "orbax-to-hf"])
def test_existing_output_refused_unless_overwrite(good, tmp_path, direction):
    src = good / ("hf" if direction == "hf-to-orbax" else "orbax")
    convert = hf_to_orbax if direction == "hf-to-orbax" else orbax_to_hf
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="already exists.*overwrite"):
        convert(src, out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    convert(src, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.")] == []


def test_failure_mid_write_leaves_nothing(tmp_path):
    """An error after some shards were written: the temp dir is removed, `out` never appears."""
    params = jax_free_params()
    flat = flatten_params(params)

    def leaves():
        for i, item in enumerate(flat.items()):
            if i == 3:
                raise RuntimeError("source died")
            yield item

    from phi_reason.checkpoint.hf import write_hf
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="source died"):
        write_hf(CFG, {p: x.dtype for p, x in flat.items()}, leaves(), out)
    _no_output_left(out)
    from phi_reason.checkpoint.orbax_io import save_orbax
    with pytest.raises(RuntimeError, match="source died"):
        save_orbax(CFG, leaves(), out)
    _no_output_left(out)


def test_tokenizer_source_without_tokenizer_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files found"):
        save_hf(CFG, jax_free_params(), tmp_path / "out", tokenizer_from=tmp_path / "empty")
    _no_output_left(tmp_path / "out")


def test_orbax_input_errors(good, tmp_path):
    with pytest.raises(CheckpointError, match="not an Orbax checkpoint"):
        orbax_to_hf(good / "hf", tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="format must be"):
        save_pretrained(CFG, jax_free_params(), tmp_path / "x", format="gguf")
    _no_output_left(tmp_path / "out")


def test_cli_round_trip_and_error_exit(good, tmp_path, capsys):
    assert cli.main(["convert", "orbax-to-hf", str(good / "orbax"), str(tmp_path / "hf"),
                     "--max-shard-size", "50KB"]) == 0
    a, b = hf_tensors(good / "hf"), hf_tensors(tmp_path / "hf")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 1
    assert cli.main(["convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "o2"),
                     "--dtype", "bfloat16"]) == 0
    assert cli.main(["convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "o2")]) == 2
    assert "already exists" in capsys.readouterr().err


def jax_free_params():
    rng = np.random.default_rng(0)
    import jax
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32),
                                  abstract_params(CFG))


def test_next_run_removes_temp_dirs_of_dead_runs_and_names_the_others(tmp_path, capsys):
    """A SIGKILLed save leaves `.<name>.tmp-<host>-<pid>-<id>` (as large as the output); the next
    save to the same output deletes those whose process is gone and names the ones it cannot
    judge (a live pid, another host)."""
    import socket
    import subprocess
    import sys

    from phi_reason.checkpoint.common import atomic_output_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    out = tmp_path / "final"
    stale = [tmp_path / f".final.tmp-{host}-{dead}-0000aaaa", tmp_path / f".final.old-{dead}-1111"]
    kept = [tmp_path / f".final.tmp-{host}-{os.getpid()}-2222bbbb",  # alive: maybe still writing
            tmp_path / f".final.tmp-otherhost-{dead}-3333cccc",  # cannot tell from here
            tmp_path / ".finalist.tmp-x-1-4444"]  # another output's
    for d in stale + kept:
        (d / "0").mkdir(parents=True)
    with atomic_output_dir(out) as tmp:
        (pathlib.Path(tmp) / "weights").write_text("new")
    assert (out / "weights").read_text() == "new"
    assert not any(d.exists() for d in stale) and all(d.exists() for d in kept)
    err = capsys.readouterr().err
    assert str(kept[0]) in err and str(kept[1]) in err and str(kept[2]) not in err
