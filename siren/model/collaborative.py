"""The K experts assembled: Siren for distribution 6-2, a single transformer for 1-12.

Experts share nothing; the collaboration happens only at sampling time (Algorithm 2,
``siren.sample``), where expert k's residual decoder is conditioned on the codes the earlier
experts just sampled. Training calls each expert's own ``loss`` (separate jobs).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from siren.codec import CodeTables
from siren.model.config import ModelConfig
from siren.model.expert import Expert, ExpertLoss


class CollaborativeModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tables: CodeTables | None = None):
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleList(Expert(cfg, k, tables) for k in range(cfg.n_experts))

    @classmethod
    def from_codec(cls, cfg: ModelConfig, codec) -> "CollaborativeModel":
        return cls(dataclasses.replace(cfg, codec=codec.id), codec.code_tables())

    def forward(self, codes: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of all 12 layers [B, 12, T, 1024] (each expert its own layers)."""
        return torch.cat([e(codes, text, text_mask) for e in self.experts], 1)

    def loss(self, batch: dict, reduction: str = "mean") -> list[ExpertLoss]:
        return [e.loss(batch, reduction) for e in self.experts]
