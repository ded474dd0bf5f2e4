"""Memory planner: byte counts by hand, the CLI output, and activations against XLA's own
buffer assignment (`compiled.memory_analysis()`) on CPU."""
import json

import jax
import jax.numpy as jnp
import pytest

from phi_reason import cli
from phi_reason.jobs import plan as planner
from phi_reason.model.config import ModelConfig
from phi_reason.model.decoder import forward
from phi_reason.model.params import abstract_params
from phi_reason.sharding.mesh import MeshError

PHI4 = ModelConfig.preset("phi-4")
GiB = 2 ** 30


def phi4_param_elems_per_device(fsdp, tensor):
    """Phi-4 (PHI4_FACTS: V 100352, H 5120, I 17920, L 40, 40 heads / 10 KV heads x 128) on
    (fsdp, tensor): everything with an embed dim splits over fsdp; heads, mlp and vocab over
    tensor; the 10 KV heads do not divide tensor=4 and stay replicated along it."""
    V, H, FF, L, nH, nKV, hd = 100352, 5120, 17920, 40, 40, 10, 128
    full = fsdp * tensor
    return (V * H / full  # embed
            + H * V / full  # lm_head
            + L * H * nH * hd / full  # wq
            + 2 * L * H * nKV * hd / fsdp  # wk, wv: replicated over tensor
            + L * nH * hd * H / full  # wo
            + 3 * L * H * FF / full  # w_gate, w_up, w_down
            + 2 * L * H / fsdp + H / fsdp)  # ln1, ln2, final_norm


def test_phi4_64_h100_cli_prints_breakdown_and_verdict(capsys):
    rc = planner.main(model="phi-4", mesh="data=1,fsdp=16,tensor=4", devices=None, batch=64,
                      seq=32768, remat="full", accelerator="h100", param_dtype="float32",
                      compute_dtype="bfloat16", optimizer_dtype="float32", rollout_batch=0,
                      json=False)
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("params", "grads", "optimizer", "activations", "logits", "total", "verdict:",
                 "h100", "per device 4 x 32768"):
        assert word in out, out
    assert ("FITS" in out) != ("DOES NOT FIT" in out)
    # params are printed in GiB, matching the hand count
    elems = phi4_param_elems_per_device(16, 4)
    assert f"{elems * 4 / GiB:9.2f} GiB" in out


