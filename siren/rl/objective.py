"""Stage-2 objectives on fixed tensors: group advantages (Eq. 9), the gamma filter and the
asymmetric clipped surrogate (Eq. 10-11), the KL to the stage-1 policy, and the DPO loss
of Figure 5. No model here: everything takes per-token log-probabilities of the actions.

Shapes: N rollouts (B prompts x G generations, prompt-major), L owned layers of the
trainable expert(s), T frames. ``mask`` [N, T] is True on valid frames.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Rewards of one group closer than this (relative to their scale) count as equal: the
# advantages of that group are 0 and every rollout in it is filtered (no 0/0 noise).
STD_TOL = 1e-6


def token_logprobs(logits: Tensor, actions: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(a | context) per token; logits [..., V], actions [...] -> [...] (float32).

    The policy of Eq. 7 as sampled: softmax(logits / temperature), the full softmax (stage 2 refuses
    sample.top_k / top_p, which would draw from a truncated policy).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def group_advantages(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 9: A_i = (R_i - mean_G R) / std_G R within each prompt's group.

    rewards [B, G] -> (advantages [B, G], degenerate [B]). std is the population std of the
    group (the std of the set {R_i}). A group whose rewards are all equal (std 0) is
    ``degenerate``: its advantages are 0, so the gamma filter drops all of it.
    """
    r = rewards.double()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, correction=0, keepdim=True)
    degenerate = (std <= STD_TOL * (1.0 + mean.abs())).squeeze(1)
    adv = torch.where(degenerate[:, None], torch.zeros_like(r), (r - mean) / std.clamp_min(1e-30))
    return adv.to(rewards.dtype), degenerate


def keep_mask(advantages: Tensor, gamma: float) -> Tensor:
    """Eq. 10 "s.t. |A_i| >= gamma": the rollouts that enter the objective.

    A rollout with advantage exactly 0 (a degenerate group, or the median of an odd group)
    carries no signal and is always dropped, also at gamma = 0.
    """
    a = advantages.abs()
    return (a >= gamma) & (a > 0)


