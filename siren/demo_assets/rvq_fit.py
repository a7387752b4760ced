"""Stage 2 of the demo codec's recipe (siren.demo_assets.codec): DAC's 12 quantizers fitted to a trained
encoder's latents, layer by layer on the residual the layers before it leave (Eq. 1). Layer j's
in/out projections are the top 8 principal directions of the residual f^{j-1} (so each layer codes the
most energetic part of what is left), its codebook a spherical k-means of the projected residual
(DAC looks codes up by cosine on l2-normalised vectors). Every code is used in every layer by
construction; that the first layers carry the most of the class is measured, not built in
(``python -m analysis.semantic_probe data=demo``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from siren.codec import CODEBOOK_DIM, CODEBOOK_SIZE
from siren.errors import DataError


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """[N, d] -> codebook [k, d]: points go to the code of highest cosine (DAC's lookup), a code is
    its members' mean. Empty codes are re-seeded with the worst-fitting points, also after the
    last update, so every code is some training point's nearest."""
    if len(x) < k:
        raise DataError(f"spherical k-means: {len(x)} training frames for {k} codes; give more clips (n_train=)")
    unit = F.normalize(x, dim=1)
    codes = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for it in range(iters + 1):
        cos, idx = (unit @ F.normalize(codes, dim=1).T).max(1)
        count = torch.bincount(idx, minlength=k)
        if it < iters:
            codes = torch.zeros_like(codes).index_add_(0, idx, x) / count.clamp_min(1)[:, None]
        empty = (count == 0).nonzero()[:, 0] if it < iters else _unused(x, codes)
        codes[empty] = x[cos.argsort()[: len(empty)]]  # the points their code fits worst
    return codes


def _unused(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    idx = (F.normalize(x, dim=1) @ F.normalize(codes, dim=1).T).argmax(1)
    return (torch.bincount(idx, minlength=len(codes)) == 0).nonzero()[:, 0]


@torch.no_grad()
def fit_quantizers(model, latents: list[torch.Tensor], kmeans_iters: int, gen: torch.Generator) -> list[dict]:
    """Stage 2: layer j's in/out projections and codebook from the residual f^{j-1} left by layers
    < j (Eq. 1), written into the DAC's own quantizer modules; the residual is then updated by
    running that module, so the next layer sees exactly what DAC's RVQ leaves."""
    from tqdm import tqdm

    residual = torch.cat(latents, dim=1)[None]  # [1, 1024, N frames]
    total = residual.pow(2).sum()
    stats = []
    for j, q in enumerate(tqdm(model.quantizer.quantizers, desc="codec 2/4 quantizers", unit="layer")):
        r = residual[0].T  # [N, 1024]
        mu = r.mean(0)
        _, vecs = torch.linalg.eigh((r - mu).T @ (r - mu) / len(r))
        W = vecs[:, -CODEBOOK_DIM:].flip(1).T.contiguous()  # [8, 1024] top principal directions
        _set_weight_norm(q.in_proj, W[:, :, None])
        q.in_proj.bias.copy_(-W @ mu)  # z_e = W (f - mu)
        _set_weight_norm(q.out_proj, W.T[:, :, None].contiguous())
        q.out_proj.bias.copy_(mu)  # f-hat = W^T z_q + mu
        q.codebook.weight.copy_(spherical_kmeans((r - mu) @ W.T, CODEBOOK_SIZE, kmeans_iters, gen))
        z_q, *_, idx, _ = q(residual)
        residual = residual - z_q
        stats.append(dict(layer=j + 1, codes_used=int(idx.unique().numel()),
                          residual_energy=float(residual.pow(2).sum() / total)))
    return stats


def _set_weight_norm(conv, w: torch.Tensor) -> None:
    """Weight-normed conv (weight = g v / |v|, norm over all dims but 0) -> weight ``w``."""
    conv.weight_v.copy_(w)
    conv.weight_g.copy_(w.flatten(1).norm(dim=1).reshape(conv.weight_g.shape))
