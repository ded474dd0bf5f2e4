"""Generation on a mesh of 8 virtual CPU devices equals single-device generation.

Mesh data=2 x fsdp=2 x tensor=2: slots over (data, fsdp), attention heads, MLP and vocabulary over
tensor (the project's sharding rules), KV cache heads over tensor. The prompts include one that
crosses the LongRoPE threshold (re-prefill on the mesh) and one that starts above it.
"""
import jax
import numpy as np
import pytest
from hf_reference import TINY_SHAPES

from phi_reason.engine.paged_sampler import generate_paged
from phi_reason.engine.sampler import generate
from phi_reason.model.params import init_params
from phi_reason.sharding.mesh import make_mesh

CFG = TINY_SHAPES["phi-4-mini-like"].replace(initializer_range=0.2)


def test_mesh_generation_equals_single_device():
    """The paged engine (every job's) sampled (temperature, top-k, top-p over the tensor-sharded
    vocabulary) on the mesh equals it on one device, which equals the static reference sampler
    (tests/test_generate.py); the static sampler is the single-device reference only."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 virtual CPU devices)")
    params = init_params(CFG, jax.random.key(11))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (40, 50, 60, 70)]
    kw = dict(stop_tokens=(), seed=5, num_slots=4, temperature=0.8, top_p=0.9, top_k=50)
    single = generate_paged(params, CFG, prompts, 30, **kw)
    assert single.tokens == generate(params, CFG, prompts, 30, **kw).tokens
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = generate_paged(params, CFG, prompts, 30, mesh=mesh, **kw)
    assert sharded.tokens == single.tokens
    assert sharded.finish_reasons == single.finish_reasons
    # Tensor parallelism changes float32 summation order (partial sums over head / MLP / vocab
    # shards), so logprobs agree to the tolerance the sampler promises against `forward` (1e-4).
    for a, b in zip(sharded.logprobs, single.logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
