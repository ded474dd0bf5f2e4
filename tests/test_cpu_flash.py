"""The fused CPU attention kernel (phi_reason.model.cpu_flash): forward against the numpy formula,
forward and gradient against `reference_attention`, on packed GQA rows with padding, lengths that
are not a multiple of the kernel's 64-row blocks and head dims that are not a multiple of its
16-wide register tiles; plus how `auto` chooses it and what happens when it cannot be built."""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_inputs import numpy_attention, packed_segments, qkv

from phi_reason.model import cpu_flash
from phi_reason.model.attention import attention, reference_attention, resolve_impl


@pytest.fixture(scope="module", autouse=True)
def kernel():
    error = cpu_flash.build_error()
    if error is not None:
        if shutil.which("g++") or os.environ.get("CXX"):
            pytest.fail(f"a C++ compiler is present but the kernel did not build: {error}")
        pytest.skip(f"no C++ compiler: {error}")


# (T, query heads, KV heads, head dim): one block; 3 blocks with a remainder, GQA 3; a head dim
# of 20 (one 16-wide tile + scalar columns); MHA over 2 full blocks with head dim 64
SHAPES = [(50, 6, 2, 8), (150, 6, 2, 16), (70, 4, 1, 20), (128, 4, 4, 64)]


@pytest.mark.parametrize("t,nh,nkv,hd", SHAPES)
def test_forward_matches_numpy_formula(t, nh, nkv, hd):
    q, k, v = qkv(t, n_heads=nh, n_kv=nkv, head_dim=hd, seed=t)
    seg = packed_segments(t)
    idx = np.broadcast_to(np.arange(t), (2, t))
    want = numpy_attention(q, k, v, seg, seg, idx, idx, 0.3)
    got = cpu_flash.flash_attention(q, k, v, jnp.asarray(seg), jnp.asarray(seg), 0.3)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("t,nh,nkv,hd", SHAPES)
def test_value_and_gradient_match_reference(t, nh, nkv, hd):
    q, k, v = qkv(t, n_heads=nh, n_kv=nkv, head_dim=hd, seed=t + 1)
    seg = jnp.asarray(packed_segments(t))
    w = jnp.asarray(np.random.RandomState(t).randn(*q.shape), jnp.float32)

    def value_and_grads(fn):
        def loss(q, k, v):
            return jnp.sum(fn(q, k, v, seg, seg) * w)

        return jax.jit(lambda q, k, v: (fn(q, k, v, seg, seg),
                                        jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)

    want = value_and_grads(reference_attention)
    got = value_and_grads(cpu_flash.flash_attention)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    for name, g, rg in zip("qkv", got[1], want[1]):
        np.testing.assert_allclose(g, rg, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_bfloat16_inputs_compute_in_float32():
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(40))
    seg = jnp.asarray(packed_segments(40))
    got = cpu_flash.flash_attention(q, k, v, seg, seg)
    assert got.dtype == jnp.bfloat16
    want = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), seg, seg)
    # only the final rounding to bfloat16 separates them (8 mantissa bits: 2^-8 relative)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -8, atol=1e-6)


def test_auto_picks_the_kernel_and_indices_fall_back_to_reference():
    assert resolve_impl("auto") == "cpu_flash"
    q, k, v = qkv(3, s=20, seed=3)
    seg_q, seg_kv = jnp.ones((2, 3), jnp.int32), jnp.ones((2, 20), jnp.int32)
    qi = jnp.broadcast_to(jnp.arange(12, 15), (2, 3))
    ki = jnp.broadcast_to(jnp.arange(20), (2, 20))
    np.testing.assert_array_equal(
        attention(q, k, v, seg_q, seg_kv, qi, ki, impl="cpu_flash"),
        reference_attention(q, k, v, seg_q, seg_kv, qi, ki))


