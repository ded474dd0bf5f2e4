"""Step functions and optimizer: accumulation equals the full batch, packing does not change the
loss, non-finite updates are never applied, weight decay skips norms, schedules, mixed
precision, and the sharded path agrees with the single-device one."""
import dataclasses
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_reason.config import load_run_config
from phi_reason.model.config import ModelConfig
from phi_reason.model.params import init_params
from phi_reason.train.optim import learning_rate_schedule, make_optimizer, weight_decay_mask
from phi_reason.train.state import TrainState
from phi_reason.train.steps import make_dpo_step, make_pg_step, make_sft_step

CFG = ModelConfig.preset("tiny")
B, T = 4, 24


def train_cfg(**kw):
    # Adam's first update is lr * g / (|g| + eps): with a tiny eps it is ~lr * sign(g), which
    # turns last-bit gradient differences (summation order) into lr-sized parameter differences
    # wherever g ~ 0. eps = 1 makes the update linear in g, so comparing updated parameters
    # compares the gradients themselves.
    over = ["train.steps=10", f"train.batch_size={B}", "train.lr=1e-2", "train.warmup_steps=0",
            "train.weight_decay=0.1", "train.grad_clip=null", "train.eps=1.0"]
    return load_run_config(None, over + [f"train.{k}={v}" for k, v in kw.items()]).train


def fresh_state(tc, cfg=CFG, ref=False):
    params = init_params(cfg, jax.random.PRNGKey(0))
    opt, _ = make_optimizer(tc, cfg)
    ref_params = jax.tree_util.tree_map(jnp.copy, params) if ref else None
    return TrainState.create(params, opt, 0, ref_params)


