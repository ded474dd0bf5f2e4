"""Every loss against an independent numpy implementation written here, on random inputs with
masks, packing boundaries and clipping active; micro-batch sums equal the full batch."""
import jax.numpy as jnp
import numpy as np
import pytest

from phi_reason.train import losses as L

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------ numpy references
def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_targets(tokens, segment_ids, loss_mask):
    """Explicit loop: token t is a target iff mask[t], seg[t] != 0 and seg[t] == seg[t-1]."""
    b, t = tokens.shape
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(1, t):
            if (loss_mask[i, j] and segment_ids[i, j] != 0
                    and segment_ids[i, j] == segment_ids[i, j - 1]):
                out[i, j] = 1.0
    return out


def np_token_logprobs(logits, tokens):
    lp = np_log_softmax(logits.astype(np.float64))
    b, t = tokens.shape
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(1, t):
            out[i, j] = lp[i, j - 1, tokens[i, j]]
    return out


def random_packed_batch(b=3, t=12, v=17):
    tokens = RNG.integers(0, v, (b, t)).astype(np.int32)
    seg = np.zeros((b, t), np.int32)
    seg[0, :5], seg[0, 5:10] = 1, 2  # two packed segments then padding
    seg[1, :] = 1
    seg[2, :7] = 1
    mask = (RNG.random((b, t)) < 0.7).astype(np.float32)
    logits = RNG.normal(size=(b, t, v)).astype(np.float32) * 2
    return {"tokens": tokens, "segment_ids": seg, "loss_mask": mask}, logits


def test_target_mask_and_token_logprobs_match_loops():
    batch, logits = random_packed_batch()
    want_mask = np_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])
    np.testing.assert_array_equal(np.asarray(L.target_mask(batch)), want_mask)
    assert want_mask[0, 5] == 0 and want_mask[0, 0] == 0  # segment start / row start never targets
    np.testing.assert_allclose(np.asarray(L.token_logprobs(jnp.asarray(logits), batch["tokens"])),
                               np_token_logprobs(logits, batch["tokens"]), rtol=1e-5, atol=1e-5)


def test_token_entropy_matches_numpy():
    batch, logits = random_packed_batch()
    lp = np_log_softmax(logits.astype(np.float64))
    want = -(np.exp(lp) * lp).sum(-1)
    got = np.asarray(L.token_stats(jnp.asarray(logits), batch["tokens"], entropy=True).entropy)
    np.testing.assert_allclose(got[:, 1:], want[:, :-1], rtol=1e-5)
    assert np.all(got[:, 0] == 0)


def test_cross_entropy_global_normalisation_and_micro_sum():
    batch, logits = random_packed_batch()
    mask = np_targets(batch["tokens"], batch["segment_ids"], batch["loss_mask"])
    nll = -(np_token_logprobs(logits, batch["tokens"]) * mask).sum()
    denom = mask.sum()
    loss, m = L.SFT_LOSSES["ce"](jnp.asarray(logits), batch, denom)
    np.testing.assert_allclose(float(loss), nll / denom, rtol=1e-5)
    # micro-batches handed the global denominator sum to the full-batch loss, while a
    # per-micro-batch mean (the classic accumulation bug) does not
    parts = [L.SFT_LOSSES["ce"](jnp.asarray(logits[i:i + 1]),
                                {k: v[i:i + 1] for k, v in batch.items()}, denom)[0]
             for i in range(3)]
    np.testing.assert_allclose(float(sum(parts)), nll / denom, rtol=1e-5)
    per_micro_means = np.mean([-(np_token_logprobs(logits[i:i + 1], batch["tokens"][i:i + 1])
                                 * mask[i:i + 1]).sum() / mask[i:i + 1].sum() for i in range(3)])
    assert abs(per_micro_means - nll / denom) > 1e-3


