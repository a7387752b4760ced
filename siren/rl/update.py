"""Stage 2's policy update (Algorithm 3 lines 6-9) over micro-batches: GRPO's group advantages, gamma filter and
mu steps on the clipped surrogate (Eq. 9-11), or DPO on each group's best and worst rollout (Figure 5); and the old
policy's log-probs, computed in the micro-batches of the update's first pass. The loop around it: alignment.py."""
from __future__ import annotations

import math

import torch

from siren.errors import NonFiniteError
from siren.model import Expert
from siren.rl import objective as obj
from siren.rl.config import AlignConfig
from siren.rl.rollout import Rollouts, action_logprobs
from siren.runtime import autocast


def _chunks(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(idx.split(size or max(1, len(idx)))) if len(idx) else []


def _grpo_kept(cfg: AlignConfig, rewards: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 9 advantages [B*G], the gamma filter's mask [B*G] and the degenerate groups [B]."""
    adv, degenerate = obj.group_advantages(rewards)
    adv = adv.flatten().to(device)
    return adv, obj.keep_mask(adv, cfg.gamma), degenerate


def _dpo_chunks(cfg: AlignConfig, pairs: int, device) -> list[torch.Tensor]:
    """Positions into the kept pairs, half a micro-batch of pairs at a time (each pair is two rollouts)."""
    return _chunks(torch.arange(pairs, device=device), max(1, cfg.micro_batch // 2) if cfg.micro_batch else 0)


def first_pass_chunks(cfg: AlignConfig, rewards: torch.Tensor, device) -> list[torch.Tensor]:
    """The rollout indices of each micro-batch of the update's first pass, then the rest's (for the KL log)."""
    if cfg.method == "grpo":
        _, keep, _ = _grpo_kept(cfg, rewards, device)
        chunks = _chunks(keep.nonzero().flatten(), cfg.micro_batch)
    else:
        chosen, rejected, valid = (t.to(device) for t in obj.dpo_pairs(rewards))
        chosen, rejected = chosen[valid], rejected[valid]
        chunks = [torch.cat([chosen[sel], rejected[sel]]) for sel in _dpo_chunks(cfg, len(chosen), device)]
    rest = torch.ones(rewards.numel(), dtype=torch.bool, device=device)
    for idx in chunks:
        rest[idx] = False
    return chunks + _chunks(rest.nonzero().flatten(), cfg.micro_batch)


def logprobs_in(experts: list[Expert], ro: Rollouts, chunks: list[torch.Tensor], cfg: AlignConfig,
                 device) -> torch.Tensor:
    """Every rollout's log-probs [N, L, T], computed chunk by chunk in the order given."""
    parts = [logprobs(experts, ro, idx, cfg, device) for idx in chunks]
    out = parts[0].new_empty((len(ro.captions), *parts[0].shape[1:]))
    for idx, part in zip(chunks, parts):
        out[idx] = part
    return out


class _Means:
    """Token-weighted means of per-micro-batch statistics (min/max kept as such)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.w = 0.0
        self.lo, self.hi = float("inf"), float("-inf")

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        n = float(stats.get("tokens", torch.tensor(1.0)))
        for k, v in stats.items():
            if k in ("ratio_min", "ratio_max", "tokens"):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
        self.w += n
        if "ratio_min" in stats:
            self.lo, self.hi = min(self.lo, float(stats["ratio_min"])), max(self.hi, float(stats["ratio_max"]))

    def result(self) -> dict[str, float]:
        out = {k: v / max(self.w, 1e-12) for k, v in self.sums.items()}
        if self.lo <= self.hi:
            out.update(ratio_min=self.lo, ratio_max=self.hi)
        return out


def logprobs(experts: list[Expert], ro: Rollouts, idx: torch.Tensor, cfg: AlignConfig,
              device: torch.device) -> torch.Tensor:
    with autocast(cfg.precision, device):
        return action_logprobs(experts, ro.codes[idx], ro.text[idx], ro.text_mask[idx], cfg.sample.temperature)


def _step(params: list[torch.Tensor], opts: list[torch.optim.Optimizer], grad_clip: float, loss: float,
          where: str) -> float:
    """Clip the global grad norm and step; a NaN/inf loss or gradient raises before any weight changes
    (the last checkpoint stays the newest good state)."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if not (math.isfinite(loss) and torch.isfinite(norm)):
        raise NonFiniteError(f"stage 2, {where}: non-finite loss ({loss:.4g}) or gradient norm ({float(norm):.4g}); "
                             f"stopped before the update, nothing saved. Lower lr or resume from the last checkpoint")
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(norm)


def grpo_update(cfg: AlignConfig, policy, opts, params, ro: Rollouts, logp_old, logp_ref, device,
                 where: str) -> dict:
    """Algorithm 3 lines 6-9: Eq. 9 advantages, the gamma filter, mu steps on -J (Eq. 10)."""
    adv, keep, degenerate = _grpo_kept(cfg, ro.rewards, device)  # Eq. 9 and the gamma filter
    kept = keep.nonzero().flatten()
    n = len(ro.captions)
    entry = {"kept": len(kept), "filtered_frac": 1.0 - len(kept) / n, "degenerate_groups": int(degenerate.sum()),
             "skipped": int(len(kept) == 0)}
    if not len(kept):  # every rollout filtered: no update this step (logged)
        return entry
    means, losses, norms = _Means(), [], []
    for _ in range(cfg.mu):  # lines 7-9
        total = 0.0
        for idx in _chunks(kept, cfg.micro_batch):
            logp = logprobs(policy, ro, idx, cfg, device)
            loss, stats = obj.grpo_loss(logp, logp_old[idx], adv[idx], ro.mask[idx], keep[idx], cfg.eps_d,
                                        cfg.eps_u, n_kept=len(kept),
                                        logp_ref=logp_ref[idx] if logp_ref is not None else None,
                                        kl_coef=cfg.kl_coef, normalize=cfg.normalize, n_total=n)
            loss.backward()
            total += float(loss.detach())
            means.add(stats)
        norms.append(_step(params, opts, cfg.grad_clip, total, where))
        losses.append(total)
    return {**entry, "loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms), **means.result()}


def dpo_update(cfg: AlignConfig, policy, opts, params, ro: Rollouts, logp_old, logp_ref, device,
                where: str) -> dict:
    """Figure 5's DPO: best vs worst rollout of each group, frozen stage-1 reference, mu steps."""
    chosen, rejected, valid = obj.dpo_pairs(ro.rewards)
    chosen, rejected = chosen[valid].to(device), rejected[valid].to(device)
    pairs = len(chosen)
    entry = {"pairs": pairs, "filtered_frac": 1.0 - pairs / ro.rewards.shape[0],
             "degenerate_groups": int((~valid).sum()), "skipped": int(pairs == 0)}
    if not pairs:
        return entry
    ref_seq = obj.sequence_logp(logp_ref, ro.mask)
    means, losses, norms = _Means(), [], []
    for _ in range(cfg.mu):
        total = 0.0
        for sel in _dpo_chunks(cfg, pairs, device):
            idx = torch.cat([chosen[sel], rejected[sel]])
            seq = obj.sequence_logp(logprobs(policy, ro, idx, cfg, device), ro.mask[idx])
            loss, stats = obj.dpo_loss(seq[:len(sel)], seq[len(sel):], ref_seq[chosen[sel]], ref_seq[rejected[sel]],
                                       cfg.beta)
            loss = loss * len(sel) / pairs  # mean over all pairs across micro-batches
            loss.backward()
            total += float(loss.detach())
            means.add({**stats, "tokens": torch.tensor(float(len(sel)))})
        norms.append(_step(params, opts, cfg.grad_clip, total, where))
        losses.append(total)
    return {**entry, "loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms), **means.result()}


# ---------------------------------------------------------------------------- CLI
