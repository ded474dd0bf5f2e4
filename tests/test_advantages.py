"""Advantage estimators vs numpy written out here; dynamic sampling and schedule behaviour."""
import numpy as np
import pytest

from phi_reason.train.advantages import (
    GroupBuffer,
    compute_advantages,
    nonzero_variance_groups,
    pass_rate_keep,
)
from phi_reason.train.schedules import TemperatureSchedule


@pytest.fixture(scope="module")
def rewards():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(6, 8))
    r[2] = 1.0                       # zero-variance group
    r[3] = np.array([1, -1] * 4)    # binary rewards
    return r


def test_grpo_group(rewards):
    got = compute_advantages("grpo", rewards)
    for i, row in enumerate(rewards):
        mean = sum(row) / len(row)
        std = np.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))
        np.testing.assert_allclose(got[i], (row - mean) / (std + 1e-4), rtol=1e-12, atol=1e-12)
    assert np.all(got[2] == 0)
    # Binary group of four +1 / four -1: mean 0, unbiased std sqrt(8/7).
    np.testing.assert_allclose(got[3], rewards[3] / (np.sqrt(8 / 7) + 1e-4))


def test_grpo_batch_and_none_and_eps(rewards):
    batch_std = np.std(rewards.ravel(), ddof=1)
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(compute_advantages("grpo", rewards, scale_rewards="batch"),
                               centred / (batch_std + 1e-4), rtol=1e-12)
    np.testing.assert_allclose(compute_advantages("grpo", rewards, scale_rewards=False), centred)
    got = compute_advantages("grpo", rewards, eps=0.5, ddof=0)
    np.testing.assert_allclose(got, centred / (rewards.std(axis=1, keepdims=True) + 0.5),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages("grpo", rewards, scale_rewards="grop")


def test_dr_grpo(rewards):
    want = np.stack([row - row.sum() / len(row) for row in rewards])
    np.testing.assert_allclose(compute_advantages("dr_grpo", rewards), want, atol=1e-12)


def test_rloo(rewards):
    want = np.array([[row[j] - np.mean(np.delete(row, j)) for j in range(len(row))]
                     for row in rewards])
    np.testing.assert_allclose(compute_advantages("rloo", rewards), want, atol=1e-12)
    # RLOO advantages are the centred rewards scaled by G/(G-1).
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(want, centred * 8 / 7, atol=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("ppo", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_advantages("grpo", np.zeros((3,)))


def test_dynamic_sampling_never_keeps_zero_variance_group():
    rng = np.random.default_rng(1)
    buf = GroupBuffer(target=16)
    rounds = 0
    while not buf.full:
        rounds += 1
        # Binary rewards with a high pass rate: many groups are all-correct.
        correct = rng.random((8, 4)) < 0.85
        r = np.where(correct, 1.0, -1.0)
        keep = nonzero_variance_groups(r)
        assert keep.sum() < 8 or rounds > 50  # the filter really drops groups here
        buf.add(list(r), keep)
        assert rounds < 100
    assert len(buf.groups) == 16 and buf.seen > 16
    for g in buf.groups:
        assert np.std(g) > 0
        assert np.all(compute_advantages("grpo", g[None]) != 0)


def test_pass_rate_filter():
    c = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(pass_rate_keep(c), [False, False, True, True, True])
    np.testing.assert_array_equal(pass_rate_keep(c, max_pass=0.5),
                                  [False, False, True, False, True])
    np.testing.assert_array_equal(pass_rate_keep(c, keep_all_wrong=True),
                                  [False, True, True, True, True])


def test_temperature_schedule():
    s = TemperatureSchedule(1.0, 0.6, anneal_steps=10)
    assert [s(k) for k in (0, 5, 10, 50)] == pytest.approx([1.0, 0.8, 0.6, 0.6])
    c = TemperatureSchedule(1.0, 0.6, anneal_steps=10, kind="cosine")
    assert (c(5) == pytest.approx(0.8)
            and c(2) == pytest.approx(1.0 - 0.4 * 0.5 * (1 - np.cos(0.2 * np.pi))))
    assert TemperatureSchedule(0.7)(100) == 0.7
    with pytest.raises(ValueError, match="kind"):
        TemperatureSchedule(kind="exp")
