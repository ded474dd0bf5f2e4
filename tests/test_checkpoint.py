"""HF <-> Orbax checkpoints: bit-exact round trips, transformers reloads, sharded restore."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from checkpoint_fixtures import FAMILIES, hf_logits, hf_tensors, make_hf_model, same_bits
from jax.sharding import NamedSharding, PartitionSpec

from phi_reason.checkpoint import load_pretrained, read_hf_params, restore_orbax, save_pretrained
from phi_reason.checkpoint.common import parse_size
from phi_reason.checkpoint.convert import hf_to_orbax, orbax_to_hf
from phi_reason.model.config import ModelConfig
from phi_reason.model.decoder import forward
from phi_reason.model.params import abstract_params, flatten_params, logical_axes

SHARD = "60KB"  # forces several shards for these tiny models


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    """family -> HF dir (multi-shard, by transformers) -> Orbax -> HF dir (ours)."""
    cfg = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(cfg)
    model.save_pretrained(root / "hf", max_shard_size=SHARD)
    hf_to_orbax(root / "hf", root / "orbax", progress=False)
    orbax_to_hf(root / "orbax", root / "hf2", max_shard_size=SHARD, progress=False)
    return dict(cfg=cfg, model=model, root=root)


def test_input_really_is_multi_shard(converted):
    files = [f for f in os.listdir(converted["root"] / "hf") if f.endswith(".safetensors")]
    assert len(files) >= 3


def test_round_trip_every_tensor_bit_identical(converted):
    a, b = hf_tensors(converted["root"] / "hf"), hf_tensors(converted["root"] / "hf2")
    assert set(a) == set(b)
    assert ("lm_head.weight" in a) == (not converted["cfg"].tie_word_embeddings)
    bad = [k for k in a if not same_bits(a[k], b[k])]
    assert not bad, bad


def test_output_index_and_configs(converted):
    out = converted["root"] / "hf2"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = hf_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert len(set(index["weight_map"].values())) >= 3
    for f in set(index["weight_map"].values()):
        names = [n for n, g in index["weight_map"].items() if g == f]
        data = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        assert data <= parse_size(SHARD) or len(names) == 1  # a lone oversized tensor is allowed
    cfg = converted["cfg"]
    assert ModelConfig.from_hf(out) == ModelConfig.from_hf(converted["root"] / "hf")
    gen = json.loads((out / "generation_config.json").read_text())
    stops = list(cfg.stop_token_ids)
    assert gen["eos_token_id"] == (stops[0] if len(stops) == 1 else stops)
    assert gen["bos_token_id"] == cfg.bos_token_id and gen["pad_token_id"] == cfg.pad_token_id


def test_transformers_loads_output_with_identical_logits(converted):
    tokens = np.random.default_rng(0).integers(0, converted["cfg"].vocab_size, (2, 12))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(converted["root"] / "hf2").eval()
    assert type(reloaded).__name__ == "Phi3ForCausalLM"
    np.testing.assert_array_equal(hf_logits(reloaded, tokens),
                                  hf_logits(converted["model"], tokens))


def test_load_pretrained_forward_matches_hf(converted):
    cfg, params = load_pretrained(converted["root"] / "hf")
    assert cfg.param_dtype == "float32"
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16))
    ref = hf_logits(converted["model"], tokens)
    assert np.abs(ref).max() > 1.0  # not trivially small
    ours = np.asarray(jax.jit(forward, static_argnums=2)(params, tokens, cfg))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_orbax_and_hf_loads_agree(converted):
    _, from_hf = load_pretrained(converted["root"] / "hf")
    cfg, from_orbax = load_pretrained(converted["root"] / "orbax")
    assert cfg == converted["cfg"].replace(param_dtype="float32")
    a, b = flatten_params(from_hf), flatten_params(from_orbax)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))


def test_checkpoint_manager_sees_the_layout(converted):
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(converted["root"] / "orbax")
    assert mngr.all_steps() == [0]
    assert mngr.metadata(0).custom_metadata["model_config"]["hidden_size"] == 64
    restored = mngr.restore(0, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
    ref = read_hf_params(converted["root"] / "hf")
    np.testing.assert_array_equal(np.asarray(restored["state"]["params"]["layers"]["wq"]),
                                  ref["layers"]["wq"])


# ---------------------------------------------------------------- layout vs HF, by hand


def test_leaf_layout_matches_hf_tensors(converted):
    """Our leaves are the HF tensors split (fused ones) and reshaped, in torch's [out, in] order."""
    cfg = converted["cfg"]
    p = read_hf_params(converted["root"] / "hf")
    sd = {k: v.numpy() for k, v in converted["model"].state_dict().items()}
    nH, nKV, hd, inter = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.intermediate_size)
    i = cfg.num_hidden_layers - 1
    qkv = sd[f"model.layers.{i}.self_attn.qkv_proj.weight"]
    hid = cfg.hidden_size
    np.testing.assert_array_equal(p["layers"]["wq"][i], qkv[:nH * hd].reshape(nH, hd, hid))
    np.testing.assert_array_equal(p["layers"]["wk"][i],
                                  qkv[nH * hd:(nH + nKV) * hd].reshape(nKV, hd, hid))
    np.testing.assert_array_equal(p["layers"]["wv"][i],
                                  qkv[(nH + nKV) * hd:].reshape(nKV, hd, hid))
    np.testing.assert_array_equal(p["layers"]["wo"][i],
                                  sd[f"model.layers.{i}.self_attn.o_proj.weight"]
                                  .reshape(hid, nH, hd))
    gu = sd[f"model.layers.{i}.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(p["layers"]["w_gate"][i], gu[:inter])
    np.testing.assert_array_equal(p["layers"]["w_up"][i], gu[inter:])
    np.testing.assert_array_equal(p["layers"]["w_down"][i],
                                  sd[f"model.layers.{i}.mlp.down_proj.weight"])
    np.testing.assert_array_equal(p["embed"], sd["model.embed_tokens.weight"])
    if not cfg.tie_word_embeddings:
        np.testing.assert_array_equal(p["lm_head"], sd["lm_head.weight"])


# ---------------------------------------------------------------- bf16


@pytest.fixture(scope="module")
def bf16_converted(tmp_path_factory):
    cfg = FAMILIES["phi4mini"]
    root = tmp_path_factory.mktemp("bf16")
    make_hf_model(cfg, seed=3, dtype=torch.bfloat16).save_pretrained(root / "hf",
                                                                     max_shard_size=SHARD)
    hf_to_orbax(root / "hf", root / "orbax", progress=False)
    orbax_to_hf(root / "orbax", root / "hf2", max_shard_size=SHARD, progress=False)
    return root


def test_bf16_stays_bf16_bit_exact(bf16_converted):
    a, b = hf_tensors(bf16_converted / "hf"), hf_tensors(bf16_converted / "hf2")
    assert {t.dtype for t in a.values()} == {torch.bfloat16}
    assert set(a) == set(b) and all(same_bits(a[k], b[k]) for k in a)
    cfg, params = restore_orbax(bf16_converted / "orbax")
    assert cfg.param_dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(params)} == {"bfloat16"}
    assert json.loads((bf16_converted / "hf2" / "config.json").read_text())["torch_dtype"] == \
        "bfloat16"


