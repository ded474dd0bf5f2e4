"""ModelConfig.from_hf accepts every config.json that transformers accepts for Phi3ForCausalLM,
and reads it as the same model: transformers and from_hf load one file, and float32 logits agree.

Files are written the way transformers writes them (this version's `to_json_file`, which nests
rope_theta in `rope_parameters` and drops defaults) or the way older checkpoints carry them
(top-level `rope_theta`, `rope_scaling`). Malformed configs that transformers rejects stay rejected.
"""
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from hf_reference import hf_logits, params_from_hf, random_hf_model
from transformers import Phi3Config, Phi3ForCausalLM

from phi_reason import ConfigError, ModelConfig, forward

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
T = 8  # tokens per sequence


def longrope(pairs=4, **extra):
    """A LongRoPE rope_scaling with distinct short and long factors (`pairs` = rotary_dim / 2)."""
    return {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(pairs)],
            "long_factor": [1.0 + 1.5 * i for i in range(pairs)], **extra}


def legacy(d):
    """The same config as transformers < 5 wrote it: top-level rope_theta and rope_scaling."""
    rope = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rope.pop("rope_theta")
    d["partial_rotary_factor"] = rope.pop("partial_rotary_factor", 1.0)
    kind = rope.pop("rope_type")
    rope.pop("original_max_position_embeddings", None)
    d["rope_scaling"] = None if kind == "default" else rope
    return d


def edit(**changes):
    """Set keys (a value of `...` deletes the key)."""
    def apply(d):
        for k, v in changes.items():
            d.pop(k) if v is ... else d.__setitem__(k, v)
        return d
    return apply


# name -> (Phi3Config kwargs, edits of the written config.json, position offsets to check)
# Offsets put the last position past original_max (4096 unless set) so LongRoPE's long factors run.
ACCEPTED = {
    "max_pos_below_default_original": (dict(max_position_embeddings=2048), [], [0]),
    "original_omitted": (dict(max_position_embeddings=2048),
                         [edit(original_max_position_embeddings=...)], [0]),
    "rope_scaling_null": (dict(max_position_embeddings=2048), [legacy], [0]),
    "rope_scaling_absent": (dict(max_position_embeddings=2048),
                            [legacy, edit(rope_scaling=...)], [0]),
    "rope_theta_in_rope_parameters": (dict(rope_theta=250000.0), [], [0, 3000]),
    "rope_theta_top_level": (dict(rope_theta=250000.0), [legacy], [0, 3000]),
    "longrope_below_original": (dict(max_position_embeddings=2048, rope_scaling=longrope()),
                                [], [0, 4090]),
    "longrope_legacy_below_original": (
        dict(max_position_embeddings=2048, rope_scaling=longrope()), [legacy], [0, 4090]),
    # attention_factor wins over factor; factor wins over max/original (16384/4096 here)
    "longrope_su_explicit_attention_factor": (
        dict(max_position_embeddings=8192, rope_scaling=longrope(
            type="su", factor=3.0, attention_factor=1.25)), [], [0, 4090]),
    "longrope_yarn_attention_factor_from_factor": (
        dict(max_position_embeddings=16384, rope_scaling=longrope(type="yarn", factor=2.0)),
        [legacy], [0, 4090]),
    # transformers takes the top-level original_max (default 4096), not the one inside rope_scaling
    "longrope_original_only_inside_scaling": (
        dict(max_position_embeddings=8192, rope_scaling=longrope()),
        [legacy, edit(original_max_position_embeddings=...),
         lambda d: {**d, "rope_scaling": {**d["rope_scaling"],
                                          "original_max_position_embeddings": 1024}}],
        [0, 1020, 4090]),
    "longrope_half_rotary": (
        dict(max_position_embeddings=8192, partial_rotary_factor=0.5, rope_scaling=longrope(2)),
        [], [0, 4090]),
    "partial_rotary_three_quarters": (dict(partial_rotary_factor=0.75), [legacy], [0]),
    "partial_rotary_odd_dim": (dict(partial_rotary_factor=0.625), [], [0, 100]),  # rotary_dim 5
    "no_rotary": (dict(partial_rotary_factor=0.0), [], [0]),
    "odd_head_dim_partial_rotary": (dict(head_dim=9, partial_rotary_factor=0.5), [], [0, 100]),
}


