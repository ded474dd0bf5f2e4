"""DPO and GRPO-family losses agree with trl's formulas, values *and* gradients.

trl is not installed (it would pull a second torch); the reference below transcribes
`DPOTrainer.dpo_loss` and `GRPOTrainer._compute_loss` (loss_type grpo / dr_grpo / dapo,
importance_sampling_level token / sequence, epsilon_low / epsilon_high, k3 KL with beta) in torch,
as trl documents them, and autograd gives the reference gradients.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from phi_reason.train import losses as L  # noqa: E402

RNG = np.random.default_rng(7)


def trl_dpo_loss(loss_type, beta, label_smoothing, policy_chosen_logps, policy_rejected_logps,
                 reference_chosen_logps, reference_rejected_logps):
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_matches_trl_values_and_gradients(loss_type):
    n, beta, ls = 12, 0.2, 0.1
    pc, pr, rc, rr = (RNG.normal(size=n) * 3 - 10 for _ in range(4))
    tpc = torch.tensor(pc, requires_grad=True)
    tpr = torch.tensor(pr, requires_grad=True)
    losses, cr, rj = trl_dpo_loss(loss_type, beta, ls, tpc, tpr, torch.tensor(rc), torch.tensor(rr))
    loss = losses.mean()
    loss.backward()

    def ours(pc_, pr_):
        return L.dpo_loss(loss_type, pc_, pr_, jnp.asarray(rc, jnp.float32),
                          jnp.asarray(rr, jnp.float32), beta, ls, n)

    (val, m), grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(
        jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32))
    np.testing.assert_allclose(float(val), loss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[0]), tpc.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads[1]), tpr.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(m["rewards/accuracy"]), (cr > rj).float().mean().item())
    np.testing.assert_allclose(float(m["rewards/margin"]), (cr - rj).mean().item(), rtol=1e-5)


def trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages,
                  completion_mask, loss_type, importance_sampling_level, epsilon_low,
                  epsilon_high, beta, max_completion_length):
    if beta != 0.0:
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                        - (ref_per_token_logps - per_token_logps) - 1)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * completion_mask).sum(-1)
                                  / completion_mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * completion_mask).sum(-1)
                / completion_mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * completion_mask).sum() / (per_token_loss.size(0)
                                                            * max_completion_length)
    elif loss_type == "dapo":  # num_items_in_batch = completion tokens in the global batch
        loss = (per_token_loss * completion_mask).sum() / completion_mask.sum()
    return loss


# (our name, trl loss_type, trl importance_sampling_level): GSPO = grpo aggregation, sequence ratio
TRL_SETTINGS = [("grpo", "grpo", "token"), ("dr_grpo", "dr_grpo", "token"),
                ("dapo", "dapo", "token"), ("gspo", "grpo", "sequence")]


@pytest.mark.parametrize("name,trl_type,level", TRL_SETTINGS)
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_pg_matches_trl_values_and_gradients(name, trl_type, level, beta):
    b, t, max_len = 5, 9, 12
    logp = -RNG.random((b, t)) * 2
    old = logp + RNG.normal(size=(b, t)) * (0.05 if level == "sequence" else 0.4)
    ref = logp + RNG.normal(size=(b, t)) * 0.3
    adv = RNG.normal(size=b)
    mask = (RNG.random((b, t)) < 0.7).astype(np.float64)
    mask[0, :3] = 1
    eps_lo, eps_hi = 0.2, 0.28
    tl = torch.tensor(logp, requires_grad=True)
    want = trl_grpo_loss(tl, torch.tensor(old), torch.tensor(ref), torch.tensor(adv),
                         torch.tensor(mask), trl_type, level, eps_lo, eps_hi, beta, max_len)
    want.backward()

    norms = L.Norms(jnp.float32(b), jnp.float32(mask.sum()), jnp.float32(max_len))

    def ours(lp):
        return L.PG_LOSSES[name](lp, jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
                                 jnp.asarray(mask, jnp.float32), norms, epsilon_low=eps_lo,
                                 epsilon_high=eps_hi, beta=beta,
                                 ref_logp=jnp.asarray(ref, jnp.float32))[0]

    val, grad = jax.value_and_grad(ours)(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(float(val), want.item(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), tl.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(tl.grad.numpy()).sum() > 0