def test_phi4_json_breakdown_is_consistent():
    plan = planner.plan_memory(PHI4, {"data": 1, "fsdp": 16, "tensor": 4}, batch=64, seq=32768,
                               remat="full", accelerator="h100")
    elems = phi4_param_elems_per_device(16, 4)
    assert plan.params_bytes == elems * 4 == plan.grads_bytes
    assert plan.optimizer_bytes == 2 * elems * 4
    assert plan.local_batch == 4 and plan.local_seq == 32768
    # full remat keeps each layer's input [4, 32768, 5120] in bfloat16 across the 40 layers
    assert plan.saved_activations_bytes == 40 * 4 * 32768 * 5120 * 2
    # logits: float32 [4, 32768, 100352 / 4], at least the cotangent plus the saved logits
    assert plan.logits_bytes >= 2 * 4 * 32768 * 25088 * 4
    assert plan.total_bytes == (plan.params_bytes + plan.grads_bytes + plan.optimizer_bytes
                                + plan.activations_bytes + plan.logits_bytes
                                + plan.gathered_bytes)
    # FSDP gathers one layer (tensor-split) and the two vocabulary tables (embed and lm_head:
    # untied), [100352 / 4, 5120] float32 each, held again for their gradients (no logits chunk)
    layer = 4 * (5120 * 40 * 128 / 4 + 2 * 5120 * 10 * 128 + 40 * 128 * 5120 / 4
                 + 3 * 5120 * 17920 / 4 + 2 * 5120)
    assert plan.gathered_bytes == layer + 2 * (2 * 100352 // 4 * 5120 * 4)
    assert plan.fits == (plan.total_bytes <= 0.9 * 81559 * 2 ** 20)
    # the phi-4 / 64 x H100 / 64 x 32K / full-remat plan does not fit: 4 sequences per device
    # of saved layer inputs alone are 50 GiB
    assert plan.fits is False


def test_json_flag_prints_one_object(capsys):
    rc = cli.main(["plan", "--model", "phi-4-mini", "--mesh", "data=2,fsdp=4,tensor=1",
                   "--batch", "16", "--seq", "4096", "--remat", "full", "--accelerator", "v5p",
                   "--param-dtype", "bfloat16", "--rollout-batch", "32", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                "total_bytes", "fits", "kv_cache_bytes", "logits_bytes"):
        assert key in d
    # phi-4-mini: 3,836,021,760 parameters (PHI4_FACTS); fsdp=4 splits every tensor 4 ways
    assert d["params_bytes"] == 3836021760 * 2 // 4
    assert d["optimizer_bytes"] == 2 * 3836021760 * 4 // 4
    # KV cache: 32 rows over data x fsdp = 8 -> 4 rows x 4096 x 32 layers x (K, V) x 8 x 128 bf16
    assert d["kv_cache_bytes"] == 4 * 4096 * 32 * 2 * 8 * 128 * 2
    assert d["fits"] is True and d["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}


def test_suggest_mesh():
    tiny = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
    # a tiny model fits anywhere: pure data parallelism is preferred
    plan = planner.suggest_mesh(tiny, 8, batch=8, seq=128, accelerator="v5e")
    assert plan.mesh == {"data": 8, "fsdp": 1, "tensor": 1} and plan.fits
    # batch 4 cannot split 8 ways over data x fsdp: tensor parallelism takes the rest
    plan = planner.suggest_mesh(tiny, 8, batch=4, seq=128, accelerator="v5e")
    assert plan.mesh["data"] * plan.mesh["fsdp"] == 4 and plan.mesh["tensor"] == 2
    # phi-4 with AdamW on 8 x 16 GiB cannot fit at all: least memory, marked as not fitting
    plan = planner.suggest_mesh(PHI4, 8, batch=8, seq=4096, accelerator="v5e")
    assert plan.fits is False
    assert plan.params_bytes + plan.optimizer_bytes > 16 * GiB


def test_bad_plan_inputs_name_the_problem():
    with pytest.raises(MeshError, match=r"'embed' of size 5120 .*fsdp=3"):
        planner.plan_memory(PHI4, {"data": 1, "fsdp": 3, "tensor": 1}, batch=6, seq=128)
    with pytest.raises(MeshError, match=r"'heads' of size 40 .*tensor=16"):
        planner.plan_memory(PHI4, {"data": 1, "fsdp": 4, "tensor": 16}, batch=4, seq=128)
    with pytest.raises(MeshError, match=r"'batch' of size 6 .*fsdp=16"):
        planner.plan_memory(PHI4, {"data": 1, "fsdp": 16, "tensor": 4}, batch=6, seq=128)
    with pytest.raises(MeshError, match="unknown accelerator 'tpu-v9'; known: h100-pcie, h100"):
        planner.plan_memory(PHI4, {"fsdp": 16}, batch=16, seq=128, accelerator="tpu-v9")

def test_cli_errors_are_one_line(capsys):
    assert cli.main(["plan", "--model", "phi-4", "--mesh", "data=1,fsdp=-1"]) == 2
    assert "-1 axis; give --devices" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "phi-4", "--mesh", "data=1,fsdp=3,tensor=1",
                     "--batch", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'embed' of size 5120" in err and "fsdp=3" in err


# --------------------------------------------------------------- calibration against XLA
CAL = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=4096, original_max_position_embeddings=4096,
                  attention="reference")


def xla_transient_bytes(cfg, batch, seq):
    """XLA's scratch for value-and-grad of a shifted CE loss (parameters and tokens are its
    arguments, the gradients its outputs; neither is counted in temp_size_in_bytes)."""
    def loss(params, tokens):
        logp = jax.nn.log_softmax(forward(params, tokens, cfg)[:, :-1], axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    compiled = jax.jit(jax.value_and_grad(loss)).lower(
        abstract_params(cfg), jax.ShapeDtypeStruct((batch, seq), jnp.int32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("remat, batch, seq, cfg_kw", [
    ("none", 4, 64, {}),
    ("full", 2, 128, {"num_hidden_layers": 8, "vocab_size": 1024}),
    ("save_dots", 4, 64, {"hidden_size": 256, "head_dim": 64}),
], ids=["none", "full", "save_dots"])
def test_activation_estimate_within_25_percent_of_xla(remat, batch, seq, cfg_kw):
    cfg = CAL.replace(remat=remat, **cfg_kw)
    measured = xla_transient_bytes(cfg, batch, seq)
    act, saved, logits = planner.activation_estimate(cfg, batch, seq, remat, "reference")
    estimate = act + logits
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)


def test_logits_chunk_saves_memory_and_estimate_follows_xla():
    """A vocabulary-heavy config (the [B, T, V] logits dominate). XLA's buffer assignment for the
    trainer's loss: chunking removes most of the float32 logits from the gradient's temporary
    memory; the planner's estimate follows `train.logits_chunk` within 25% either way."""
    from phi_reason.train.token_stats import model_token_stats

    cfg = CAL.replace(remat="full", vocab_size=8192, num_hidden_layers=2)
    b, t = 2, 256
    logits_bytes = b * t * cfg.vocab_size * 4
    measured = {}
    for chunk in (0, 32):
        def loss(params, tokens):
            batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens)}
            return -jnp.mean(model_token_stats(params, cfg, batch, chunk=chunk).logp)

        compiled = jax.jit(jax.value_and_grad(loss)).lower(
            abstract_params(cfg), jax.ShapeDtypeStruct((b, t), jnp.int32)).compile()
        measured[chunk] = compiled.memory_analysis().temp_size_in_bytes
        act, _, logits = planner.activation_estimate(cfg, b, t, "full", "reference", chunk)
        assert abs(act + logits - measured[chunk]) <= 0.25 * measured[chunk], (chunk, act + logits,
                                                                              measured[chunk])
        if chunk:
            assert logits < logits_bytes / 3  # the estimate: a fraction of the full logits
    assert measured[0] > logits_bytes  # the full path holds at least one [B, T, V] array
    assert measured[0] - measured[32] > 0.75 * logits_bytes, measured


def test_plan_cli_logits_chunk(capsys):
    kw = dict(model="phi-4-mini", mesh="data=1,fsdp=1,tensor=1", devices=None, batch=4,
              seq=4096, remat="save_dots", accelerator="h100", param_dtype="float32",
              compute_dtype="bfloat16", optimizer_dtype="float32", rollout_batch=0, json=True)
    assert planner.main(**kw) == 0
    full = json.loads(capsys.readouterr().out)
    assert planner.main(**kw, logits_chunk=1024) == 0
    chunked = json.loads(capsys.readouterr().out)
    # float32 [4, 4096, 200064] logits: at least the array itself without chunking
    assert full["logits_bytes"] >= 4 * 4096 * 200064 * 4
    assert chunked["logits_bytes"] < full["logits_bytes"] / 3
    assert chunked["total_bytes"] < full["total_bytes"]


def test_save_dots_attn_adds_the_kernel_output_and_logsumexp_per_layer():
    cfg = ModelConfig.preset("phi-4-mini").replace(num_hidden_layers=3)
    b, t = 2, 256
    plans = {r: planner.plan_memory(cfg, {}, b, t, remat=r, accelerator=None, attention="flash")
             for r in ("save_dots", "save_dots_attn")}
    out = b * t * cfg.num_attention_heads * cfg.head_dim * 2  # bf16 kernel output
    lse = b * cfg.num_attention_heads * t * 4  # float32 logsumexp per query and head
    added = (plans["save_dots_attn"].saved_activations_bytes
             - plans["save_dots"].saved_activations_bytes)
    assert added == cfg.num_hidden_layers * (out + lse)


@pytest.mark.parametrize("cfg_kw, batch, seq, chunk, micro", [
    ({"vocab_size": 8192}, 8, 256, 32, 4),
    ({"hidden_size": 256, "head_dim": 64}, 4, 512, 64, 2),
    ({"dtype": "bfloat16"}, 4, 256, 64, 2),
], ids=["vocab-heavy", "attention-heavy", "bf16"])
def test_forward_estimate_within_25_percent_of_xla(cfg_kw, batch, seq, chunk, micro):
    """The forward-only log-prob pass (RL old/reference, DPO reference precompute): XLA's scratch
    for `make_token_logprob_fn` against `forward_estimate` of one micro-batch."""
    from phi_reason.train.policy import make_token_logprob_fn

    cfg = CAL.replace(**cfg_kw)
    abstract = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32)
                for k in ("tokens", "positions", "segment_ids")}
    compiled = make_token_logprob_fn(cfg, None, chunk, micro).lower(
        abstract_params(cfg), abstract).compile()
    measured = compiled.memory_analysis().temp_size_in_bytes
    estimate = planner.forward_estimate(cfg, batch // micro, seq, "reference", chunk)
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)
