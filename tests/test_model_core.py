"""ModelConfig validation and HF config I/O, parameter counts, packing, scan and remat."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import TINY_SHAPES
from transformers import Phi3Config

from phi_reason import ConfigError, ModelConfig, forward, init_params, param_count
from phi_reason.model.config import PHI4_MINI_LONG_FACTOR, REMAT_POLICIES
from phi_reason.model.decoder import positions_from_segments
from phi_reason.model.params import abstract_params, logical_axes


# ------------------------------------------------------------------ presets and counts
def test_parameter_counts_match_published_models():
    assert param_count(ModelConfig.preset("phi-4")) == 14_659_507_200
    assert param_count(ModelConfig.preset("phi-4-reasoning")) == 14_659_507_200
    assert param_count(ModelConfig.preset("phi-4-mini")) == 3_836_021_760
    assert param_count(ModelConfig.preset("phi-4-mini-reasoning")) == 3_836_021_760


def test_param_count_is_abstract():
    tree = abstract_params(ModelConfig.preset("phi-4"))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree))


def test_preset_values():
    p4 = ModelConfig.preset("phi-4")
    assert (p4.vocab_size, p4.hidden_size, p4.intermediate_size, p4.num_hidden_layers) == (
        100352, 5120, 17920, 40)
    assert (p4.num_attention_heads, p4.num_key_value_heads, p4.head_dim) == (40, 10, 128)
    assert p4.rope_theta == 250000.0 and p4.rotary_dim == 128 and not p4.tie_word_embeddings
    r = ModelConfig.preset("phi-4-reasoning")
    assert r.rope_theta == 500000.0 and r.max_position_embeddings == 32768
    m = ModelConfig.preset("phi-4-mini")
    assert m.rotary_dim == 96 and m.tie_word_embeddings and m.rope_scaling_type == "longrope"
    assert m.rope_long_factor == PHI4_MINI_LONG_FACTOR and m.rope_short_factor == (1.0,) * 48
    assert abs(m.attention_factor - 1.1902380714) < 1e-9
    assert m.stop_token_ids == (200020, 199999)


def test_logical_axes_match_ranks():
    cfg = ModelConfig.preset("tiny")
    axes = logical_axes(cfg)
    shapes = abstract_params(cfg)
    for a, s in zip(jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                    jax.tree_util.tree_leaves(shapes)):
        assert len(a) == len(s.shape)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kw, field", [
    (dict(hidden_size=66, num_attention_heads=4, head_dim=None), "num_attention_heads"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(rope_long_factor=(1.0,) * 5), "rope_long_factor"),
    (dict(rope_short_factor=(1.0,) * 7), "rope_short_factor"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(remat="sometimes"), "remat"),
    (dict(attention="flash9"), "attention"),
    (dict(dtype="int8"), "dtype"),
    (dict(rope_scaling_type="dynamic"), "rope_scaling_type"),
    (dict(sliding_window=128), "sliding_window"),
    (dict(original_max_position_embeddings=0), "original_max_position_embeddings"),
])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.preset("tiny", **kw)


def test_unknown_preset_and_replace_field():
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("phi-5")
    with pytest.raises(ConfigError, match="hidden_sise"):
        ModelConfig.preset("tiny").replace(hidden_sise=3)


# ------------------------------------------------------------------ HF config I/O
@pytest.mark.parametrize("name", ["phi-4", "phi-4-reasoning", "phi-4-mini", "tiny"])
def test_to_hf_round_trips_through_transformers(name):
    cfg = ModelConfig.preset(name)
    hfc = Phi3Config(**cfg.to_hf())
    back = ModelConfig.from_hf(hfc.to_dict())
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
              "rope_theta", "partial_rotary_factor", "rope_scaling_type", "rope_long_factor",
              "rope_short_factor", "original_max_position_embeddings", "tie_word_embeddings",
              "max_position_embeddings"):
        assert getattr(back, f) == getattr(cfg, f), f


def _mini_json(**rope):
    d = ModelConfig.preset("phi-4-mini").to_hf()
    d.pop("rope_scaling")
    d.update(rope)
    return d


@pytest.mark.parametrize("alias", ["longrope", "su", "yarn"])
def test_from_hf_longrope_aliases(alias):
    d = _mini_json(rope_scaling={"type": alias, "short_factor": [1.0] * 48,
                                 "long_factor": list(PHI4_MINI_LONG_FACTOR)})
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_scaling_type == "longrope" and cfg.rope_long_factor == PHI4_MINI_LONG_FACTOR


def test_from_hf_rope_parameters_form(tmp_path):
    d = _mini_json(rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
        "short_factor": [1.0] * 48, "long_factor": list(PHI4_MINI_LONG_FACTOR),
        "original_max_position_embeddings": 4096})
    for k in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
        d.pop(k)
    (tmp_path / "config.json").write_text(json.dumps(d))
    for source in (tmp_path, tmp_path / "config.json", d):
        cfg = ModelConfig.from_hf(source)
        assert cfg.rotary_dim == 96 and cfg.original_max_position_embeddings == 4096
        assert cfg.rope_scaling_type == "longrope" and cfg.rope_theta == 10000.0


def test_from_hf_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_hf(tmp_path)
    d = ModelConfig.preset("tiny").to_hf()
    d["model_type"] = "llama"
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf(d)
    d = ModelConfig.preset("tiny").to_hf()
    d["rope_scaling"]["long_factor"] = [1.0, 2.0]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config.json.*rope_long_factor"):
        ModelConfig.from_hf(tmp_path)


# ------------------------------------------------------------------ packing
CFG = TINY_SHAPES["phi-4-mini-like"]
PARAMS = init_params(CFG, jax.random.key(0))
LENGTHS = (9, 13, 6)


def _packed_row(lengths=LENGTHS, total=32, seed=0):
    rng = np.random.RandomState(seed)
    seqs = [rng.randint(0, CFG.vocab_size, n).astype(np.int32) for n in lengths]
    pad = total - sum(lengths)
    tokens = np.concatenate(seqs + [np.zeros(pad, np.int32)])[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                         + [np.zeros(pad)]).astype(np.int32)[None]
    return seqs, tokens, seg


def test_positions_restart_per_segment():
    _, _, seg = _packed_row()
    pos = np.asarray(positions_from_segments(jnp.asarray(seg)))[0]
    expected = np.concatenate([np.arange(n) for n in LENGTHS] + [np.arange(32 - sum(LENGTHS))])
    np.testing.assert_array_equal(pos, expected)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_packed_row_equals_separate_sequences(impl):
    cfg = CFG.replace(attention=impl, attention_chunk=8)
    seqs, tokens, seg = _packed_row()
    fwd = jax.jit(forward, static_argnums=2)
    packed = np.asarray(fwd(PARAMS, tokens, cfg, segment_ids=seg))
    start = 0
    for s in seqs:
        alone = np.asarray(fwd(PARAMS, s[None], cfg))
        np.testing.assert_allclose(packed[0, start:start + len(s)], alone[0], atol=2e-5, rtol=0)
        start += len(s)


def _summed_ce(params, tokens, seg, cfg):
    logits = forward(params, tokens, cfg, segment_ids=seg)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    tgt = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    keep = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return -jnp.sum(tgt * keep)


def test_packed_gradient_equals_sum_of_separate_gradients():
    seqs, tokens, seg = _packed_row()
    grad_fn = jax.jit(jax.grad(_summed_ce), static_argnums=3)  # compiled: eager grads take ~35 s
    g_packed = grad_fn(PARAMS, jnp.asarray(tokens), jnp.asarray(seg), CFG)
    g_sum = None
    for s in seqs:
        g = grad_fn(PARAMS, jnp.asarray(s[None]), jnp.ones((1, len(s)), jnp.int32), CFG)
        g_sum = g if g_sum is None else jax.tree_util.tree_map(jnp.add, g_sum, g)
    for a, b in zip(jax.tree_util.tree_leaves(g_packed), jax.tree_util.tree_leaves(g_sum)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ scan and remat
def _loss(params, tokens, cfg):
    return jnp.mean(forward(params, tokens, cfg) ** 2)


@pytest.fixture(scope="module")
def unscanned_reference():
    toks = jnp.asarray(np.random.RandomState(5).randint(0, CFG.vocab_size, (2, 24)))
    cfg = CFG.replace(scan_layers=False, remat="none")
    return toks, forward(PARAMS, toks, cfg), jax.grad(_loss)(PARAMS, toks, cfg)


@pytest.mark.parametrize("scan, remat", [(True, r) for r in REMAT_POLICIES] + [(False, "full")])
def test_scan_and_remat_change_no_value(unscanned_reference, remat, scan):
    toks, ref_logits, ref_grad = unscanned_reference
    cfg = CFG.replace(scan_layers=scan, remat=remat)
    np.testing.assert_allclose(np.asarray(jax.jit(forward, static_argnums=2)(PARAMS, toks, cfg)),
                               np.asarray(ref_logits), atol=1e-5, rtol=0)
    grad = jax.jit(jax.grad(_loss), static_argnums=2)(PARAMS, toks, cfg)
    for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


def test_save_dots_attn_skips_the_attention_kernels_forward_in_the_backward(
        monkeypatch, unscanned_reference):
    """With a fused kernel (Pallas Triton, interpreted on CPU) the backward of `save_dots`
    re-runs the kernel's forward; `save_dots_attn` keeps its output and logsumexp instead, so
    the gradient has exactly the kernel calls of an un-rematted one, and the same values."""
    from phi_reason.model import attention_kernels

    monkeypatch.setattr(attention_kernels, "INTERPRET", True)
    toks, _, ref_grad = unscanned_reference
    kernel_calls = {}
    for remat in ("none", "save_dots", "save_dots_attn"):
        cfg = CFG.replace(attention="gpu", remat=remat)
        kernel_calls[remat] = str(jax.make_jaxpr(jax.grad(_loss), static_argnums=2)(
            PARAMS, toks, cfg)).count("pallas_call")
    # forward + backward kernels, once per scanned layer body; save_dots adds a forward
    assert kernel_calls["save_dots_attn"] == kernel_calls["none"]
    assert kernel_calls["save_dots"] == kernel_calls["none"] + 1
    grad = jax.jit(jax.grad(_loss), static_argnums=2)(
        PARAMS, toks, CFG.replace(attention="gpu", remat="save_dots_attn"))
    for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


def test_bf16_params_and_compute_dtype():
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    toks = jnp.zeros((1, 8), jnp.int32)
    assert forward(p16, toks, CFG.replace(dtype="bfloat16")).dtype == jnp.float32
    assert init_params(CFG.replace(param_dtype="bfloat16"), jax.random.key(1))["embed"].dtype == \
        jnp.bfloat16
