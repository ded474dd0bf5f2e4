"""Sharded training on 8 virtual CPU devices equals single-device training.

The train step here is test-local (CE loss from `forward` + optax.adamw), jitted through
`shard_step` with the rules' shardings and donation, and compared with the same step run
unsharded on one device.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from phi_reason.model.config import ModelConfig
from phi_reason.model.decoder import forward
from phi_reason.model.params import abstract_params, flatten_params, init_params, unflatten_params
from phi_reason.model.sharded import param_partition_specs, param_shardings, sharded_init_fn
from phi_reason.sharding import rules
from phi_reason.sharding.init import opt_state_shardings, sharded_opt_init
from phi_reason.sharding.mesh import MeshError, make_mesh
from phi_reason.sharding.rules import (
    activation_constraint,
    batch_sharding,
    replicated,
    spec_for,
)

# Dims divisible by 8 where a mesh axis of 8 shards them; 2 KV heads so that tensor=4 exercises
# the GQA policy (KV projections replicated along tensor) inside the equivalence test.
CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64, original_max_position_embeddings=64,
                  attention="reference")
MESHES = [(8, 1, 1), (1, 8, 1), (1, 2, 4), (2, 2, 2)]
B, T = 8, 16
LR = 1e-3

# Default rules written out by hand in mesh-axis terms (vocab, heads, kv_heads, mlp -> tensor;
# embed -> fsdp; layers, head_dim -> replicated). Axes of size 1 are dropped below.
EXPECTED_AXES = {
    ("embed",): ("tensor", "fsdp"),
    ("layers", "ln1"): (None, "fsdp"),
    ("layers", "wq"): (None, "tensor", None, "fsdp"),
    ("layers", "wk"): (None, "tensor", None, "fsdp"),
    ("layers", "wv"): (None, "tensor", None, "fsdp"),
    ("layers", "wo"): (None, "fsdp", "tensor", None),
    ("layers", "ln2"): (None, "fsdp"),
    ("layers", "w_gate"): (None, "tensor", "fsdp"),
    ("layers", "w_up"): (None, "tensor", "fsdp"),
    ("layers", "w_down"): (None, "fsdp", "tensor"),
    ("final_norm",): ("fsdp",),
    ("lm_head",): ("tensor", "fsdp"),
}


def expected_spec(path, mesh_shape):
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh_shape))
    axes = EXPECTED_AXES[path]
    if path[-1] in ("wk", "wv") and CFG.num_key_value_heads % sizes["tensor"]:
        axes = (None, None, None, "fsdp")  # GQA policy: 2 KV heads cannot split 4 ways
    return P(*(a if a is not None and sizes[a] > 1 else None for a in axes))


def ce_loss(params, batch, constrain=None):
    """Shifted, masked cross-entropy (never across segments), mean over target tokens."""
    logits = forward(params, batch["tokens"], CFG, batch["positions"], batch["segment_ids"],
                     constrain=constrain)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    target = batch["tokens"][:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    seg = batch["segment_ids"]
    mask = batch["loss_mask"][:, 1:] * (seg[:, 1:] == seg[:, :-1]) * (seg[:, 1:] > 0)
    return jnp.sum(nll * mask) / jnp.sum(mask)


# eps: AdamW's first update is lr * g / (|g| + eps), which amplifies gradient noise by up to
# lr / eps where |g| ~ 0. Float32 reduction order differs across shardings, so gradients differ
# by ~5e-7 of each tensor's largest entry (measured); eps = 1e-3 bounds the resulting parameter
# difference by lr / eps * 5e-7 * max|g| ~ 5e-8, under the comparison floor below. With the
# default eps = 1e-8 the step is a sign function for near-zero gradients and no sharded program
# could agree to rtol 1e-5. The step still exercises m, v, bias correction and weight decay.
OPT = optax.adamw(LR, eps=1e-3, weight_decay=0.1)


def make_step(constrain=None):
    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(ce_loss)(params, batch, constrain)
        updates, opt_state = OPT.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss, "grads": grads}
    return step


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2:] = 2  # two packed segments per row ...
    seg[::3, -3:] = 0  # ... and padding at the end of some rows
    pos = np.concatenate([np.arange(T // 2)] * 2)[None].repeat(B, 0).astype(np.int32)
    loss_mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    return {"tokens": tokens, "positions": pos, "segment_ids": seg, "loss_mask": loss_mask}


def random_params(cfg, seed=0):
    """Parameters from numpy: norms near 1, matrices ~ N(0, 0.05). (init_params itself is
    compiled only once, in the sharded-init test: its XLA compile is slow on CPU.)"""
    rng = np.random.default_rng(seed)
    flat = {path: (float(path[-1] in ("ln1", "ln2", "final_norm"))
                   + 0.05 * rng.standard_normal(a.shape)).astype(np.float32)
            for path, a in flatten_params(abstract_params(cfg)).items()}
    return unflatten_params(flat)


@pytest.fixture(scope="module")
def reference():
    """One step on a single device, no shardings at all."""
    dev = jax.devices()[0]
    params = jax.device_put(random_params(CFG), dev)
    state = (params, OPT.init(params))
    batch = jax.device_put(make_batch(), dev)
    (new_params, _), metrics = jax.jit(make_step())(state, batch)
    return jax.device_get(params), jax.device_get(new_params), jax.device_get(metrics)


def assert_tree_close(actual, expected, what):
    fa, fe = flatten_params(actual), flatten_params(expected)
    assert fa.keys() == fe.keys()
    for path in fe:
        e = np.asarray(fe[path])
        # rtol 1e-5 per element, plus an absolute floor of 1e-6 of the tensor's largest entry
        # for entries near 0 (float32 reduction order differs across shards: ~5e-7 measured).
        np.testing.assert_allclose(np.asarray(fa[path]), e, rtol=1e-5,
                                   atol=1e-6 * float(np.max(np.abs(e))),
                                   err_msg=f"{what} {'/'.join(path)}")



def shard_step(step_fn, mesh, state_shardings, batch_sharding, donate=True,
               metrics_sharding=None):
    """jit with the rules' in/out shardings and donation: the mechanics the training steps
    (`phi_reason.train.steps.ShardedStep`) use, around a step that also returns its grads."""
    metrics_sharding = metrics_sharding or replicated(mesh)
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, metrics_sharding),
                   donate_argnums=(0,) if donate else ())

@pytest.mark.slow  # one XLA compile per mesh (~10 s CPU each)
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_matches_single_device(mesh_shape, reference):
    ref_params, ref_new_params, ref_metrics = reference
    mesh = make_mesh(*mesh_shape)
    assert dict(mesh.shape) == dict(zip(("data", "fsdp", "tensor"), mesh_shape))
    p_shard = param_shardings(CFG, mesh)
    params = jax.device_put(ref_params, p_shard)
    opt_state = sharded_opt_init(OPT, params, p_shard, mesh)
    state_shardings = (p_shard, opt_state_shardings(OPT, params, p_shard, mesh))
    step = shard_step(make_step(activation_constraint(mesh)), mesh, state_shardings,
                      batch_sharding(mesh),
                      metrics_sharding={"loss": replicated(mesh), "grads": p_shard})
    batch = jax.device_put(make_batch(), batch_sharding(mesh))
    (new_params, new_opt), metrics = step((params, opt_state), batch)

    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
    assert_tree_close(jax.device_get(metrics["grads"]), ref_metrics["grads"], "grad")
    assert_tree_close(jax.device_get(new_params), ref_new_params, "param after AdamW")

    # donation: the old parameter buffers were given to the new state
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(params))
    # every parameter (and its AdamW moments) lives where the rules table says
    flat_new = flatten_params(new_params)
    for path, x in flat_new.items():
        assert x.sharding.spec == expected_spec(path, mesh_shape), path
    mu = flatten_params(new_opt[0].mu)
    for path, x in mu.items():
        assert x.sharding.spec == expected_spec(path, mesh_shape), ("mu",) + path


@pytest.mark.slow  # init_params compiles slowly on CPU (twice here: sharded and not)
def test_sharded_init_is_born_sharded_and_equals_init_params():
    # vocab 4096: embed and lm_head (1 MiB each) outweigh all per-device shards together
    cfg = CFG.replace(vocab_size=4096)
    mesh = make_mesh(1, 8, 1)
    compiled = sharded_init_fn(cfg, mesh).lower(jax.random.key(1)).compile()
    params = compiled(jax.random.key(1))
    leaves = jax.tree_util.tree_leaves(params)
    total = sum(x.nbytes for x in leaves)
    # per-device parameter bytes are exactly 1/8 of the total on (data, fsdp, tensor) = (1, 8, 1)
    for dev in jax.devices():
        local = sum(s.data.nbytes for x in leaves for s in x.addressable_shards
                    if s.device == dev)
        assert local * 8 == total, (dev, local, total)
    # never materialised whole: XLA's per-device program outputs 1/8 of the bytes (plus one
    # 8-byte buffer pointer per output), and its scratch (random bits etc.) is smaller than
    # one whole embedding table, which generating it unsharded would need
    mem = compiled.memory_analysis()
    assert total // 8 <= mem.output_size_in_bytes <= total // 8 + 8 * len(leaves)
    assert mem.temp_size_in_bytes < params["embed"].nbytes, mem.temp_size_in_bytes
    for x, spec in zip(leaves, jax.tree_util.tree_leaves(
            param_partition_specs(cfg, mesh), is_leaf=lambda s: isinstance(s, P))):
        assert x.sharding.spec == spec
    # and the values are init_params' values (same key, no sharding)
    assert_tree_close(jax.device_get(params),
                      jax.device_get(jax.jit(lambda k: init_params(cfg, k))(jax.random.key(1))),
                      "sharded init")


def test_gqa_kv_heads_replicated_when_tensor_axis_larger(caplog, monkeypatch):
    # (the sharded step on mesh 1x2x4 above runs this layout and matches one device)
    monkeypatch.setattr(rules, "_warned", set())  # the warning is logged once per layout
    with caplog.at_level(logging.WARNING, logger="phi_reason.sharding.rules"):
        specs = flatten_params(param_partition_specs(CFG, {"data": 1, "fsdp": 2, "tensor": 4}))
    assert specs[("layers", "wk")] == P(None, None, None, "fsdp")
    assert specs[("layers", "wv")] == P(None, None, None, "fsdp")
    assert specs[("layers", "wq")] == P(None, "tensor", None, "fsdp")
    assert any("kv_heads=2" in r.getMessage() and "replicating" in r.getMessage()
               for r in caplog.records)
    # divisible: KV heads split like the query heads
    specs = flatten_params(param_partition_specs(CFG, {"data": 1, "fsdp": 4, "tensor": 2}))
    assert specs[("layers", "wk")] == P(None, "tensor", None, "fsdp")


@pytest.mark.parametrize("sizes, cfg_kw, must_say", [
    # fsdp=3 does not divide hidden 64 (and 3 x 1 x 1 != 8 devices is checked separately)
    ({"data": 1, "fsdp": 3, "tensor": 1}, {}, ["'embed'", "fsdp=3", "64"]),
    # 8 query heads cannot split 16 ways
    ({"data": 1, "fsdp": 1, "tensor": 16}, {}, ["'heads'", "tensor=16", "8"]),
    # intermediate 96 over tensor=64
    ({"data": 1, "fsdp": 1, "tensor": 64}, {"intermediate_size": 96}, ["tensor=64"]),
])
def test_bad_mesh_for_model_names_axis(sizes, cfg_kw, must_say):
    with pytest.raises(MeshError) as err:
        param_partition_specs(CFG.replace(**cfg_kw), sizes)
    for text in must_say:
        assert text in str(err.value), str(err.value)


def test_bad_mesh_for_devices_names_axis():
    with pytest.raises(MeshError, match=r"data=1 x fsdp=3 x tensor=1 multiply to 3 but there are "
                                        r"8 devices"):
        make_mesh(1, 3, 1)
    with pytest.raises(MeshError, match=r"'fsdp' = -1 cannot take the rest.*3.*8 devices"):
        make_mesh(3, -1, 1)
    with pytest.raises(MeshError, match=r"'data', 'fsdp'.*-1"):
        make_mesh(-1, -1, 2)
    with pytest.raises(MeshError, match=r"'tensor': size must be >= 1"):
        make_mesh(1, -1, 0)
    with pytest.raises(MeshError, match=r"dcn_fsdp=3 must be >= 1 and divide the axis size 8"):
        make_mesh(1, 8, 1, dcn_fsdp=3)
    with pytest.raises(MeshError, match=r"'batch' of size 6 .*data=8"):
        spec_for(("batch",), (6,), make_mesh(8, 1, 1), name="batch")


def test_mesh_minus_one_takes_the_rest():
    assert dict(make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(data=-1, fsdp=1, tensor=4).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    # every device exactly once
    ids = sorted(d.id for d in make_mesh(2, 2, 2).devices.flat)
    assert ids == sorted(d.id for d in jax.devices())


def test_rule_overrides_change_layout():
    sizes = {"data": 1, "fsdp": 2, "tensor": 4}
    # sequence parallelism at layer boundaries
    assert spec_for(("batch", "seq", "embed"), (8, 16, 64), sizes, {"seq": "tensor"}) == \
        P("fsdp", "tensor", None)
    # default: embed's fsdp is taken by batch, so activations are replicated over embed
    assert spec_for(("batch", "seq", "embed"), (8, 16, 64), sizes) == P("fsdp", None, None)
    # pure tensor parallelism: embed unsharded
    specs = flatten_params(param_partition_specs(CFG, sizes, {"embed": None}))
    assert specs[("layers", "wq")] == P(None, "tensor", None, None)
    with pytest.raises(MeshError, match="unknown logical axis 'hidden'"):
        spec_for(("embed",), (64,), sizes, {"hidden": "fsdp"})
    with pytest.raises(MeshError, match="unknown mesh axis 'model'"):
        spec_for(("embed",), (64,), sizes, {"embed": "model"})
