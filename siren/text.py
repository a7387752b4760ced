"""The frozen text encoder that conditions every model: LAION-CLAP's RoBERTa text branch.

Every backbone block cross-attends to ``TextStates.states`` (RoBERTa's last hidden states, 768-d,
``mask`` True at real tokens), of up to 128 tokens as in the authors' code; ``pooled`` is the CLAP
text embedding (512-d, L2-normalised) of those tokens. The CLAP score and the stage-2 reward embed
captions at laion-clap's own 77 tokens (``Clap.embed_text``): the same vector for every caption of
at most 77 tokens. One CLAP model serves both: pass an existing ``siren.clap.Clap`` to share its weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from siren.clap import POSITION_ROWS, TEXT_DIM, Clap, ClapConfig

PROMPT_TOKENS = 128  # the authors' max_prompt_len (their config.py); laion-clap's own 77 stays for score and reward
ROBERTA_POSITIONS = POSITION_ROWS - 2  # tokens a caption can have: the rows less RoBERTa's padding offset


@dataclass
class TextConfig:
    # "pretrained", "demo" (trained on the embedded set), "random" (explicit smoke-test mode) or a laion-clap .pt path
    weights: str = "pretrained"
    seed: int = 0  # random-init seed for weights=random
    max_length: int = PROMPT_TOKENS  # tokens per caption, specials included


@dataclass
class TextStates:
    states: torch.Tensor  # [B, L, 768] float32, zero at padding
    mask: torch.Tensor  # [B, L] bool, True = real token
    pooled: torch.Tensor  # [B, 512] float32, L2-normalised CLAP text embedding

    def to(self, device: torch.device | str) -> "TextStates":
        return TextStates(self.states.to(device), self.mask.to(device), self.pooled.to(device))

    def __len__(self) -> int:
        return self.states.shape[0]


def can_share(clap: Clap, cfg: TextConfig) -> bool:
    """Whether an already built Clap is the one ``cfg`` would build (same weights and seed)."""
    return (clap.cfg.weights, clap.cfg.seed) == (cfg.weights, cfg.seed)


class TextEncoder(torch.nn.Module):
    dim = TEXT_DIM

    def __init__(self, cfg: TextConfig = TextConfig(), clap: Clap | None = None):
        super().__init__()
        if not 2 < cfg.max_length <= ROBERTA_POSITIONS:
            raise ValueError(f"text.max_length={cfg.max_length}: must be in 3..{ROBERTA_POSITIONS} "
                             f"(RoBERTa's positions; the authors' is {PROMPT_TOKENS})")
        if clap is not None and not can_share(clap, cfg):
            raise ValueError(f"TextConfig(weights={cfg.weights!r}, seed={cfg.seed}) does not match the shared "
                             f"Clap(weights={clap.cfg.weights!r}, seed={clap.cfg.seed})")
        self.cfg = cfg
        self.clap = clap if clap is not None else Clap(ClapConfig(weights=cfg.weights, seed=cfg.seed))

    @property
    def id(self) -> str:
        """Identity for cache keys: changes with the CLAP weights, the tokenizer and max_length."""
        return f"{self.clap.id}-L{self.cfg.max_length}"

    @property
    def weights_label(self) -> str:
        return self.clap.weights_label

    def too_long(self, captions: Sequence[str]) -> list[str]:
        """The captions of more than ``max_length`` tokens: ``encode`` keeps their first ``max_length`` - 1 and the
        end-of-text token, as the authors' tokenizer (truncation=True)."""
        return [c for c in captions if len(self.clap.tokenizer.encode(c)) > self.cfg.max_length]

    @torch.no_grad()
    def encode(self, captions: Sequence[str], batch_size: int = 64) -> TextStates:
        """captions -> TextStates, L = the longest caption's token count (<= max_length)."""
        if isinstance(captions, str) or len(captions) == 0:
            raise TypeError(f"captions must be a non-empty list of str, got {captions!r:.60}")
        parts = [self.clap.text_forward(captions[i:i + batch_size], self.cfg.max_length)
                 for i in range(0, len(captions), batch_size)]
        n = max(s.shape[1] for s, _, _ in parts)
        return TextStates(states=torch.cat([_pad_tokens(s, n) for s, _, _ in parts]),
                          mask=torch.cat([_pad_tokens(m, n) for _, m, _ in parts]),
                          pooled=torch.cat([p for _, _, p in parts]))


def _pad_tokens(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B, L, ...] -> [B, n, ...] with zeros (False) after position L."""
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, n - t.shape[1]))
