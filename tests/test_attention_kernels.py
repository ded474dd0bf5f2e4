"""GPU (Pallas Triton + cuDNN dispatch) and TPU (splash) attention paths vs `reference_attention`,
forward and gradient, run on CPU in the Pallas interpreter. Inputs are packed GQA rows: three
sequences and padding in one row, a single sequence in the other."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_inputs import packed_segments, qkv

from phi_reason.model import attention_kernels as ak
from phi_reason.model.attention import attention, reference_attention

T = 40  # not a power of two: the kernels pad to 64 with a segment no real token has
SCALE = 0.3


@pytest.fixture(scope="module")
def inputs():
    q, k, v = qkv(T, n_heads=4, n_kv=2, head_dim=16)
    seg = jnp.asarray(packed_segments(T))
    w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)
    return q, k, v, seg, w


def _value_and_grads(fn, q, k, v, w):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    out = fn(q, k, v)
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.fixture(scope="module")
def reference(inputs):
    q, k, v, seg, w = inputs
    return _value_and_grads(lambda q, k, v: reference_attention(q, k, v, seg, seg, scale=SCALE),
                            q, k, v, w)


def _assert_matches(got, want, rows=slice(None)):
    (out, grads), (ref_out, ref_grads) = got, want
    np.testing.assert_allclose(out[rows], ref_out[rows], atol=2e-5, rtol=2e-5)
    for name, g, rg in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g[rows], rg[rows], atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("bwd_block", [None, 16])  # default tile; several backward tiles
def test_triton_kernel_matches_reference(inputs, reference, bwd_block):
    q, k, v, seg, w = inputs

    def fn(q, k, v):
        return ak.gpu_attention(q, k, v, seg, seg, scale=SCALE, interpret=True,
                                variant="triton", triton_bwd_block=bwd_block)

    _assert_matches(_value_and_grads(jax.jit(fn), q, k, v, w), reference)


def test_splash_kernel_matches_reference(inputs, reference):
    q, k, v, seg, w = inputs

    def fn(q, k, v):
        return ak.tpu_attention(q, k, v, seg, seg, scale=SCALE, interpret=True)

    _assert_matches(_value_and_grads(jax.jit(fn), q, k, v, w), reference)


def test_gpu_dispatch_on_packed_and_single_sequence_rows(inputs, reference):
    """auto: the lax.cond picks the dense (cuDNN; here the XLA stand-in) branch only when every
    row is one sequence; both kinds of batch must match the reference."""
    q, k, v, seg, w = inputs

    @jax.jit
    def auto(q, k, v, s):
        return _value_and_grads(lambda q, k, v: ak.gpu_attention(
            q, k, v, s, s, scale=SCALE, interpret=True), q, k, v, w)

    _assert_matches(auto(q, k, v, seg), reference)
    single = jnp.full_like(seg, 3)
    ref1 = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, single, single,
                                                                scale=SCALE), q, k, v, w)
    _assert_matches(auto(q, k, v, single), ref1)
    dense = _value_and_grads(lambda q, k, v: ak.gpu_attention(
        q, k, v, single, single, scale=SCALE, interpret=True, variant="cudnn"), q, k, v, w)
    _assert_matches(dense, ref1)


def test_dense_branch_would_be_wrong_on_packed_rows(inputs, reference):
    """Guards the dispatch: the dense causal branch ignores segments, so it must differ from the
    reference on the packed row (otherwise the lax.cond test above proves nothing)."""
    q, k, v, seg, w = inputs
    dense = ak.dense_causal_attention(q, k, v, SCALE, "xla")
    assert float(jnp.max(jnp.abs(dense[0] - reference[0][0]))) > 1e-2


def test_explicit_indices_fall_back_to_exact_path():
    q, k, v = qkv(3, s=20, seed=3)
    seg_q = jnp.ones((2, 3), jnp.int32)
    seg_kv = jnp.ones((2, 20), jnp.int32).at[:, 15:].set(0)
    qi = jnp.broadcast_to(jnp.arange(12, 15), (2, 3))
    ki = jnp.broadcast_to(jnp.arange(20), (2, 20))
    want = reference_attention(q, k, v, seg_q, seg_kv, qi, ki)
    for impl in ("gpu", "tpu"):
        got = attention(q, k, v, seg_q, seg_kv, qi, ki, impl=impl)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_kernels_on_cpu_need_interpret(inputs, monkeypatch):
    q, k, v, seg, _ = inputs
    monkeypatch.setattr(ak, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="INTERPRET"):
        ak.gpu_attention(q, k, v, seg, seg)
    monkeypatch.setattr(ak, "INTERPRET", True)  # honoured on CPU: no error, runs interpreted
    out = ak.tpu_attention(q, k, v, seg, seg)
    np.testing.assert_allclose(out, reference_attention(q, k, v, seg, seg), atol=2e-5)
