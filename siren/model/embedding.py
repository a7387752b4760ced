"""Code embeddings (appendix B): "12 parallel MLP projectors" on top of the frozen RVQ tables.

e_j(q) = W_j (O_j Z_j[q] + o_j) + b_j : DAC codebook vector Z_j[q] (8-d) -> DAC's own frozen
out-projection (O_j, o_j) to the 1024-d latent f-hat^j -> trainable Linear(1024, d) per layer.
Both maps are linear, so e_j is computed through the fused [d, 8] matrix W_j O_j (identical
values, 1/128 of the work); the frozen tables are buffers, so a checkpoint is self-contained.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from siren.codec import CODEBOOK_DIM, CODEBOOK_SIZE, N_LAYERS, CodeTables

LATENT_DIM = 1024  # DAC 16 kHz latent width: 64 * 2**4


class CodeEmbedding(nn.Module):
    def __init__(self, dim: int, tables: CodeTables | None = None):
        """``tables=None`` leaves zero tables, to be filled by ``load_state_dict`` (a checkpoint)."""
        super().__init__()
        if tables is None:
            tables = CodeTables(torch.zeros(N_LAYERS, CODEBOOK_SIZE, CODEBOOK_DIM),
                                torch.zeros(N_LAYERS, LATENT_DIM, CODEBOOK_DIM), torch.zeros(N_LAYERS, LATENT_DIM))
        if tuple(tables.codebooks.shape) != (N_LAYERS, CODEBOOK_SIZE, CODEBOOK_DIM) or \
                tuple(tables.out_weight.shape) != (N_LAYERS, LATENT_DIM, CODEBOOK_DIM):
            raise ValueError(f"code tables of shape {tuple(tables.codebooks.shape)} / {tuple(tables.out_weight.shape)} "
                             f"are not the 12-layer DAC 16 kHz tables ([12, 1024, 8] / [12, 1024, 8])")
        self.register_buffer("codebooks", tables.codebooks.detach().clone().float())  # Z_j   [12, V, 8]
        self.register_buffer("out_weight", tables.out_weight.detach().clone().float())  # O_j [12, 1024, 8]
        self.register_buffer("out_bias", tables.out_bias.detach().clone().float())  # o_j   [12, 1024]
        # W_j: 12 Linear(1024, d); zeros, not torch.empty (whatever memory held), until the expert's init
        # draws them (zeros draw nothing from the RNG, so the expert's initialisation is unchanged)
        self.weight = nn.Parameter(torch.zeros(N_LAYERS, dim, LATENT_DIM))
        self.bias = nn.Parameter(torch.zeros(N_LAYERS, dim))  # b_j

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [12, d, 8], c [12, d]) with e_j(q) = A_j Z_j[q] + c_j.

        One batched matmul W_j [O_j | o_j], where two products (A and c apart) wrote W's [12, d, 1024]
        gradient twice and added them; [O_j | o_j] is built as its contiguous transpose [12, 9, 1024],
        the operand layout CPU bmm runs fastest here. Forward + backward of a d=64 table on one thread:
        8 -> 2 ms, of a tiny demo expert's ~29 ms step."""
        out_t = torch.cat([self.out_weight.transpose(1, 2), self.out_bias[:, None]], 1).to(self.weight.dtype)
        Ac = torch.bmm(self.weight, out_t.transpose(1, 2))  # [12, d, 9]
        return Ac[..., :CODEBOOK_DIM], Ac[..., CODEBOOK_DIM] + self.bias

    def forward(self, codes: torch.Tensor, layers: range = range(N_LAYERS),
                fused: tuple[torch.Tensor, torch.Tensor] | None = None, summed: bool = False) -> torch.Tensor:
        """codes [..., J] of the consecutive RVQ layers ``layers`` -> embeddings [..., J, d],
        or with ``summed`` their sum over the J layers [..., d] (the backbone input).

        ``fused``: a precomputed ``self.fused()`` (sampling reuses it across steps)."""
        if codes.shape[-1] != len(layers) or layers.step != 1:
            raise ValueError(f"codes have {codes.shape[-1]} layers in the last dim, expected the "
                             f"consecutive layers {layers.start}..{layers.stop - 1}")
        A, c = self.fused() if fused is None else fused
        A, c = A[layers.start: layers.stop], c[layers.start: layers.stop]
        offset = torch.arange(layers.start, layers.stop, device=codes.device) * self.codebooks.shape[1]
        z = F.embedding(codes.long() + offset, self.codebooks.flatten(0, 1)).to(A.dtype)  # Z_j[q]  [..., J, 8]
        if summed:
            return torch.einsum("...jc,jdc->...d", z, A) + c.sum(0)
        return torch.einsum("...jc,jdc->...jd", z, A) + c