# ------------------------------------------------------------------ DPO
def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_dpo(loss_type, pc, pr, rc, rr, beta, ls):
    pi_logratios, ref_logratios = pc - pr, rc - rr
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = -np_logsigmoid(beta * logits) * (1 - ls) - np_logsigmoid(-beta * logits) * ls
    elif loss_type == "robust":
        losses = (-np_logsigmoid(beta * logits) * (1 - ls)
                  + np_logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    return losses.mean(), {"rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
                           "rewards/accuracy": (cr > rj).mean(), "rewards/margin": (cr - rj).mean()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_losses_match_numpy(loss_type):
    n = 16
    pc, pr, rc, rr = (RNG.normal(size=n) * 5 - 20 for _ in range(4))
    beta, ls = 0.3, 0.15
    want, want_m = np_dpo(loss_type, pc, pr, rc, rr, beta, ls)
    got, m = L.dpo_loss(loss_type, *(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)),
                        beta, ls, n)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    for k, v in want_m.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, atol=1e-6)
    assert 0 < want_m["rewards/accuracy"] < 1  # both outcomes present
    if loss_type == "hinge":
        assert 0 < np.mean(1 - beta * ((pc - pr) - (rc - rr)) > 0) < 1  # hinge active on some
    # two micro-batches with the global pair count sum to the whole
    halves = [L.dpo_loss(loss_type, *(jnp.asarray(x[s], jnp.float32) for x in (pc, pr, rc, rr)),
                         beta, ls, n)[0] for s in (slice(0, 7), slice(7, n))]
    np.testing.assert_allclose(float(halves[0] + halves[1]), want, rtol=1e-5)


def test_unknown_dpo_loss_named():
    with pytest.raises(ValueError, match="unknown DPO loss 'bco'"):
        L.dpo_loss("bco", *(jnp.zeros(2),) * 4, 0.1, 0.0, 2)


