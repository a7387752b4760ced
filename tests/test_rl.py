"""Stage 2 (anti-causal alignment): the objective against an independent transcription of
Eq. 9-11, DPO against its closed form, then the trainer on tiny models."""
from __future__ import annotations

import math

import pytest
import torch

from siren.rl import objective as obj


# ---------------------------------------------------------------- Eq. 9-11 on fixed tensors

def eq10_by_hand(logp, logp_old, rewards, mask, gamma, eps_d, eps_u):
    """J(theta) of Eq. 10 written out with loops and floats, independently of siren.rl."""
    B, G = len(rewards), len(rewards[0])
    A = []
    for b in range(B):  # Eq. 9
        mean = sum(rewards[b]) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards[b]) / G)
        A += [(r - mean) / std if std > 0 else 0.0 for r in rewards[b]]
    kept = [i for i in range(B * G) if abs(A[i]) >= gamma and A[i] != 0.0]
    L, T = len(logp[0]), len(logp[0][0])
    total = 0.0
    for i in kept:
        frames = [t for t in range(T) if mask[i][t]]
        s = 0.0
        for t in frames:
            for j in range(L):
                r = math.exp(logp[i][j][t] - logp_old[i][j][t])  # Eq. 11
                v = min(max(r, 1 - eps_d), 1 + eps_u)
                s += min(r * A[i], v * A[i])
        total += s / len(frames) / L
    return total / len(kept), A, kept


@pytest.fixture
def fixed_batch():
    g = torch.Generator().manual_seed(0)
    B, G, L, T = 3, 4, 2, 5
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.45],  # one advantage near 0 -> gamma filter
                            [0.3, 0.3, 0.3, 0.3],  # all equal -> degenerate group
                            [-0.2, 0.4, 0.0, 0.7]])
    logp_old = -torch.rand(B * G, L, T, generator=g) * 3 - 0.1
    # ratios spread over [0.5, 1.6]: the clip binds on both sides for eps 0.2 / 0.28
    logp = logp_old + torch.log(0.5 + 1.1 * torch.rand(B * G, L, T, generator=g))
    mask = torch.ones(B * G, T, dtype=torch.bool)
    mask[1, 3:] = False  # padded frames must not count
    mask[9, 1:] = False
    return rewards, logp, logp_old, mask


def test_grpo_loss_matches_eq10_by_hand(fixed_batch):
    rewards, logp, logp_old, mask = fixed_batch
    gamma, eps_d, eps_u = 0.3, 0.2, 0.28
    want, A_hand, kept_hand = eq10_by_hand(logp.tolist(), logp_old.tolist(), rewards.tolist(), mask.tolist(),
                                           gamma, eps_d, eps_u)
    adv, degenerate = obj.group_advantages(rewards)
    assert degenerate.tolist() == [False, True, False]
    assert adv.flatten().tolist() == pytest.approx(A_hand, abs=1e-6)
    keep = obj.keep_mask(adv.flatten(), gamma)
    assert keep.nonzero().flatten().tolist() == kept_hand
    assert 0 < len(kept_hand) < 8  # the filter dropped something besides the degenerate group
    loss, stats = obj.grpo_loss(logp, logp_old, adv.flatten(), mask, keep, eps_d, eps_u)
    assert loss.item() == pytest.approx(-want, rel=1e-5)
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0


def test_grpo_micro_batches_add_up_to_full_batch(fixed_batch):
    rewards, logp, logp_old, mask = fixed_batch
    adv = obj.group_advantages(rewards)[0].flatten()
    keep = obj.keep_mask(adv, 0.3)
    full, _ = obj.grpo_loss(logp, logp_old, adv, mask, keep, 0.2, 0.28)
    n = int(keep.sum())
    parts = sum(obj.grpo_loss(logp[s], logp_old[s], adv[s], mask[s], keep[s], 0.2, 0.28, n_kept=n)[0]
                for s in (slice(0, 5), slice(5, 12)))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_clip_zeroes_gradient_exactly_where_it_binds(fixed_batch):
    rewards, logp, logp_old, mask = fixed_batch
    eps_d, eps_u = 0.2, 0.28
    adv = obj.group_advantages(rewards)[0].flatten()
    keep = obj.keep_mask(adv, 0.3)
    logp = logp.clone().requires_grad_(True)
    loss, _ = obj.grpo_loss(logp, logp_old, adv, mask, keep, eps_d, eps_u)
    loss.backward()
    ratio = torch.exp(logp.detach() - logp_old)
    a = adv[:, None, None].expand_as(ratio)
    binds = ((a > 0) & (ratio > 1 + eps_u)) | ((a < 0) & (ratio < 1 - eps_d))
    live = keep[:, None, None] & mask[:, None, :] & ~binds
    assert (logp.grad[~live] == 0).all()
    # d(-J)/d logp = -r A / (n_kept l_i L) on live tokens
    frames = mask.sum(1).float()[:, None, None].expand_as(ratio)
    want = -ratio * a / (keep.sum() * frames * ratio.shape[1])
    torch.testing.assert_close(logp.grad[live], want[live].float())


def test_every_rollout_filtered_raises_for_the_caller_to_skip():
    rewards = torch.full((2, 4), 0.5)
    adv, degenerate = obj.group_advantages(rewards)
    assert degenerate.all() and (adv == 0).all() and not torch.isnan(adv).any()
    keep = obj.keep_mask(adv.flatten(), 0.0)
    assert not keep.any()
    z = torch.zeros(8, 2, 3)
    with pytest.raises(ValueError, match="filtered"):
        obj.grpo_loss(z, z, adv.flatten(), torch.ones(8, 3, dtype=torch.bool), keep, 0.2, 0.2)


def test_kl_estimator_is_zero_at_reference_and_positive_elsewhere():
    lp = -torch.rand(3, 2, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert obj.kl_to_reference(lp, lp, mask).abs().max() < 1e-7
    assert (obj.kl_to_reference(lp, lp - 0.3, mask) > 0).all()


def test_dpo_loss_matches_closed_form():
    rewards = torch.tensor([[0.1, 0.8, -0.3], [0.2, 0.2, 0.2], [0.5, 0.4, 0.6]])
    chosen, rejected, valid = obj.dpo_pairs(rewards)
    assert chosen[[0, 2]].tolist() == [1, 8]
    assert rejected[[0, 2]].tolist() == [2, 7] and valid.tolist() == [True, False, True]
    beta = 0.1
    pc, pr = torch.tensor([-10.0, -12.0], requires_grad=True), torch.tensor([-11.0, -9.5], requires_grad=True)
    rc, rr = torch.tensor([-10.5, -11.0]), torch.tensor([-10.0, -10.0])
    loss, stats = obj.dpo_loss(pc, pr, rc, rr, beta)
    margins = [beta * ((-10.0 + 10.5) - (-11.0 + 10.0)), beta * ((-12.0 + 11.0) - (-9.5 + 10.0))]
    want = sum(math.log(1 + math.exp(-m)) for m in margins) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    sig = [1 / (1 + math.exp(m)) for m in margins]  # d/dm of -log sigmoid(m) = -sigmoid(-m)
    assert pc.grad.tolist() == pytest.approx([-beta * s / 2 for s in sig], rel=1e-5)
    assert pr.grad.tolist() == pytest.approx([beta * s / 2 for s in sig], rel=1e-5)
    assert stats["dpo_accuracy"].item() == 0.5
