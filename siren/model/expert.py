"""One expert H_k = C x R_k x F_k (section 4.1, Algorithm 1): backbone, residual decoder, heads.

Expert k owns RVQ layers [s, s+m), s = k*m, and shares nothing with the other experts (own
code embeddings, backbone, residual decoder, heads), so each can train in its own process.

- Backbone F_k: causal transformer over time; input at step t is ``sos`` for t = 0, else
  sum_j e_j(q_{t-1}^j) over all 12 layers, plus sinusoidal positions (before every block, as
  the official code, or once: ``positions``); text enters by cross-attention in every block.
  Output h_{k,t} (Eq. 2-3).
- Residual decoder R_k (Eq. 4-5): a short causal transformer over
  [h_t, cond_s, ..., cond_{s+m-1}], run per time step; the output at position i+1 (which
  reads cond_{s+i}) predicts layer s+i. cond_j = P(c) + sum_{i<j} e_i(q_t^i) ("accumulated",
  Eq. 5's rule: never layer j itself; the paper numbers expert k's layers 2k, 2k+1, here 0-based
  k*m .. k*m+m-1), P(c) + e_{j-1}(q_t^{j-1})
  ("residual"); "none" has no decoder and the heads read h_t (AudioGen parallel heads).
  The start P(c) is, as in the official code, a Linear(768, d) of the masked mean of the text
  states (``decoder_start=text``), or Eq. 5's learnable ``sos`` (``decoder_start=learned``).
- Heads C_j: Linear(d, 1024) per owned layer; loss Eq. 6, averaged over the owned layers as the
  official code (``reduction="mean"``) or summed as Eq. 6 writes it (``"sum"``); ``n_layers`` keeps
  only the first n owned layers in it (an ablation of the paper's Influence 1, ``train.loss_layers``).
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


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, pos: torch.Tensor, every_block: bool,
               caches: list[KVCache] | None, text: list[TextKV] | None = None) -> torch.Tensor:
    """x + pos through the blocks; ``every_block`` re-adds pos before each block (official code)."""
    for i, block in enumerate(blocks):
        if every_block or i == 0:
            x = x + pos
        x = block(x, caches[i] if caches is not None else None, text[i] if text is not None else None)
    return x


class Backbone(nn.Module):
    """F_k: causal transformer over time with cross-attention to the text in every block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.every_block = cfg.positions == "every_block"
        self.sos = nn.Parameter(torch.zeros(cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg, cfg.text_dim) for _ in range(cfg.main_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps or None)

    def text_kv(self, text: torch.Tensor, text_mask: torch.Tensor) -> list[TextKV]:
        return [b.cross_attn.text_kv(text, text_mask) for b in self.blocks]

    def forward(self, x: torch.Tensor, text: list[TextKV], caches: list[KVCache] | None = None,
                start: int = 0) -> torch.Tensor:
        """x [B, T, d] inputs of time steps [start, start+T) -> h [B, T, d]."""
        pos = sinusoidal_positions(start, x.shape[1], x.shape[2], x.device).to(x.dtype)
        return self.norm(run_blocks(self.blocks, x, pos, self.every_block, caches, text))


class ResidualDecoder(nn.Module):
    """R_k: causal transformer over the m+1 positions [h_t, cond_s, ..., cond_{s+m-1}] of one step."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.layers_per_expert
        self.every_block = cfg.positions == "every_block"
        if cfg.decoder_start == "text":  # P(c): official code's start, from the text
            self.text_start = nn.Linear(cfg.text_dim, cfg.dim)
        else:
            self.sos = nn.Parameter(torch.zeros(cfg.dim))  # the learnable ``sos`` of Eq. 5
        if cfg.decoder_positions == "learned":
            self.pos = nn.Parameter(torch.zeros(m + 1, cfg.dim))  # learned positions over the m+1 slots
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.decoder_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps or None)

    def start(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """P(c) [B, d]: Linear of the mean of the real (unmasked) text states, or the learned sos."""
        if not hasattr(self, "text_start"):
            return self.sos.expand(text.shape[0], -1)
        w = text_mask.to(text.dtype)[:, :, None]
        return self.text_start((text * w).sum(1) / w.sum(1))  # check_inputs: every row has a real token

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0) -> torch.Tensor:
        """x [N, P, d] for decoder positions [start, start+P) -> [N, P, d]."""
        P = x.shape[1]
        pos = (self.pos[start: start + P] if hasattr(self, "pos") else
               sinusoidal_positions(start, P, x.shape[2], x.device).to(x.dtype))
        return self.norm(run_blocks(self.blocks, x, pos, self.every_block, caches))


LOSS_REDUCTIONS = ("mean", "sum")


@dataclass
class ExpertLoss:
    loss: torch.Tensor  # Eq. 6: mean (official code) or sum over owned layers (or the first n_layers of them)
    #                     of the CE averaged over valid frames
    ce: torch.Tensor  # [m] per-layer CE (detached)
    acc: torch.Tensor  # [m] per-layer top-1 accuracy
    layers: tuple[int, ...]  # the RVQ layers ce/acc refer to
    frames: int  # valid frames averaged over


@dataclass
class ExpertState:
    """Per-generation state for incremental sampling (Algorithm 2)."""
    text: list[TextKV]  # cross-attention keys/values per backbone block
    embed: tuple[torch.Tensor, torch.Tensor]  # fused code-embedding maps (CodeEmbedding.fused)
    start: torch.Tensor | None  # R_k's start P(c) [B, d] (None without a decoder)
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
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, CODEBOOK_SIZE, bias=cfg.head_bias) for _ in self.layers)  # C_j
        self._init_weights()

    @classmethod
    def from_codec(cls, cfg: ModelConfig, k: int, codec) -> "Expert":
        return cls(dataclasses.replace(cfg, codec=codec.id), k, codec.code_tables())

    def _init_weights(self):
        if self.embedding.weight.is_meta:  # a meta-device build only counts parameters (siren.model.params):
            return  # nothing to draw, and torch routes meta normal_ through torch._dynamo (~4 s to import)
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # init=scaled (GPT-2): residual projections scaled by 1/sqrt(2 * depth); the official code does not
        for stack in (self.backbone.blocks, self.decoder.blocks if self.decoder is not None else ()):
            for block in stack if self.cfg.init == "scaled" else ():
                for out in (block.self_attn.out, block.mlp.down,
                            *((block.cross_attn.out,) if block.cross_attn is not None else ())):
                    nn.init.normal_(out.weight, 0.0, std / math.sqrt(2 * len(stack)))
        nn.init.normal_(self.embedding.weight, 0.0, std)
        for name, p in self.named_parameters():
            if name in ("backbone.sos", "decoder.sos", "decoder.pos"):
                nn.init.normal_(p, 0.0, std)

    # ---- teacher-forced training (Algorithm 1) -------------------------------------------

    def forward(self, codes: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """codes [B, 12, T], text [B, L, 768], text_mask [B, L] -> logits [B, m, T, 1024] of the owned layers."""
        check_inputs(codes, text, text_mask, self.cfg.text_dim)
        B = codes.shape[0]
        fused = self.embedding.fused()
        prev = self.embedding(codes[:, :, :-1].transpose(1, 2), fused=fused, summed=True)  # sum_j e_j(q_{t-1}^j)
        x = torch.cat([self.backbone.sos.expand(B, 1, -1), prev], 1)
        h = self.backbone(x, self.backbone.text_kv(text, text_mask))  # h_{k,t} [B, T, d] (Eq. 2)
        if self.decoder is None:  # Eq. 3: the heads read h_t
            return self.logits(h, None, None)
        upto = range(self.layers.stop - 1)  # cond_j reads layers < j only
        return self.logits(h, self.embedding(codes[:, : upto.stop].transpose(1, 2), upto, fused),
                           self.decoder.start(text, text_mask))

    def conditions(self, emb: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Embeddings e_0..e_{s+m-2} of one step's codes [B, T, s+m-1, d] and the start P(c) [B, d]
        -> cond_s..cond_{s+m-1} [B, T, m, d] (Eq. 5)."""
        shifted = torch.cat([emb.new_zeros(*emb.shape[:-2], 1, emb.shape[-1]), emb], -2)  # [j] = e_{j-1}, [0] = 0
        if self.cfg.conditioning == "accumulated":
            shifted = shifted.cumsum(-2)  # [j] = sum_{i<j} e_i
        return start[:, None, None] + shifted[..., self.layers.start: self.layers.stop, :]

    def condition(self, codes_t: torch.Tensor, j: int, state: ExpertState) -> torch.Tensor:
        """cond_j [B, d] of one step from codes_t [B, 12] (reads layers < j only); Eq. 5 for one layer."""
        if j == 0:
            return state.start
        if self.cfg.conditioning == "accumulated":
            return state.start + self.embedding(codes_t[:, :j], range(j), state.embed, summed=True)
        return state.start + self.embedding(codes_t[:, j - 1: j], range(j - 1, j), state.embed)[:, 0]

    def logits(self, h: torch.Tensor, emb: torch.Tensor | None, start: torch.Tensor | None) -> torch.Tensor:
        """h [B, T, d], emb [B, T, s+m-1, d] (this step's codes, layers < s+m-1), start P(c) [B, d]
        -> logits [B, m, T, V]."""
        B, T, d = h.shape
        m = len(self.layers)
        if self.decoder is None:  # parallel heads: every owned layer reads h_t
            out = h[:, :, None].expand(B, T, m, d)
        else:
            seq = torch.cat([h[:, :, None], self.conditions(emb, start)], 2)  # [B, T, m+1, d]: Eq. 4's input
            out = self.decoder(seq.flatten(0, 1)).view(B, T, m + 1, d)[:, :, 1:]  # position i+1 -> layer s+i
        return torch.stack([head(out[:, :, i]) for i, head in enumerate(self.heads)], 1)

    def loss(self, batch: dict, reduction: str = "mean", n_layers: int = 0) -> ExpertLoss:
        """Eq. 6 on a batch (codes [B,12,T], frame_mask [B,T], text [B,L,768], text_mask [B,L]); the
        per-layer CEs are averaged (``mean``, official code) or summed (``sum``, Eq. 6 as written).
        ``n_layers`` > 0: only the first n owned layers' CEs enter the loss; every layer's CE is still
        reported, and the other heads get zero gradients (AdamW's weight decay still shrinks them)."""
        if reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got '{reduction}'")
        if not 0 <= n_layers <= len(self.layers):
            raise ValueError(f"n_layers must be in 0..{len(self.layers)} (expert {self.k} owns {len(self.layers)} "
                             f"layers; 0 = all), got {n_layers}")
        codes, frame_mask = batch["codes"], batch["frame_mask"].bool()
        n = int(frame_mask.sum())
        if n == 0:
            raise ValueError("batch has no valid frame (frame_mask is all False)")
        logits = self(codes, batch["text"], batch["text_mask"]).float()  # [B, m, T, V]
        target = codes[:, self.layers.start: self.layers.stop].long()  # [B, m, T]
        # Classes last, rows flat: the same CE as over logits.permute(0, 3, 1, 2), ~3.5x faster forward and
        # backward on CPU (a log-softmax over a strided class dim), to float rounding (~2e-6).
        ce = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none").view(target.shape)  # [B, m, T]
        w = frame_mask[:, None].to(ce.dtype)
        ce_layer = (ce * w).sum((0, 2)) / n
        acc = ((logits.argmax(-1) == target).to(ce.dtype) * w).sum((0, 2)) / n
        kept = ce_layer[:n_layers] if n_layers else ce_layer
        loss = kept.mean() if reduction == "mean" else kept.sum()
        return ExpertLoss(loss, ce_layer.detach(), acc.detach(), tuple(self.layers), n)

    # ---- incremental sampling (Algorithm 2) ----------------------------------------------

    def start(self, text: torch.Tensor, text_mask: torch.Tensor, cached: bool = True) -> ExpertState:
        """State for a new generation; ``cached=False`` recomputes the whole prefix every step."""
        check_inputs(None, text, text_mask, self.cfg.text_dim)
        caches = lambda n: [KVCache() for _ in range(n)] if cached else None  # noqa: E731
        return ExpertState(self.backbone.text_kv(text, text_mask), self.embedding.fused(),
                           self.decoder.start(text, text_mask) if self.decoder is not None else None,
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
            cond = self.condition(codes_t, s + i, state)[:, None]
            if i == 0:
                for c in state.decoder:
                    c.reset()
                cond = torch.cat([h[:, None], cond], 1)
            out = self.decoder(cond, state.decoder, start=0 if i == 0 else i + 1)[:, -1]
        else:  # recompute [h_t, cond_s, ..., cond_{s+i}]
            conds = [self.condition(codes_t, s + ii, state) for ii in range(i + 1)]
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