def write_config(tmp_path, hf_kwargs, edits):
    Phi3Config(**TINY, **hf_kwargs).to_json_file(str(tmp_path / "config.json"))
    d = json.loads((tmp_path / "config.json").read_text())
    for fix in edits:
        d = fix(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    return d


@pytest.fixture(autouse=True)
def quiet_transformers():
    """transformers warns about unusual-but-valid rope keys; the tests mean them."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_config_transformers_accepts_loads_and_matches_logits(tmp_path, name):
    hf_kwargs, edits, offsets = ACCEPTED[name]
    write_config(tmp_path, hf_kwargs, edits)
    cfg = ModelConfig.from_hf(tmp_path)
    hf = Phi3ForCausalLM(Phi3Config.from_pretrained(tmp_path)).eval()
    # random non-trivial weights (norms too); loading them strictly also checks the shapes agree
    hf.load_state_dict(random_hf_model(cfg, seed=len(name)).state_dict())
    params = params_from_hf(hf, cfg)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, T)).astype(np.int32)
    fwd = jax.jit(forward, static_argnums=2)
    for offset in offsets:
        positions = np.arange(T)[None] + offset
        ref = hf_logits(hf, tokens, positions)
        assert np.abs(ref).max() > 0.5, "reference logits too small for a meaningful comparison"
        out = np.asarray(fwd(params, tokens, cfg, positions=positions))
        assert out.shape == ref.shape
        np.testing.assert_array_less(np.abs(out - ref).max(), 1e-4, err_msg=f"offset {offset}")


def test_longrope_cases_reach_both_regimes(tmp_path):
    """Guard: the long-position checks above would be vacuous if both factor sets agreed."""
    hf_kwargs, edits, _ = ACCEPTED["longrope_below_original"]
    write_config(tmp_path, hf_kwargs, edits)
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.rope_scaling_type == "longrope" and cfg.original_max_position_embeddings == 4096
    params = params_from_hf(random_hf_model(cfg, seed=0), cfg)
    tokens = np.random.RandomState(0).randint(1, cfg.vocab_size, (1, T)).astype(np.int32)
    short, long = (np.asarray(forward(params, tokens, cfg, positions=np.arange(T)[None] + off))
                   for off in (4096 - T, 4097 - T))  # last position + 1 = 4096 (short), 4097 (long)
    assert np.abs(short - long).max() > 1e-2


def _longrope_dict(**rope_scaling):
    d = legacy(Phi3Config(**TINY, max_position_embeddings=8192).to_dict())
    d["rope_scaling"] = rope_scaling
    return d


# configs transformers itself rejects -> what our ConfigError must say after "ModelConfig."
# (the field that holds the bad key: rope_short_factor holds rope_scaling's short_factor)
REJECTED = {
    "short_factor_wrong_length": (_longrope_dict(**longrope(short_factor=[1.0] * 3)),
                                  "rope_short_factor: has length 3"),
    "long_factor_missing": (_longrope_dict(type="longrope", short_factor=[1.0] * 4),
                            "rope_long_factor: required"),
    "short_factor_not_numbers": (_longrope_dict(**longrope(short_factor="1111")),
                                 "rope_short_factor: must be a list of numbers"),
    "attention_factor_not_a_number": (_longrope_dict(**longrope(attention_factor="big")),
                                      "rope_attention_factor: must be a number"),
    "unsupported_rope_type": (_longrope_dict(type="linear", factor=2.0), "rope_scaling_type"),
    "longrope_odd_rotary_dim": ({**_longrope_dict(**longrope(2)), "partial_rotary_factor": 0.625},
                                "partial_rotary_factor: .*rotary_dim 5"),
    "longrope_original_zero": (
        {**_longrope_dict(**longrope()), "original_max_position_embeddings": 0},
        "original_max_position_embeddings"),
    "rotary_wider_than_head": ({**_longrope_dict(), "rope_scaling": None,
                                "partial_rotary_factor": 1.5}, "partial_rotary_factor"),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_config_transformers_rejects_is_rejected_naming_the_key(tmp_path, name):
    d, message = REJECTED[name]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(Exception):  # transformers fails at config or model construction
        Phi3ForCausalLM(Phi3Config.from_pretrained(tmp_path))(
            input_ids=torch.arange(4)[None])
    with pytest.raises(ConfigError, match=rf"config.json: ModelConfig\.{message}"):
        ModelConfig.from_hf(tmp_path)