# ------------------------------------------------------------------ policy gradient
def np_pg(loss_type, logp, old, ref, ent, adv, mask, eps_lo, eps_hi, beta, ent_coef, max_len):
    """Straight transcription of the definitions, one sequence at a time."""
    b, t = logp.shape
    if loss_type == "gspo":
        ratio = np.zeros_like(logp)
        for i in range(b):
            n = max(mask[i].sum(), 1)
            ratio[i, :] = np.exp(((logp[i] - old[i]) * mask[i]).sum() / n)
    else:
        ratio = np.exp(logp - old)
    clipped = np.clip(ratio, 1 - eps_lo, 1 + eps_hi)
    per_tok = -np.minimum(ratio * adv[:, None], clipped * adv[:, None])
    kl = np.exp(ref - logp) - (ref - logp) - 1
    per_tok = per_tok + beta * kl

    def agg(x):
        if loss_type in ("grpo", "gspo"):
            return np.mean([(x[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(b)])
        if loss_type == "dr_grpo":
            return (x * mask).sum() / (b * max_len)
        return (x * mask).sum() / mask.sum()

    loss = agg(per_tok) - ent_coef * agg(ent)
    low = (ratio < 1 - eps_lo) & (adv[:, None] < 0)
    high = (ratio > 1 + eps_hi) & (adv[:, None] > 0)
    tm = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    return loss, {"kl": tm(kl), "entropy": tm(ent), "clip_fraction": tm(low | high),
                  "clip_fraction/low": tm(low), "clip_fraction/high": tm(high),
                  "ratio/mean": tm(ratio), "ratio/max": ratio[mask > 0].max(),
                  "ratio/min": ratio[mask > 0].min()}


def pg_inputs(b=6, t=10):
    logp = -RNG.random((b, t)) * 3
    old = logp + RNG.normal(size=(b, t)) * 0.4  # ratios far outside 1 +- eps: clipping active
    ref = logp + RNG.normal(size=(b, t)) * 0.3
    ent = RNG.random((b, t)) * 2
    adv = RNG.normal(size=b)
    adv[0] = 0.0
    mask = (RNG.random((b, t)) < 0.6).astype(np.float64)
    mask[1] = 0.0  # an empty completion must not divide by zero
    mask[2, :] = 1.0
    return logp, old, ref, ent, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_pg_losses_match_numpy(loss_type):
    logp, old, ref, ent, adv, mask = pg_inputs()
    b, t = logp.shape
    eps_lo, eps_hi, beta, ent_coef, max_len = 0.2, 0.28, 0.04, 0.01, 16
    want, want_m = np_pg(loss_type, logp, old, ref, ent, adv, mask, eps_lo, eps_hi, beta,
                         ent_coef, max_len)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    norms = L.Norms(jnp.float32(b), jnp.float32(mask.sum()), jnp.float32(max_len))
    kw = dict(epsilon_low=eps_lo, epsilon_high=eps_hi, beta=beta, entropy_coef=ent_coef)
    got, m = L.PG_LOSSES[loss_type](f32(logp), f32(old), f32(adv), f32(mask), norms,
                                    ref_logp=f32(ref), entropy=f32(ent), **kw)
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-6)
    for k, v in want_m.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)
    if loss_type != "gspo":
        assert 0 < want_m["clip_fraction/low"] and 0 < want_m["clip_fraction/high"]
    # micro-batches with global norms: sums (and max/min) reproduce the full batch
    parts = [L.PG_LOSSES[loss_type](f32(logp[s]), f32(old[s]), f32(adv[s]), f32(mask[s]), norms,
                                    ref_logp=f32(ref[s]), entropy=f32(ent[s]), **kw)
             for s in (slice(0, 2), slice(2, b))]
    np.testing.assert_allclose(float(parts[0][0] + parts[1][0]), want, rtol=2e-5, atol=1e-6)
    stacked = {k: jnp.stack([parts[0][1][k], parts[1][1][k]]) for k in parts[0][1]}
    red = L.reduce_micro_metrics(stacked)
    for k, v in want_m.items():
        np.testing.assert_allclose(float(red[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)


def test_gspo_clips_whole_sequences():
    """GSPO's ratio is one number per sequence: every token of a row is clipped or none is."""
    logp, old, ref, ent, adv, mask = pg_inputs(b=16)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    norms = L.Norms(jnp.float32(16), jnp.float32(mask.sum()), jnp.float32(10))
    _, m = L.PG_LOSSES["gspo"](f32(logp), f32(old), f32(adv), f32(mask), norms,
                               epsilon_low=0.05, epsilon_high=0.05)
    seq_ratio = np.exp(((logp - old) * mask).sum(1) / np.maximum(mask.sum(1), 1))
    clipped = (((seq_ratio < 0.95) & (adv < 0)) | ((seq_ratio > 1.05) & (adv > 0)))
    want = (clipped[:, None] * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(m["clip_fraction"]), want, rtol=1e-5)
    assert 0 < want < 1


def test_kl_requires_reference():
    logp, old, _, _, adv, mask = pg_inputs()
    norms = L.Norms(jnp.float32(6), jnp.float32(mask.sum()), jnp.float32(10))
    with pytest.raises(ValueError, match="ref_logprobs"):
        L.PG_LOSSES["grpo"](jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                            jnp.asarray(mask), norms, epsilon_low=0.2, epsilon_high=0.2, beta=0.1)


# ------------------------------------------------------------------ loss aggregation
def np_aggregate(name, x, mask, max_len):
    """The field's aggregation modes written out, one sequence at a time (B counts every row,
    empty ones included; N = all target tokens; L = the constant length)."""
    b = x.shape[0]
    if name == "token-mean":  # sum_i sum_t x / N
        return (x * mask).sum() / mask.sum()
    if name == "seq-mean-token-mean":  # 1/B sum_i (1/|o_i|) sum_t x
        return sum((x[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(b)) / b
    if name == "seq-mean-token-sum":  # 1/B sum_i sum_t x
        return sum((x[i] * mask[i]).sum() for i in range(b)) / b
    if name == "seq-mean-token-sum-norm":  # 1/(B L) sum_i sum_t x  (Dr. GRPO)
        return sum((x[i] * mask[i]).sum() for i in range(b)) / (b * max_len)
    raise KeyError(name)


AGG_NAMES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def test_aggregation_registry_names_and_defaults():
    """The registry carries exactly the field's names, and each loss_type's default is the one
    documented (grpo / gspo: GRPO paper; dapo: trl's default and verl's token-mean; dr_grpo:
    Dr. GRPO's constant normaliser)."""
    assert sorted(L.PG_AGGREGATIONS) == sorted(AGG_NAMES)
    assert {k: v.aggregate for k, v in L.PG_VARIANTS.items()} == {
        "grpo": "seq-mean-token-mean", "gspo": "seq-mean-token-mean", "dapo": "token-mean",
        "dr_grpo": "seq-mean-token-sum-norm"}


@pytest.mark.parametrize("agg", AGG_NAMES)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_loss_agg_override_matches_formula(loss_type, agg):
    logp, old, ref, ent, adv, mask = pg_inputs()
    b, max_len = logp.shape[0], 16
    eps_lo, eps_hi, beta, ent_coef = 0.2, 0.28, 0.04, 0.01
    ratio = np.exp(logp - old)
    per_tok = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps_lo, 1 + eps_hi)
                          * adv[:, None])
    per_tok = per_tok + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    want = (np_aggregate(agg, per_tok, mask, max_len)
            - ent_coef * np_aggregate(agg, ent, mask, max_len))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    norms = L.Norms(jnp.float32(b), jnp.float32(mask.sum()), jnp.float32(max_len))
    kw = dict(epsilon_low=eps_lo, epsilon_high=eps_hi, beta=beta, entropy_coef=ent_coef,
              loss_agg=agg, ref_logp=f32(ref), entropy=f32(ent))
    got, _ = L.PG_LOSSES[loss_type](f32(logp), f32(old), f32(adv), f32(mask), norms, **kw)
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-6)
    # micro-batches with the global norms sum to the whole, in every mode
    parts = [L.PG_LOSSES[loss_type](f32(logp[s]), f32(old[s]), f32(adv[s]), f32(mask[s]), norms,
                                    **dict(kw, ref_logp=f32(ref[s]), entropy=f32(ent[s])))[0]
             for s in (slice(0, 2), slice(2, b))]
    np.testing.assert_allclose(float(parts[0] + parts[1]), want, rtol=2e-5, atol=1e-6)


def test_aggregation_modes_differ_on_this_input():
    """The four modes are four different numbers here (a test that mixed them up would fail)."""
    logp, old, _, _, adv, mask = pg_inputs()
    norms = L.Norms(jnp.float32(6), jnp.float32(mask.sum()), jnp.float32(16))
    vals = [float(L.PG_LOSSES["grpo"](*(jnp.asarray(x, jnp.float32) for x in
                                        (logp, old, adv, mask)), norms, epsilon_low=0.2,
                                      epsilon_high=0.2, loss_agg=a)[0]) for a in AGG_NAMES]
    assert len({round(v, 6) for v in vals}) == 4, vals
    with pytest.raises(ValueError, match="unknown loss aggregation 'token_mean'"):
        L.PG_LOSSES["grpo"](*(jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask)),
                            norms, epsilon_low=0.2, epsilon_high=0.2, loss_agg="token_mean")


