"""One expert H_k = C x R_k x F_k (section 4.1, Algorithm 1): backbone, residual decoder, heads.

Expert k owns RVQ layers [s, s+m), s = k*m, and shares nothing with the other experts (own
code embeddings, backbone, residual decoder, heads), so each can train in its own process.

- Backbone F_k: causal transformer over time; input at step t is ``sos`` for t = 0, else
  sum_j e_j(q_{t-1}^j) over all 12 layers, plus sinusoidal positions; text enters by
  cross-attention in every block. Output h_{k,t} (Eq. 2-3).
- Residual decoder R_k (Eq. 4-5): a short causal transformer over
  [h_t, cond_s, ..., cond_{s+m-1}], run per time step; the output at position i+1 (which
  reads cond_{s+i}) predicts layer s+i. cond_j = sos + sum_{i<j} e_i(q_t^i) ("accumulated",
  Eq. 5 with its off-by-one fixed: never layer j itself), sos + e_{j-1}(q_t^{j-1})
  ("residual"); "none" has no decoder and the heads read h_t (AudioGen parallel heads).
- Heads C_j: Linear(d, 1024) per owned layer; loss Eq. 6.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from siren.codec import CODEBOOK_SIZE, N_LAYERS, CodeTables
from siren.model.blocks import Block, KVCache, TextKV, sinusoidal_positions
from siren.model.config import ModelConfig
from siren.model.embedding import CodeEmbedding


class Backbone(nn.Module):
    """F_k: causal transformer over time with cross-attention to the text in every block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.sos = nn.Parameter(torch.zeros(cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.attn_heads, cfg.mlp_ratio, cfg.text_dim)
                                    for _ in range(cfg.main_layers))
        self.norm = nn.RMSNorm(cfg.dim)

    def text_kv(self, text: torch.Tensor, text_mask: torch.Tensor) -> list[TextKV]:
        return [b.cross_attn.text_kv(text, text_mask) for b in self.blocks]

    def forward(self, x: torch.Tensor, text: list[TextKV], caches: list[KVCache] | None = None,
                start: int = 0) -> torch.Tensor:
        """x [B, T, d] inputs of time steps [start, start+T) -> h [B, T, d]."""
        x = x + sinusoidal_positions(start, x.shape[1], x.shape[2], x.device).to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None, text[i])
        return self.norm(x)