def clipped_surrogate(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, keep: Tensor,
                      eps_d: float, eps_u: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-rollout value of Eq. 10's summand, 0 for dropped rollouts.

    logp, logp_old [N, L, T]; advantages, keep [N]; mask [N, T]. Returns J_i [N] with
        J_i = 1/l_i sum_{t valid} 1/L sum_j min(r_ij A_i, clip(r_ij, 1-eps_d, 1+eps_u) A_i)
    where r_ij = pi_theta / pi_old of the same token given the same context (Eq. 11) and l_i
    is the number of valid frames of rollout i; plus token statistics over kept tokens.
    The caller averages J_i over the kept rollouts (see ``grpo_loss``).
    """
    ratio = torch.exp(logp - logp_old.detach())  # Eq. 11
    a = advantages.detach().to(ratio.dtype)[:, None, None]
    clipped = ratio.clamp(1.0 - eps_d, 1.0 + eps_u)  # v_ij, Eq. 10
    per_token = torch.minimum(ratio * a, clipped * a)
    m = mask.to(ratio.dtype)[:, None, :]  # [N, 1, T]
    n_layers = logp.shape[1]
    frames = mask.sum(dim=1).clamp_min(1).to(ratio.dtype)  # l_i
    j = (per_token * m).sum(dim=(1, 2)) / (n_layers * frames)  # 1/l sum_t 1/L sum_j
    j = torch.where(keep, j, torch.zeros_like(j))
    with torch.no_grad():
        tok = (mask & keep[:, None])[:, None, :].expand_as(ratio)
        r = ratio[tok]
        aa = a.expand_as(ratio)[tok]
        low = (aa < 0) & (r < 1.0 - eps_d)  # the clip binds on the lower side
        high = (aa > 0) & (r > 1.0 + eps_u)  # ... on the upper side
        n = max(r.numel(), 1)
        # logged as the mean over a step's mu passes, the first included, where every ratio is 1 and nothing is
        # clipped: with mu=2 the share among the updates that can clip is twice the logged one
        stats = {"clip_frac_low": low.sum() / n, "clip_frac_high": high.sum() / n,
                 "clip_frac": (low | high).sum() / n,
                 "ratio_mean": r.mean() if r.numel() else ratio.new_tensor(1.0),
                 "ratio_min": r.min() if r.numel() else ratio.new_tensor(1.0),
                 "ratio_max": r.max() if r.numel() else ratio.new_tensor(1.0),
                 "tokens": ratio.new_tensor(float(r.numel()))}
    return j, stats


def kl_to_reference(logp: Tensor, logp_ref: Tensor, mask: Tensor) -> Tensor:
    """Per-rollout KL(pi_theta || pi_ref) estimate on the sampled tokens: the unbiased,
    non-negative k3 estimator exp(ref - logp) - (ref - logp) - 1 (as in GRPO), averaged over
    valid frames and owned layers like Eq. 10. [N, L, T] x2, [N, T] -> [N]."""
    d = logp_ref.detach() - logp
    k3 = torch.exp(d) - d - 1.0
    m = mask.to(k3.dtype)[:, None, :]
    return (k3 * m).sum(dim=(1, 2)) / (logp.shape[1] * mask.sum(dim=1).clamp_min(1).to(k3.dtype))


NORMALIZE = ("kept", "group")


def grpo_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, keep: Tensor,
              eps_d: float, eps_u: float, n_kept: int | None = None, logp_ref: Tensor | None = None,
              kl_coef: float = 0.0, normalize: str = "kept", n_total: int | None = None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss = -(J(theta) (Eq. 10) - kl_coef * KL), each a sum over the kept rollouts divided by
    ``normalize``: "kept", the number of kept rollouts (a step's size does not shrink as the gamma
    filter drops more), or "group", all B*G rollouts: Eq. 10's 1/G per group, averaged over the B prompts.

    ``n_kept`` / ``n_total`` are the kept / all rollouts of the whole rollout batch when this call
    sees only a micro-batch of it (so micro-batch losses add up to the full-batch loss); default:
    this call's. Raises if nothing is kept: the caller skips the update (and logs it) instead.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    n_kept = int(keep.sum()) if n_kept is None else n_kept
    if n_kept <= 0:
        raise ValueError("every rollout was filtered (|A| < gamma): skip this update")
    denom = n_kept if normalize == "kept" else (len(keep) if n_total is None else n_total)
    j, stats = clipped_surrogate(logp, logp_old, advantages, mask, keep, eps_d, eps_u)
    objective = j.sum() / denom
    if logp_ref is not None and kl_coef:
        kl = kl_to_reference(logp, logp_ref, mask)
        objective = objective - kl_coef * torch.where(keep, kl, torch.zeros_like(kl)).sum() / denom
    return -objective, stats


def sequence_logp(logp: Tensor, mask: Tensor) -> Tensor:
    """Sum of the action log-probs of each rollout over valid frames and owned layers: [N]."""
    return (logp * mask.to(logp.dtype)[:, None, :]).sum(dim=(1, 2))


def dpo_pairs(rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chosen = best, rejected = worst rollout of each group by reward (Figure 5's DPO).

    rewards [B, G] -> (chosen index [B], rejected index [B], valid [B]) as flat rollout
    indices b*G + g; a group whose rewards are all equal has no preference (valid False).
    """
    b, g = rewards.shape
    best, worst = rewards.argmax(dim=1), rewards.argmin(dim=1)
    _, degenerate = group_advantages(rewards)
    base = torch.arange(b, device=rewards.device) * g
    return base + best, base + worst, ~degenerate


def dpo_loss(logp_c: Tensor, logp_r: Tensor, ref_c: Tensor, ref_r: Tensor, beta: float
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO (Rafailov et al., 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))),
    sequence log-probs summed over the trainable expert's action tokens; mean over pairs."""
    margin = beta * ((logp_c - ref_c.detach()) - (logp_r - ref_r.detach()))
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"dpo_margin": margin.mean(), "dpo_accuracy": (margin > 0).float().mean()}
    return loss, stats
