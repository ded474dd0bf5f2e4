"""Prints what `save_dots_attn` keeps around one fused attention call on this backend.

On the CPU it also lists the C++ kernel's (phi_reason.model.cpu_flash; the Pallas calls run in the
interpreter there).

Where a kernel's output and logsumexp are listed (outputs of a custom_vjp call) the backward pass
reuses them; where only q, k, v are (jax 0.11.2's cuDNN call on an H100), the policy keeps no more
than `save_dots` around that kernel. Usage: python benchmarks/check_remat_residuals.py
"""
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import print_saved_residuals

from phi_reason.model import attention_kernels, cpu_flash
from phi_reason.model.decoder import remat_policy

if jax.default_backend() == "cpu":
    attention_kernels.INTERPRET = True
b, t, h, kv, d = 1, 256, 24, 8, 128
q = jnp.ones((b, t, h, d), jnp.bfloat16)
k = v = jnp.ones((b, t, kv, d), jnp.bfloat16)
seg = jnp.ones((b, t), jnp.int32)
for variant in ("cudnn", "triton"):
    def f(q, k, v):
        o = attention_kernels.gpu_attention(q, k, v, seg, seg, variant=variant)
        return jnp.sum(jnp.sin(o.astype(jnp.float32)))
    print(f"--- {variant}, save_dots_attn")
    print_saved_residuals(jax.checkpoint(f, policy=remat_policy("save_dots_attn")), q, k, v)

if jax.default_backend() == "cpu" and cpu_flash.available():
    def f(q, k, v):
        return jnp.sum(jnp.sin(cpu_flash.flash_attention(q, k, v, seg, seg)))
    print("--- cpu_flash, save_dots_attn")
    print_saved_residuals(jax.checkpoint(f, policy=remat_policy("save_dots_attn")), q, k, v)
