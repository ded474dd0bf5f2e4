"""HF parity: JAX logits vs transformers' Phi3ForCausalLM on random tiny preset-shaped models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import TINY_SHAPES, hf_logits, params_from_hf, random_hf_model

from phi_reason import forward
from phi_reason.model.params import param_specs


@pytest.fixture(scope="module", params=sorted(TINY_SHAPES))
def model_pair(request):
    cfg = TINY_SHAPES[request.param]
    hf = random_hf_model(cfg, seed=len(request.param))
    return request.param, cfg, hf, params_from_hf(hf, cfg)


def _tokens(cfg, b, t, seed):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, (b, t)).astype(np.int32)


def test_param_shapes_match_declarations(model_pair):
    _, cfg, _, params = model_pair
    specs = param_specs(cfg)
    flat = {("layers", k): v for k, v in params["layers"].items()}
    flat.update({(k,): v for k, v in params.items() if k != "layers"})
    assert set(flat) == set(specs)
    for path, spec in specs.items():
        assert flat[path].shape == spec.shape, path


@pytest.mark.parametrize("seq_len", [17, 64, 65, 150])
def test_float32_logits_match_hf(model_pair, seq_len):
    """Lengths straddle the LongRoPE threshold (original_max 64 for the mini-like shape):
    64 is exactly at it (still short factors), 65 and 150 are above."""
    name, cfg, hf, params = model_pair
    toks = _tokens(cfg, 2, seq_len, seq_len)
    ref = hf_logits(hf, toks)
    assert np.abs(ref).max() > 1.0, "reference logits too small to make the comparison meaningful"
    out = np.asarray(jax.jit(forward, static_argnums=2)(params, toks, cfg))
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_array_less(np.abs(out - ref).max(), 1e-4)


def test_longrope_regime_follows_max_position(model_pair):
    """Explicit positions: HF picks long factors from max(position_ids)+1, not from T."""
    name, cfg, hf, params = model_pair
    if cfg.rope_scaling_type != "longrope":
        pytest.skip("no LongRoPE in this shape")
    toks = _tokens(cfg, 1, 20, 3)
    fwd = jax.jit(forward, static_argnums=2)
    for offset in (40, 44, 45, 100):  # max position + 1 = offset + 20: 60, 64 (short), 65, 120
        pos = (np.arange(20) + offset)[None]
        ref = hf_logits(hf, toks, pos)
        out = np.asarray(fwd(params, toks, cfg, positions=pos))
        np.testing.assert_array_less(np.abs(out - ref).max(), 1e-4)


def test_long_and_short_regimes_differ():
    """Guard: the threshold test above would be vacuous if both factor sets gave equal logits."""
    cfg = TINY_SHAPES["phi-4-mini-like"]
    hf = random_hf_model(cfg, seed=1)
    params = params_from_hf(hf, cfg)
    toks = _tokens(cfg, 1, 20, 3)
    fwd = jax.jit(forward, static_argnums=2)
    a = np.asarray(fwd(params, toks, cfg, positions=(np.arange(20) + 44)[None]))
    b = np.asarray(fwd(params, toks, cfg, positions=(np.arange(20) + 45)[None]))
    assert np.abs(a - b).max() > 1e-2


def _kl(p_logits, q_logits):
    p = jax.nn.log_softmax(p_logits, -1)
    q = jax.nn.log_softmax(q_logits, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


def test_bfloat16_compute_close_to_float32(model_pair):
    name, cfg, hf, params = model_pair
    toks = _tokens(cfg, 2, 96, 7)
    fwd = jax.jit(forward, static_argnums=2)
    f32 = fwd(params, toks, cfg)
    bf16 = fwd(params, toks, cfg.replace(dtype="bfloat16"))
    assert bf16.dtype == jnp.float32
    kl = _kl(f32, bf16)
    assert 0.0 < kl <= 1e-2, kl