class ResidualDecoder(nn.Module):
    """R_k: causal transformer over the m+1 positions [h_t, cond_s, ..., cond_{s+m-1}] of one step."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.layers_per_expert
        self.sos = nn.Parameter(torch.zeros(cfg.dim))  # the learnable ``sos`` of Eq. 5
        self.pos = nn.Parameter(torch.zeros(m + 1, cfg.dim))  # learned positions over the m+1 slots
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.attn_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_layers))
        self.norm = nn.RMSNorm(cfg.dim)

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0) -> torch.Tensor:
        """x [N, P, d] for decoder positions [start, start+P) -> [N, P, d]."""
        x = x + self.pos[start: start + x.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None)
        return self.norm(x)


@dataclass
class ExpertLoss:
    loss: torch.Tensor  # Eq. 6: sum over owned layers of the CE averaged over valid frames
    ce: torch.Tensor  # [m] per-layer CE (detached)
    acc: torch.Tensor  # [m] per-layer top-1 accuracy
    layers: tuple[int, ...]  # the RVQ layers ce/acc refer to
    frames: int  # valid frames averaged over


@dataclass
class ExpertState:
    """Per-generation state for incremental sampling (Algorithm 2)."""
    text: list[TextKV]  # cross-attention keys/values per backbone block
    embed: tuple[torch.Tensor, torch.Tensor]  # fused code-embedding maps (CodeEmbedding.fused)
    backbone: list[KVCache] | None  # None: recompute the whole prefix every step
    decoder: list[KVCache] | None
    t: int = 0  # next time step the backbone expects


class Expert(nn.Module):
    def __init__(self, cfg: ModelConfig, k: int, tables: CodeTables | None = None):
        """``tables``: the codec's frozen code tables (``Codec.code_tables()``); None leaves zeros
        for ``load_state_dict`` to fill (checkpoints hold them) or for meta-device counting."""
        super().__init__()
        self.cfg, self.k = cfg, k
        self.layers = cfg.expert_layers(k)  # owned RVQ layers [s, s+m)
        self.embedding = CodeEmbedding(cfg.dim, tables)
        self.backbone = Backbone(cfg)
        self.decoder = ResidualDecoder(cfg) if cfg.conditioning != "none" else None
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, CODEBOOK_SIZE) for _ in self.layers)  # C_j
        self._init_weights()

    @classmethod
    def from_codec(cls, cfg: ModelConfig, k: int, codec) -> "Expert":
        return cls(dataclasses.replace(cfg, codec=codec.id), k, codec.code_tables())

    def _init_weights(self):
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # GPT-2: residual projections scaled by 1/sqrt(2 * depth)
        for stack in (self.backbone.blocks, self.decoder.blocks if self.decoder is not None else ()):
            for block in stack:
                for out in (block.self_attn.out, block.mlp.down,
                            *((block.cross_attn.out,) if block.cross_attn is not None else ())):
                    nn.init.normal_(out.weight, 0.0, std / math.sqrt(2 * len(stack)))
        nn.init.normal_(self.embedding.weight, 0.0, std)
        nn.init.normal_(self.backbone.sos, 0.0, std)
        if self.decoder is not None:
            nn.init.normal_(self.decoder.sos, 0.0, std)
            nn.init.normal_(self.decoder.pos, 0.0, std)

    # ---- teacher-forced training (Algorithm 1) -------------------------------------------

    def forward(self, codes: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """codes [B, 12, T], text [B, L, 768], text_mask [B, L] -> logits [B, m, T, 1024] of the owned layers."""
        check_inputs(codes, text, text_mask, self.cfg.text_dim)
        B = codes.shape[0]
        fused = self.embedding.fused()
        prev = self.embedding(codes[:, :, :-1].transpose(1, 2), fused=fused, summed=True)  # sum_j e_j(q_{t-1}^j)
        x = torch.cat([self.backbone.sos.expand(B, 1, -1), prev], 1)
        h = self.backbone(x, self.backbone.text_kv(text, text_mask))  # h_{k,t} [B, T, d]
        if self.decoder is None:
            return self.logits(h, None)
        upto = range(self.layers.stop - 1)  # cond_j reads layers < j only
        return self.logits(h, self.embedding(codes[:, : upto.stop].transpose(1, 2), upto, fused))

    def conditions(self, emb: torch.Tensor) -> torch.Tensor:
        """Embeddings e_0..e_{s+m-2} of one step's codes [..., s+m-1, d] -> cond_s..cond_{s+m-1} [..., m, d] (Eq. 5)."""
        shifted = torch.cat([emb.new_zeros(*emb.shape[:-2], 1, emb.shape[-1]), emb], -2)  # [j] = e_{j-1}, [0] = 0
        if self.cfg.conditioning == "accumulated":
            shifted = shifted.cumsum(-2)  # [j] = sum_{i<j} e_i
        return self.decoder.sos + shifted[..., self.layers.start: self.layers.stop, :]

    def condition(self, codes_t: torch.Tensor, j: int, fused) -> torch.Tensor:
        """cond_j [B, d] of one step from codes_t [B, 12] (reads layers < j only); Eq. 5 for one layer."""
        if j == 0:
            return self.decoder.sos.expand(codes_t.shape[0], -1)
        if self.cfg.conditioning == "accumulated":
            return self.decoder.sos + self.embedding(codes_t[:, :j], range(j), fused, summed=True)
        return self.decoder.sos + self.embedding(codes_t[:, j - 1: j], range(j - 1, j), fused)[:, 0]

    def logits(self, h: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """h [B, T, d], emb [B, T, s+m-1, d] (this step's codes, layers < s+m-1) -> logits [B, m, T, V]."""
        B, T, d = h.shape
        m = len(self.layers)
        if self.decoder is None:  # parallel heads: every owned layer reads h_t
            out = h[:, :, None].expand(B, T, m, d)
        else:
            seq = torch.cat([h[:, :, None], self.conditions(emb)], 2)  # [B, T, m+1, d]
            out = self.decoder(seq.flatten(0, 1)).view(B, T, m + 1, d)[:, :, 1:]  # position i+1 -> layer s+i
        return torch.stack([head(out[:, :, i]) for i, head in enumerate(self.heads)], 1)

    def loss(self, batch: dict) -> ExpertLoss:
        """Eq. 6 on a batch (codes [B,12,T], frame_mask [B,T], text [B,L,768], text_mask [B,L])."""
        codes, frame_mask = batch["codes"], batch["frame_mask"].bool()
        n = int(frame_mask.sum())
        if n == 0:
            raise ValueError("batch has no valid frame (frame_mask is all False)")
        logits = self(codes, batch["text"], batch["text_mask"]).float()  # [B, m, T, V]
        target = codes[:, self.layers.start: self.layers.stop].long()  # [B, m, T]
        ce = F.cross_entropy(logits.permute(0, 3, 1, 2), target, reduction="none")  # [B, m, T]
        w = frame_mask[:, None].to(ce.dtype)
        ce_layer = (ce * w).sum((0, 2)) / n
        acc = ((logits.argmax(-1) == target).to(ce.dtype) * w).sum((0, 2)) / n
        return ExpertLoss(ce_layer.sum(), ce_layer.detach(), acc.detach(), tuple(self.layers), n)

    # ---- incremental sampling (Algorithm 2) ----------------------------------------------

    def start(self, text: torch.Tensor, text_mask: torch.Tensor, cached: bool = True) -> ExpertState:
        """State for a new generation; ``cached=False`` recomputes the whole prefix every step."""
        check_inputs(None, text, text_mask, self.cfg.text_dim)
        caches = lambda n: [KVCache() for _ in range(n)] if cached else None  # noqa: E731
        return ExpertState(self.backbone.text_kv(text, text_mask), self.embedding.fused(),
                           caches(len(self.backbone.blocks)),
                           caches(len(self.decoder.blocks)) if self.decoder is not None else None)

    def backbone_step(self, state: ExpertState, codes: torch.Tensor) -> torch.Tensor:
        """h_{k,t} [B, d] for t = state.t, from codes [B, 12, >= t] of the steps before t."""
        t, B = state.t, codes.shape[0]
        if state.backbone is not None:  # one new position, attending to the cached past
            x = (self.backbone.sos.expand(B, 1, -1) if t == 0 else
                 self.embedding(codes[:, None, :, t - 1], fused=state.embed, summed=True))
            h = self.backbone(x, state.text, state.backbone, start=t)[:, -1]
        else:  # the whole prefix again
            prev = self.embedding(codes[:, :, :t].transpose(1, 2), fused=state.embed, summed=True)
            x = torch.cat([self.backbone.sos.expand(B, 1, -1), prev], 1)
            h = self.backbone(x, state.text)[:, -1]
        state.t = t + 1
        return h

    def layer_logits(self, state: ExpertState, h: torch.Tensor, codes_t: torch.Tensor, i: int) -> torch.Tensor:
        """Logits [B, V] of owned layer s+i at this step, given h_{k,t} [B, d] and this step's codes
        codes_t [B, 12], of which only layers < s+i are read. Call with i = 0, 1, ..., m-1 in order."""
        if self.decoder is None:
            return self.heads[i](h)
        s = self.layers.start
        if state.decoder is not None:  # small per-step cache: [h_t, cond_s] first, then one cond per layer
            cond = self.condition(codes_t, s + i, state.embed)[:, None]
            if i == 0:
                for c in state.decoder:
                    c.reset()
                cond = torch.cat([h[:, None], cond], 1)
            out = self.decoder(cond, state.decoder, start=0 if i == 0 else i + 1)[:, -1]
        else:  # recompute [h_t, cond_s, ..., cond_{s+i}]
            conds = [self.condition(codes_t, s + ii, state.embed) for ii in range(i + 1)]
            out = self.decoder(torch.stack([h, *conds], 1))[:, -1]
        return self.heads[i](out)


def check_inputs(codes: torch.Tensor | None, text: torch.Tensor, text_mask: torch.Tensor, text_dim: int):
    """Shape/range checks with messages that say what is wrong (bad data must not become NaNs)."""
    if text.dim() != 3 or text_mask.shape != text.shape[:2] or text.shape[-1] != text_dim:
        raise ValueError(f"text must be [B, L, {text_dim}] with text_mask [B, L]; got {tuple(text.shape)} and "
                         f"{tuple(text_mask.shape)}")
    if not text_mask.bool().any(1).all():
        bad = (~text_mask.bool().any(1)).nonzero().flatten().tolist()
        raise ValueError(f"text_mask has no real token for batch rows {bad}: cross-attention would be NaN")
    if codes is None:
        return
    if codes.dim() != 3 or codes.shape[1] != N_LAYERS or codes.shape[0] != text.shape[0]:
        raise ValueError(f"codes must be [B, {N_LAYERS}, T] with B = {text.shape[0]}; got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= CODEBOOK_SIZE):
        raise ValueError(f"codes outside [0, {CODEBOOK_SIZE}): min {int(codes.min())}, max {int(codes.max())}")
