"""Rollouts of stage 2 (Algorithm 3, lines 4-5) and the action log-probabilities (Eq. 7, 11).

All K experts sample together (Algorithm 2); the codes of the trainable expert(s)' layers
are the actions, every other expert's codes are proxy tokens (Eq. 8's q_prox): sampled,
never trained. The rollouts are decoded with the codec and scored by the reward (Eq. 8).

Log-probabilities of the actions come from a teacher-forced forward of the trainable
expert on the rollout's codes: expert k's logits for layer j at step t read exactly
q_{<t} (all layers), the text, and q_t^{<j} (Eq. 11's "same context"), which is the
context the sampler used. The policy is softmax(logits / temperature), as sampled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from siren.errors import ConfigError, NonFiniteError
from siren.model import CollaborativeModel, Expert
from siren.rl.objective import token_logprobs
from siren.runtime import derive_seed
from siren.sample import SampleConfig, generate

ALIGN_DIRECTIONS = ("anti_causal", "causal")


def trainable_experts(n_experts: int, align: str, n: int) -> list[int]:
    """Table 7: anti_causal trains the first n experts (n=1 is Siren), causal the last n."""
    if align not in ALIGN_DIRECTIONS:
        raise ValueError(f"align must be one of {', '.join(ALIGN_DIRECTIONS)}, got '{align}'")
    if not 1 <= n <= n_experts:  # a user's n= (or a grid's rl.n): one error line, not a traceback
        raise ConfigError(f"n={n} experts to align, but the model has {n_experts} (1 <= n <= {n_experts})")
    return list(range(n)) if align == "anti_causal" else list(range(n_experts - n, n_experts))


def action_logprobs(experts: Sequence[Expert], codes: Tensor, text: Tensor, text_mask: Tensor,
                    temperature: float) -> Tensor:
    """log pi(q_t^j | q_<t, c, q_t^<j) of the codes in ``codes`` for every layer owned by
    ``experts``: codes [N, 12, T] -> [N, sum of m, T] (float32), experts in the given order."""
    out = []
    for e in experts:
        logits = e(codes, text, text_mask)  # [N, m, T, V], teacher-forced on the rollout
        out.append(token_logprobs(logits, codes[:, e.layers.start: e.layers.stop], temperature))
    return torch.cat(out, 1)


@dataclass
class Rollouts:
    """B prompts x G generations, prompt-major (rollout i = b * G + g)."""
    codes: Tensor  # [N, 12, T] all layers: actions and proxy tokens
    text: Tensor  # [N, L, 768] text states of each rollout's prompt
    text_mask: Tensor  # [N, L]
    captions: list[str]  # [N]
    rewards: Tensor  # [B, G] (float32, on the CPU)
    mask: Tensor  # [N, T] valid frames (all True: every rollout has n_frames frames)

    @property
    def group(self) -> int:
        return self.rewards.shape[1]


@torch.no_grad()
def collect(model: CollaborativeModel, captions: Sequence[str], encode_text: Callable, group: int, n_frames: int,
            sample: SampleConfig, seed: int, reward, codec=None, rollout_batch: int = 0,
            decode_batch: int = 8) -> Rollouts:
    """Sample ``group`` full generations per caption with all experts, decode, score (the text encoder, decode and
    reward in fp32, outside any autocast of the caller)."""
    if sample.temperature <= 0:
        raise ValueError("stage 2 samples from the policy: sample.temperature must be > 0 (0 is greedy)")
    if reward.needs_audio and codec is None:
        raise ValueError(f"reward {reward.id} scores audio: a codec is needed to decode the rollouts")
    device = next(model.parameters()).device
    with torch.autocast(device.type, enabled=False):  # the states stage 1 trained on and eval conditions with
        ts = encode_text(list(captions))
    text = ts.states.to(device).repeat_interleave(group, 0)
    text_mask = ts.mask.to(device).repeat_interleave(group, 0)
    caps = [c for c in captions for _ in range(group)]
    n = len(caps)
    chunk = rollout_batch or n
    codes = torch.cat([generate(model, (text[i:i + chunk], text_mask[i:i + chunk]), n_frames, sample,
                                seed=derive_seed(seed, 0, i // chunk), progress=False)
                       for i in range(0, n, chunk)])
    # Rewards in fp32: sampling may run under the caller's bf16 autocast, the decode and the reward model do not.
    with torch.autocast(device.type, enabled=False):
        if reward.needs_audio:
            scores = []
            for i in range(0, n, decode_batch):
                wav = codec.decode(codes[i:i + decode_batch].to(codec.device)).float()
                scores.append(reward(wav, caps[i:i + decode_batch]).float().cpu())
            r = torch.cat(scores)
        else:
            r = reward(codes, caps).float().cpu()
    if not torch.isfinite(r).all():
        raise NonFiniteError(f"reward {reward.id} returned non-finite values for rollouts "
                                 f"{(~torch.isfinite(r)).nonzero().flatten().tolist()}")
    return Rollouts(codes, text, text_mask, caps, r.view(len(captions), group),
                    torch.ones(n, n_frames, dtype=torch.bool, device=device))