def test_dtype_cast_on_convert(bf16_converted, tmp_path):
    hf_to_orbax(bf16_converted / "hf", tmp_path / "f32", dtype="float32", progress=False)
    cfg, params = restore_orbax(tmp_path / "f32")
    assert cfg.param_dtype == "float32"
    ref = read_hf_params(bf16_converted / "hf")
    for k, v in flatten_params(params).items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, flatten_params(ref)[k].astype(np.float32))


# ---------------------------------------------------------------- sharded restore

RULES = {"layers": None, "vocab": "tensor", "embed": "fsdp", "heads": "tensor",
         "kv_heads": "tensor", "head_dim": None, "mlp": "tensor"}


def _shardings(cfg, mesh):
    return jax.tree_util.tree_map(
        lambda axes: NamedSharding(mesh, PartitionSpec(*(RULES[a] for a in axes))),
        logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("source", ["orbax", "hf"])
def test_restore_directly_into_shardings(converted, source):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"))
    cfg = converted["cfg"]
    shardings = _shardings(cfg, mesh)
    _, params = load_pretrained(converted["root"] / source, shardings=shardings)
    ref = flatten_params(read_hf_params(converted["root"] / "hf"))
    flat_sh = flatten_params(shardings)
    for k, arr in flatten_params(params).items():
        assert arr.sharding == flat_sh[k], k
        shards = arr.addressable_shards
        assert len(shards) == 8
        for s in shards:  # each device holds exactly its slice of the saved values
            np.testing.assert_array_equal(np.asarray(s.data), ref[k][s.index], err_msg=str(k))
        if any(ax is not None for ax in flat_sh[k].spec):
            assert shards[0].data.size < ref[k].size  # really split, not replicated


# ---------------------------------------------------------------- save_pretrained


def test_save_pretrained_both_formats(tmp_path):
    cfg = FAMILIES["phi4"]
    rng = np.random.default_rng(7)  # numpy, not init_params: no per-op compiles in this test
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32),
                                    abstract_params(cfg))
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "cl100k.tiktoken"):
        (tok / name).write_text(f"contents of {name}")
    (tok / "unrelated.bin").write_text("x")
    save_pretrained(cfg, params, tmp_path / "hf", format="hf", tokenizer_from=tok)
    save_pretrained(cfg, params, tmp_path / "orbax", format="orbax")
    assert (tmp_path / "hf" / "model.safetensors").exists()  # one shard: no index, as HF
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "cl100k.tiktoken"):
        assert (tmp_path / "hf" / name).read_text() == f"contents of {name}"
    assert not (tmp_path / "hf" / "unrelated.bin").exists()
    for fmt in ("hf", "orbax"):
        cfg2, loaded = load_pretrained(tmp_path / fmt)
        assert cfg2 == cfg
        for k, v in flatten_params(params).items():
            np.testing.assert_array_equal(np.asarray(flatten_params(loaded)[k]), np.asarray(v))


@pytest.mark.parametrize("text,n", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2**31),
                                    ("1.5kb", 1500), (1234, 1234)])
def test_parse_size(text, n):
    assert parse_size(text) == n