def rows(rng, b=B, t=T):
    """Unpacked rows of random lengths: prompt (mask 0) then answer (mask 1), then padding."""
    batch = {k: np.zeros((b, t), np.int32) for k in ("tokens", "positions", "segment_ids",
                                                     "loss_mask")}
    for i in range(b):
        n = int(rng.integers(8, t + 1))
        batch["tokens"][i, :n] = rng.integers(1, CFG.vocab_size, n)
        batch["positions"][i, :n] = np.arange(n)
        batch["segment_ids"][i, :n] = 1
        batch["loss_mask"][i, n // 2:n] = 1
    batch["loss_mask"] = batch["loss_mask"].astype(np.float32)  # one dtype: one compilation
    return batch


def leaves_close(a, b, **kw):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.fixture(scope="module")
def sft_steps():
    return {1: make_sft_step(CFG, train_cfg()),
            2: make_sft_step(CFG, train_cfg(micro_batch_size=2))}


def test_sft_accumulation_equals_full_batch(sft_steps):
    batch = rows(np.random.default_rng(0))
    s_full, m_full = sft_steps[1](fresh_state(train_cfg()), batch)
    s_acc, m_acc = sft_steps[2](fresh_state(train_cfg()), batch)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_full["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-5)
    leaves_close(s_acc.params, s_full.params, rtol=1e-5, atol=1e-7)
    # the loss is the mean over the global batch's target tokens (not a mean of micro means)
    targets = batch["loss_mask"][:, 1:] * (batch["segment_ids"][:, 1:] > 0)
    assert float(m_full["target_tokens"]) == float(targets.sum())


def test_packed_and_unpacked_give_the_same_loss(sft_steps):
    rng = np.random.default_rng(1)
    lengths = [9, 7, 11, 6]
    examples = [(rng.integers(1, CFG.vocab_size, n), (np.arange(n) >= n // 3).astype(np.int32))
                for n in lengths]
    unpacked = {k: np.zeros((4, T), np.int32) for k in ("tokens", "positions", "segment_ids",
                                                         "loss_mask")}
    unpacked["loss_mask"] = unpacked["loss_mask"].astype(np.float32)
    packed = {k: np.zeros_like(v) for k, v in unpacked.items()}
    fill = [0, 0]
    for i, (tok, mask) in enumerate(examples):
        n = len(tok)
        for k, v in (("tokens", tok), ("positions", np.arange(n)), ("segment_ids", 1),
                     ("loss_mask", mask)):
            unpacked[k][i, :n] = v
        row = i // 2  # two examples per packed row, rows 2-3 all padding
        a = fill[row]
        for k, v in (("tokens", tok), ("positions", np.arange(n)), ("segment_ids", i % 2 + 1),
                     ("loss_mask", mask)):
            packed[k][row, a:a + n] = v
        fill[row] += n
    _, m_u = sft_steps[1](fresh_state(train_cfg()), unpacked)
    _, m_p = sft_steps[1](fresh_state(train_cfg()), packed)
    assert float(m_u["target_tokens"]) == float(m_p["target_tokens"])
    np.testing.assert_allclose(float(m_p["loss"]), float(m_u["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_p["grad_norm"]), float(m_u["grad_norm"]), rtol=1e-4)


def test_nonfinite_update_is_not_applied(sft_steps):
    batch = rows(np.random.default_rng(2))
    batch["loss_mask"][1, -3] = np.nan if batch["segment_ids"][1, -3] else 0
    batch["loss_mask"][0, 12] = np.nan
    state = fresh_state(train_cfg())
    before = jax.tree_util.tree_map(np.asarray, state.params)
    opt_before = jax.tree_util.tree_map(np.asarray, state.opt_state)
    new, m = sft_steps[1](state, batch)
    assert float(m["finite"]) == 0.0 and not math.isfinite(float(m["loss"]))
    leaves_close(new.params, before, rtol=0, atol=0)
    leaves_close(new.opt_state, opt_before, rtol=0, atol=0)
    assert int(new.step) == 1


def test_weight_decay_skips_norms_exactly(sft_steps):
    """Zero gradients (no targets): AdamW's update is pure decoupled decay, -lr*wd*p, on every
    weight except the norm scales."""
    mask_tree = weight_decay_mask(CFG)
    assert mask_tree["layers"]["ln1"] is False and mask_tree["final_norm"] is False
    assert mask_tree["layers"]["wq"] is True and mask_tree["embed"] is True
    batch = rows(np.random.default_rng(3))
    batch["loss_mask"][:] = 0
    state = fresh_state(train_cfg())
    before = jax.tree_util.tree_map(np.asarray, state.params)
    new, m = sft_steps[1](state, batch)
    assert float(m["grad_norm"]) == 0.0
    lr, wd = 1e-2, 0.1
    for path in (("embed",), ("layers", "wq"), ("layers", "w_down"), ("layers", "ln1"),
                 ("final_norm",)):
        p0 = before[path[0]] if len(path) == 1 else before[path[0]][path[1]]
        p1 = new.params[path[0]] if len(path) == 1 else new.params[path[0]][path[1]]
        decayed = path[-1] not in ("ln1", "ln2", "final_norm")
        want = p0 - lr * wd * p0 if decayed else p0
        np.testing.assert_allclose(np.asarray(p1), want, rtol=1e-6, atol=1e-9)


def test_schedules_match_formulas():
    tc = train_cfg(lr=2.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = learning_rate_schedule(tc, 110)
    assert float(f(0)) == 0.0
    np.testing.assert_allclose(float(f(5)), 1.0, rtol=1e-6)
    for s in (10, 35, 60, 110):
        frac = (s - 10) / 100
        want = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        np.testing.assert_allclose(float(f(s)), want, rtol=1e-5)
    lin = learning_rate_schedule(train_cfg(lr=1.0, schedule="linear", warmup_ratio=0.1), 50)
    # warm-up round(0.1 * 50) = 5 steps, then 1 -> 0 over the remaining 45
    np.testing.assert_allclose([float(lin(s)) for s in (0, 5, 30, 50)],
                               [0, 1.0, 1 - 25 / 45, 0.0], atol=1e-6)
    const = learning_rate_schedule(train_cfg(lr=3.0, schedule="constant", warmup_steps=4), 50)
    np.testing.assert_allclose([float(const(s)) for s in (2, 4, 49)], [1.5, 3.0, 3.0], rtol=1e-6)


def test_bf16_compute_keeps_float32_master_params(sft_steps):
    cfg16 = CFG.replace(dtype="bfloat16")
    tc = train_cfg()
    batch = rows(np.random.default_rng(4))
    s16, m16 = make_sft_step(cfg16, tc)(fresh_state(tc, cfg16), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(s16.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(s16.opt_state)
               if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating))
    _, m32 = sft_steps[1](fresh_state(tc), batch)
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=2e-2)
    assert float(m16["loss"]) != float(m32["loss"])  # the compute really ran in bfloat16


def dpo_batch(rng):
    c, r = rows(rng), rows(rng)
    out = {f"chosen_{k}": v for k, v in c.items()}
    out.update({f"rejected_{k}": v for k, v in r.items()})
    return out


def test_dpo_step_reference_modes_and_accumulation():
    from phi_reason.model.decoder import forward
    from phi_reason.train.losses import target_mask, token_logprobs
    batch = dpo_batch(np.random.default_rng(5))
    tc = train_cfg(**{"dpo.loss_type": "sigmoid", "dpo.beta": 0.5})
    # precomputed reference sums (what the one-pass precompute stores), written out here from
    # the full logits rather than through the step's own log-prob code
    params = init_params(CFG, jax.random.PRNGKey(0))

    def ref_sums(prefix):
        side = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
        logits = forward(params, side["tokens"], CFG, positions=side.get("positions"),
                         segment_ids=side["segment_ids"])
        return jnp.sum(token_logprobs(logits, side["tokens"]) * target_mask(side), axis=-1)

    ref_c, ref_r = ref_sums("chosen_"), ref_sums("rejected_")
    pre = dict(batch, chosen_ref_logps=np.asarray(ref_c), rejected_ref_logps=np.asarray(ref_r))
    s_pre, m_pre = make_dpo_step(CFG, tc)(fresh_state(tc), pre)
    # reference from frozen params in the state, and two micro-batches
    tc2 = dataclasses.replace(tc, micro_batch_size=2)
    s_acc, m_acc = make_dpo_step(CFG, tc2)(fresh_state(tc2, ref=True), batch)
    # policy == reference at step 0: h = 0, sigmoid loss = log 2, rewards 0
    np.testing.assert_allclose(float(m_pre["loss"]), math.log(2), rtol=1e-5)
    np.testing.assert_allclose(float(m_acc["loss"]), math.log(2), rtol=1e-5)
    np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_pre["grad_norm"]), rtol=1e-4)
    leaves_close(s_acc.params, s_pre.params, rtol=1e-4, atol=1e-6)
    assert float(m_pre["grad_norm"]) > 0


def test_pg_step_accumulates_with_global_token_normaliser():
    """dapo divides by the global batch's token count, the normaliser micro-batching most easily
    gets wrong. On-policy (ratio 1, nothing clipped) its loss is the token-weighted mean of -A,
    which two micro-batches of unequal token counts must reproduce exactly."""
    rng = np.random.default_rng(6)
    batch = dict(rows(rng), advantages=rng.normal(size=B).astype(np.float32))
    tc = train_cfg(**{"pg.loss_type": "dapo", "micro_batch_size": 2})
    _, m = make_pg_step(CFG, tc)(fresh_state(tc), batch)
    assert float(m["ratio/max"]) == 1.0 and float(m["clip_fraction"]) == 0.0
    mask = (batch["loss_mask"][:, 1:] * (batch["segment_ids"][:, 1:] > 0)).astype(np.float64)
    assert mask[:2].sum() != mask[2:].sum()
    adv = batch["advantages"].astype(np.float64)
    want = -(adv[:, None] * mask).sum() / mask.sum()
    per_micro_mean = np.mean([-(adv[s, None] * mask[s]).sum() / mask[s].sum()
                              for s in (slice(0, 2), slice(2, 4))])
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
    assert abs(per_micro_mean - want) > 1e-3  # the wrong normaliser would be detected
    assert float(m["grad_norm"]) > 0


@pytest.mark.skipif(importlib.util.find_spec("phi_reason.sharding.rules") is None,
                    reason="sharding module not present")
def test_sharded_step_matches_single_device(sft_steps):
    from phi_reason.jobs.build import place_batch
    from phi_reason.model.sharded import param_shardings, sharded_init
    from phi_reason.sharding.init import sharded_opt_init
    from phi_reason.sharding.mesh import make_mesh

    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])  # batch 4: 2-way
    tc = train_cfg(micro_batch_size=2)
    batch = rows(np.random.default_rng(7))
    want_state, want = sft_steps[2](fresh_state(tc), batch)
    params = sharded_init(CFG, jax.random.PRNGKey(0), mesh)
    opt, _ = make_optimizer(tc, CFG)
    state = TrainState(params=params, opt_state=sharded_opt_init(opt, params,
                                                                 param_shardings(CFG, mesh), mesh),
                       step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0))
    step = make_sft_step(CFG, tc, mesh)
    got_state, got = step(state, place_batch(batch, mesh))
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
    leaves_close(got_state.params, want_state.params, rtol=1e-4, atol=1e-6)
    wq = got_state.params["layers"]["wq"]
    assert wq.sharding == param_shardings(CFG, mesh)["layers"]["wq"]
    got_state, _ = step(got_state, place_batch(batch, mesh))  # a second step: same shardings
    assert got_state.params["layers"]["wq"].sharding == wq.sharding


def _np_tempered_logprobs(params, batch, temps):
    """Old log-probs written out from the model's full logits: log softmax(logits / T_row)."""
    from phi_reason.model.decoder import forward
    logits = np.asarray(forward(params, batch["tokens"], CFG, positions=batch["positions"],
                                segment_ids=batch["segment_ids"]), np.float64)
    x = logits / np.asarray(temps, np.float64)[:, None, None]
    x = x - x.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    out = np.zeros(batch["tokens"].shape)
    out[:, 1:] = np.take_along_axis(lp[:, :-1], batch["tokens"][:, 1:, None], -1)[..., 0]
    return out.astype(np.float32)


@pytest.mark.parametrize("chunk", [0, 5])
def test_pg_step_log_probs_at_the_batch_temperature(chunk):
    """With batch["temperature"] the step's log pi is log softmax(logits / T) row by row: old
    log-probs of the tempered distribution give ratio 1 (and without the key they do not). The
    temperature is traced: a second temperature reuses the compiled step."""
    rng = np.random.default_rng(8)
    temps = np.array([0.6, 0.6, 1.0, 0.3], np.float32)
    batch = dict(rows(rng), advantages=rng.normal(size=B).astype(np.float32))
    params = init_params(CFG, jax.random.PRNGKey(0))
    batch["old_logprobs"] = _np_tempered_logprobs(params, batch, temps)
    tc = dataclasses.replace(train_cfg(**{"pg.loss_type": "grpo"}), logits_chunk=chunk)
    step = make_pg_step(CFG, tc)
    _, m = step(fresh_state(tc), dict(batch, temperature=temps))
    np.testing.assert_allclose([float(m["ratio/min"]), float(m["ratio/max"])], [1.0, 1.0],
                               atol=2e-5)
    _, m2 = step(fresh_state(tc), dict(batch, temperature=np.full(B, 0.45, np.float32)))
    assert float(m2["ratio/max"]) > 1.01  # a different temperature, a different policy
    assert step._cache_size() == 1  # ... and the same compiled program
    _, m1 = make_pg_step(CFG, tc)(fresh_state(tc), batch)  # no temperature: T = 1
    assert float(m1["ratio/max"]) > 1.01 or float(m1["ratio/min"]) < 0.99


def test_pg_step_loss_agg_and_tis():
    """train.pg.loss_agg replaces the loss_type's aggregation in the step (on-policy: the loss is
    the aggregated -A); train.pg.tis weights each token by min(exp(old - sampler), C)."""
    rng = np.random.default_rng(9)
    batch = dict(rows(rng), advantages=rng.normal(size=B).astype(np.float32))
    mask = (batch["loss_mask"][:, 1:] * (batch["segment_ids"][:, 1:] > 0)).astype(np.float64)
    mask = np.pad(mask, ((0, 0), (1, 0)))
    adv = batch["advantages"].astype(np.float64)
    tc = train_cfg(**{"pg.loss_type": "grpo", "pg.loss_agg": "seq-mean-token-sum"})
    _, m = make_pg_step(CFG, tc)(fresh_state(tc), batch)
    np.testing.assert_allclose(float(m["loss"]), -(adv[:, None] * mask).sum() / B, rtol=1e-5)
    # TIS with the old log-probs recomputed exactly (ratio 1) and a perturbed sampler
    params = init_params(CFG, jax.random.PRNGKey(0))
    old = _np_tempered_logprobs(params, batch, np.ones(B))
    sampler = (old + rng.normal(size=old.shape) * 0.8).astype(np.float32)
    tc = train_cfg(**{"pg.loss_type": "dapo", "pg.tis": "true", "pg.tis_cap": 2.0})
    _, m = make_pg_step(CFG, tc)(fresh_state(tc), dict(batch, old_logprobs=old,
                                                      sampler_logprobs=sampler))
    w = np.minimum(np.exp(old.astype(np.float64) - sampler), 2.0)
    np.testing.assert_allclose(float(m["loss"]), -(w * adv[:, None] * mask).sum() / mask.sum(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m["tis/weight_mean"]), (w * mask).sum() / mask.sum(),
                               rtol=1e-4)
    with pytest.raises(ValueError, match="sampler_logprobs"):
        make_pg_step(CFG, tc)(fresh_state(tc), dict(batch, old_logprobs=old))
