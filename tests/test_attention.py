"""XLA attention paths: `reference` against a numpy formula written here, and `chunked` /
`causal_blocked` against `reference`, forward and gradient, on packed GQA rows; plus packing
exactness through the decoder on every CPU-runnable path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_inputs import numpy_attention, packed_segments, qkv

from phi_reason.model import attention_kernels
from phi_reason.model.attention import (
    attention,
    causal_blocked_attention,
    chunked_attention,
    reference_attention,
    resolve_impl,
)
from phi_reason.model.config import ModelConfig
from phi_reason.model.decoder import forward
from phi_reason.model.params import init_params

T = 50


@pytest.fixture(scope="module")
def inputs():
    q, k, v = qkv(T, n_heads=6, n_kv=2, head_dim=8)
    seg = jnp.asarray(packed_segments(T))
    w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)
    return q, k, v, seg, w


def test_reference_matches_numpy_formula(inputs):
    q, k, v, seg, _ = inputs
    idx = np.broadcast_to(np.arange(T), (2, T))
    want = numpy_attention(q, k, v, np.asarray(seg), np.asarray(seg), idx, idx, 0.37)
    np.testing.assert_allclose(reference_attention(q, k, v, seg, seg, scale=0.37), want,
                               atol=1e-5)


def test_reference_with_cache_indices_matches_numpy():
    """Decode shape: 3 new queries at slots 12..14 over a 20-slot cache whose tail is empty."""
    q, k, v = qkv(3, s=20, seed=3)
    seg_q = np.ones((2, 3), np.int32)
    seg_kv = np.ones((2, 20), np.int32)
    seg_kv[:, 15:] = 0
    qi = np.broadcast_to(np.arange(12, 15), (2, 3))
    ki = np.broadcast_to(np.arange(20), (2, 20))
    want = numpy_attention(q, k, v, seg_q, seg_kv, qi, ki, 16 ** -0.5)
    got = reference_attention(q, k, v, jnp.asarray(seg_q), jnp.asarray(seg_kv), qi, ki)
    np.testing.assert_allclose(got, want, atol=1e-5)
    got = chunked_attention(q, k, v, jnp.asarray(seg_q), jnp.asarray(seg_kv), qi, ki, block=8)
    np.testing.assert_allclose(got, want, atol=1e-5)


def _value_and_grads(fn, q, k, v, w):
    out = fn(q, k, v)
    grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
    return out, grads


@pytest.mark.parametrize("path", [
    lambda q, k, v, s: chunked_attention(q, k, v, s, s, block=16),  # 50 = 3 blocks + remainder
    lambda q, k, v, s: causal_blocked_attention(q, k, v, s, s, block=16),
], ids=["chunked", "causal_blocked"])
def test_xla_paths_match_reference_value_and_grad(inputs, path):
    q, k, v, seg, w = inputs
    want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, seg, seg), q, k, v, w)
    got = _value_and_grads(jax.jit(lambda q, k, v: path(q, k, v, seg)), q, k, v, w)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    for name, g, rg in zip("qkv", got[1], want[1]):
        np.testing.assert_allclose(g, rg, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_auto_on_cpu_is_a_cpu_path_and_unknown_names_are_rejected():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") in ("cpu_flash", "causal_blocked")  # cpu_flash: test_cpu_flash
    with pytest.raises(ValueError, match="unknown attention"):
        attention(*qkv(4), jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), jnp.int32), impl="nope")


# ----------------------------------------------------------------- packing through the decoder

PACK = (9, 13, 6)  # three sequences packed in one row, then padding
ROW = 32


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_chunk=8)
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def packed_row():
    r = np.random.RandomState(5)
    seqs = [r.randint(1, 64, n).astype(np.int32) for n in PACK]
    tokens = np.zeros((1, ROW), np.int32)
    seg = np.zeros((1, ROW), np.int32)
    pos = 0
    for i, s in enumerate(seqs):
        tokens[0, pos:pos + len(s)], seg[0, pos:pos + len(s)] = s, i + 1
        pos += len(s)
    return seqs, tokens, seg


@pytest.mark.parametrize("impl", ["reference", "chunked", "cpu_flash", "auto", "gpu", "tpu"])
def test_packed_row_equals_sequences_alone(tiny_model, packed_row, impl, monkeypatch):
    """Logits of each packed sequence equal that sequence run alone (no leakage across segments
    or from padding), on every attention path; Pallas kernels run in the CPU interpreter."""
    monkeypatch.setattr(attention_kernels, "INTERPRET", True)
    cfg, params = tiny_model
    cfg = cfg.replace(attention=impl)
    seqs, tokens, seg = packed_row
    packed = jax.jit(lambda p, t, s: forward(p, t, cfg, segment_ids=s))(params, tokens, seg)
    alone_fn = jax.jit(lambda p, t: forward(p, t, cfg.replace(attention="reference")))
    pos = 0
    for s in seqs:
        alone = alone_fn(params, s[None])
        np.testing.assert_allclose(packed[0, pos:pos + len(s)], alone[0], atol=2e-5, rtol=2e-5)
        pos += len(s)