_PROBE = """
import jax, jax.numpy as jnp
from phi_reason.model import cpu_flash
from phi_reason.model.attention import resolve_impl
print("AUTO", resolve_impl("auto"))
try:
    cpu_flash.flash_attention(*(jnp.ones((1, 4, 2, 8)),) * 3, jnp.ones((1, 4), jnp.int32),
                              jnp.ones((1, 4), jnp.int32))
except RuntimeError as err:
    print("ERROR", err)
"""


@pytest.mark.parametrize("env,reason", [
    ({"PHI_REASON_CPU_FLASH": "0"}, "disabled by PHI_REASON_CPU_FLASH=0"),
    ({"CXX": "/nonexistent/c++"}, "compiling flash_attention.cc failed"),
])
def test_without_the_kernel_auto_falls_back_and_direct_use_says_why(env, reason, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "AUTO causal_blocked" in out.stdout
    assert "the CPU flash-attention kernel is unavailable" in out.stdout
    assert reason in out.stdout
    assert not list(tmp_path.rglob("*.so*")), "a failed build must leave no library behind"
    # a failed build is announced (once); switching the kernel off on purpose is silent
    announced = out.stderr.count("RuntimeWarning: phi_reason: the CPU flash-attention kernel")
    assert announced == (0 if env.get("PHI_REASON_CPU_FLASH") == "0" else 1)


def test_save_dots_attn_keeps_the_kernel_residuals():
    """Under remat save_dots_attn the backward reuses the kernel's output and log-sum-exp (saved
    residuals include the [B, nH, T] log-sum-exp); under save_dots only q, k, v are kept and the
    backward re-runs the kernel forward."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    from phi_reason.model.decoder import remat_policy

    q, k, v = qkv(64)
    seg = jnp.ones((2, 64), jnp.int32)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(cpu_flash.flash_attention(q * 2.0, k, v, seg, seg)))

    def saved_shapes(policy):  # one "f32[2,4,64] output of ..." line per residual
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            print_saved_residuals(jax.checkpoint(loss, policy=remat_policy(policy)), q, k, v)
        return [line.split()[0] for line in text.getvalue().splitlines() if line.strip()]

    lse, out = "f32[2,4,64]", "f32[2,64,4,16]"
    assert lse in saved_shapes("save_dots_attn")
    assert saved_shapes("save_dots_attn").count(out) == 2  # the argument q and the kernel output
    assert lse not in saved_shapes("save_dots")
    assert saved_shapes("save_dots").count(out) == 1


def test_batch_sharded_call_runs_per_device_without_gathering():
    """On a mesh, each device runs the kernel on its slice of the batch (no all-gather in the
    compiled program) and the values and gradients equal the unsharded reference."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py asks XLA for 8 host devices)")
    mesh = Mesh(np.array(devices[:4]), ("data",))
    q, k, v = qkv(40, batch=4, seed=9)
    seg = jnp.asarray(np.concatenate([packed_segments(40)] * 2))

    def loss(fn):
        return lambda q, k, v, s: jnp.sum(jnp.sin(fn(q, k, v, s, s)))

    def grad_fn(fn):
        return jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))

    want = grad_fn(reference_attention)(q, k, v, seg)

    def put(x):
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))

    args = [put(x) for x in (q, k, v, seg)]
    sharded = grad_fn(cpu_flash.flash_attention)
    got = sharded(*args)
    assert "all-gather" not in sharded.lower(*args).compile().as_text()
    for name, g, rg in zip("qkv", got, want):
        assert g.sharding.spec[0] == "data", name
        np.testing.assert_allclose(g, rg, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_kernel_rejects_mismatched_shapes_instead_of_reading_out_of_bounds():
    q, k, v = qkv(16, batch=2)
    seg = jnp.ones((2, 16), jnp.int32)
    with pytest.raises(Exception, match=r"k/v must be \[B, T, nKV, hd\] like q"):
        jax.block_until_ready(cpu_flash._forward_kernel(q, k[:1], v[:1], seg, seg, 0.25))
    with pytest.raises(Exception, match="query heads must be a multiple of KV heads"):
        jax.block_until_ready(cpu_flash._forward_kernel(q[:, :, :3], k, v, seg, seg, 0.25))
