"""Fused causal attention for the CPU backend: a C++ XLA FFI kernel, built on first use.

`flash_attention(q, k, v, q_segment_ids, kv_segment_ids, scale)` is exact causal self-attention
(the mask of phi_reason.model.attention with index = arange) whose backward recomputes the
probabilities from a saved log-sum-exp, so no score-sized tensor ever reaches memory. The kernel
(`flash_attention.cc`) is compiled with the system C++ compiler into a per-user cache, keyed by
its source, the jaxlib headers and this CPU, then registered with XLA as two FFI targets.
`available()` says whether that worked (it needs g++ or $CXX); attention="auto" uses the kernel
on the CPU only when it is available.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

SOURCE = Path(__file__).with_name("flash_attention.cc")
FORWARD_TARGET = "phi_reason_cpu_flash_forward"
BACKWARD_TARGET = "phi_reason_cpu_flash_backward"
DISABLE_ENV = "PHI_REASON_CPU_FLASH"  # "0": never build or use the kernel


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "phi_reason" / "cpu_flash"


def _compile_command(compiler: str, output: Path) -> list:
    return [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
            f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(output),
            "-lpthread"]


class BuildError(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def library_path() -> Path:
    """The compiled kernel for this source, jaxlib and CPU; built (atomically) if missing."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise BuildError("no C++ compiler found (install g++ or set $CXX)")
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(jax.ffi.include_dir().encode())
    key.update(jax.__version__.encode())
    key.update(_cpu_signature().encode())
    key.update(" ".join(_compile_command(compiler, Path("out"))).encode())
    target = _cache_dir() / f"flash_attention-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        try:
            proc = subprocess.run(_compile_command(compiler, Path(tmp)), capture_output=True,
                                  text=True)
        except OSError as err:
            raise BuildError(f"compiling {SOURCE.name} failed: cannot run {compiler}: {err}")
        if proc.returncode != 0:
            raise BuildError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=None)
def _register() -> None:
    import ctypes

    lib = ctypes.cdll.LoadLibrary(str(library_path()))
    jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(lib.PhiFlashForward),
                                platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(lib.PhiFlashBackward),
                                platform="cpu")


@functools.lru_cache(maxsize=None)
def build_error() -> Optional[str]:
    """None when the kernel is built and registered, else why not."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"disabled by {DISABLE_ENV}=0"
    try:
        _register()
    except (BuildError, OSError, AttributeError) as err:
        # once per process: attention="auto" now takes the slower XLA path on the CPU
        warnings.warn(f"phi_reason: the CPU flash-attention kernel is unavailable, attention "
                      f"'auto' uses XLA causal blocks ({DISABLE_ENV}=0 silences this): {err}",
                      RuntimeWarning, stacklevel=2)
        return str(err)
    return None


def available() -> bool:
    return build_error() is None


def _forward_kernel(q, k, v, q_segment_ids, kv_segment_ids, scale):
    b, t, nh, _ = q.shape
    return jax.ffi.ffi_call(
        FORWARD_TARGET,
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, nh, t), jnp.float32)),
        vmap_method="sequential",
    )(q, k, v, q_segment_ids, kv_segment_ids, scale=np.float32(scale))


def _backward_kernel(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, scale):
    return jax.ffi.ffi_call(
        BACKWARD_TARGET,
        tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
        vmap_method="sequential",
    )(q, k, v, q_segment_ids, kv_segment_ids, out, lse, d_out, scale=np.float32(scale))


def _batch_parallel(kernel, n_args: int, rule: str):
    """`kernel` wrapped so that XLA's SPMD partitioner runs it on each device's slice of the
    batch (every argument and result is batch-major) instead of gathering whole operands: rows
    are independent, so a batch-sharded call needs no communication. Any other sharding of the
    operands is gathered (sequence, heads and head dim must be whole on a device)."""
    wrapped = custom_partitioning(kernel, static_argnums=(n_args,))

    def batch_shardings(mesh, shapes, batch_axes):
        return tuple(NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (len(x.shape) - 1))))
                     for x in shapes)

    def batch_axes_of(arg_shapes):
        spec = getattr(arg_shapes[0].sharding, "spec", ())
        return spec[0] if len(spec) else None

    def infer(scale, mesh, arg_shapes, result_shape):
        return batch_shardings(mesh, result_shape, batch_axes_of(arg_shapes))

    def partition(scale, mesh, arg_shapes, result_shape):
        axes = batch_axes_of(arg_shapes)
        return (mesh, lambda *args: kernel(*args, scale), batch_shardings(mesh, result_shape, axes),
                batch_shardings(mesh, arg_shapes, axes))

    names = rule.replace("->", " ").replace(",", " ").split()
    factors = [f for i, f in enumerate(names) if f != "b" and f not in names[:i]]  # rule order
    wrapped.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                          need_replication_factors=tuple(factors))
    return wrapped


_forward = _batch_parallel(_forward_kernel, 5, "b t h d, b t k d, b t k d, b t, b t -> "
                                               "b t h d, b h t")
_backward = _batch_parallel(_backward_kernel, 8, "b t h d, b t k d, b t k d, b t, b t, b t h d, "
                                                 "b h t, b t h d -> b t h d, b t k d, b t k d")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_segment_ids, kv_segment_ids, scale):
    return _forward(q, k, v, q_segment_ids, kv_segment_ids, scale)[0]


def _flash_fwd(q, k, v, q_segment_ids, kv_segment_ids, scale):
    out, lse = _forward(q, k, v, q_segment_ids, kv_segment_ids, scale)
    return out, (q, k, v, q_segment_ids, kv_segment_ids, out, lse)


def _flash_bwd(scale, residuals, d_out):
    q, k, v, q_segment_ids, kv_segment_ids, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, q_segment_ids, kv_segment_ids, out, lse,
                           d_out.astype(jnp.float32), scale)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, q_segment_ids, kv_segment_ids, scale: Optional[float] = None):
    """q [B, T, nH, hd], k/v [B, T, nKV, hd], segment ids [B, T] -> [B, T, nH, hd] in q's dtype.
    Computes in float32 (inputs are cast); causal over the row, segments separate."""
    error = build_error()
    if error is not None:
        raise RuntimeError(f"the CPU flash-attention kernel is unavailable: {error}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out = _flash(*f32, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32), scale)
    return out.astype(q.dtype)