# ------------------------------------------------------------------ truncated importance sampling
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "gspo"])
def test_tis_weights_surrogate_against_numpy(loss_type):
    """TIS: per token w = min(exp(old - sampler), C) multiplies the clipped surrogate only (the
    KL and entropy terms are unweighted), as verl applies rollout_is_weights."""
    logp, old, ref, ent, adv, mask = pg_inputs()
    sampler = old + RNG.normal(size=old.shape) * 0.8  # ratios on both sides of C = 2
    cap, eps_lo, eps_hi, beta, ent_coef, max_len = 2.0, 0.2, 0.28, 0.04, 0.01, 16
    b = logp.shape[0]
    w = np.minimum(np.exp(old - sampler), cap)
    assert ((np.exp(old - sampler) > cap) & (mask > 0)).any() and (w[mask > 0] < 1).any()
    if loss_type == "gspo":
        ratio = np.exp((((logp - old) * mask).sum(1) / np.maximum(mask.sum(1), 1)))[:, None]
        ratio = np.broadcast_to(ratio, logp.shape)
    else:
        ratio = np.exp(logp - old)
    surrogate = -np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps_lo, 1 + eps_hi)
                            * adv[:, None])
    kl = np.exp(ref - logp) - (ref - logp) - 1
    agg = {"grpo": "seq-mean-token-mean", "gspo": "seq-mean-token-mean",
           "dapo": "token-mean"}[loss_type]
    want = (np_aggregate(agg, w * surrogate + beta * kl, mask, max_len)
            - ent_coef * np_aggregate(agg, ent, mask, max_len))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    norms = L.Norms(jnp.float32(b), jnp.float32(mask.sum()), jnp.float32(max_len))
    kw = dict(epsilon_low=eps_lo, epsilon_high=eps_hi, beta=beta, entropy_coef=ent_coef,
              ref_logp=f32(ref), entropy=f32(ent))
    got, m = L.PG_LOSSES[loss_type](f32(logp), f32(old), f32(adv), f32(mask), norms,
                                    sampler_logp=f32(sampler), tis_cap=cap, **kw)
    np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-6)
    tm = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    np.testing.assert_allclose(float(m["tis/weight_mean"]), tm(w), rtol=1e-5)
    np.testing.assert_allclose(float(m["tis/clip_fraction"]), tm(np.exp(old - sampler) > cap),
                               rtol=1e-5)
    # the weight is a constant: the gradient is w times the unweighted surrogate's gradient
    import jax

    def loss(lp, **extra):
        return L.PG_LOSSES[loss_type](lp, f32(old), f32(adv), f32(mask), norms,
                                      epsilon_low=eps_lo, epsilon_high=eps_hi, **extra)[0]

    g_tis = jax.grad(lambda lp: loss(lp, sampler_logp=f32(sampler), tis_cap=cap))(f32(logp))
    g_raw = jax.grad(loss)(f32(logp))
    if loss_type != "gspo":  # token ratio: per-token gradients scale by w exactly
        np.testing.assert_allclose(np.asarray(g_tis), w * np.asarray(g_raw), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="sampler_logprobs"):
        L.PG_LOSSES[loss_type](f32(logp), f32(old), f32(adv), f32(mask), norms, tis_cap=cap, **kw)
    # without TIS no tis metrics and the unweighted loss
    got_off, m_off = L.PG_LOSSES[loss_type](f32(logp), f32(old), f32(adv), f32(mask), norms, **kw)
    assert "tis/weight_mean" not in m_off and abs(float(got_off) - want) > 1e-4


def test_tempered_token_logprobs_match_numpy():
    """logits / T per row: the log-probs of the tempered distribution the sampler draws from."""
    batch, logits = random_packed_batch()
    temps = np.array([0.6, 1.0, 1.7], np.float32)
    want = np_token_logprobs(logits / temps[:, None, None], batch["tokens"])
    got = L.token_logprobs(jnp.asarray(logits), batch["tokens"], jnp.asarray(temps))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    scalar = L.token_logprobs(jnp.asarray(logits), batch["tokens"], 0.6)
    np.testing.assert_allclose(np.asarray(scalar),
                               np_token_logprobs(logits / 0.6, batch["tokens"]), rtol=1e-5,
                               atol=1e-5)
    lp = np_log_softmax(logits.astype(np.float64) / temps[:, None, None])
    ent = L.token_stats(jnp.asarray(logits), batch["tokens"], entropy=True,
                        temperature=jnp.asarray(temps)).entropy
    np.testing.assert_allclose(np.asarray(ent)[:, 1:], -(np.exp(lp) * lp).sum(-1)[:, :-1],
                               rtol=1e-5)
