"""The demo codec: descript-audio-codec's ``DAC`` with the paper's quantizer (12 x 1024 codes x 8-d,
16 kHz, hop 320, 50 frames/s) and narrow convolutions, trained on the embedded demo set's train split.

Training a DAC through its quantizer from step 0 needs 1e4-1e5 steps before RVQ structure
appears (hours on 2 cores; issue #11 measured none after 965 steps). The recipe reaches the
real codec's properties in minutes instead, in three stages on one ``DAC`` instance:

1. autoencoder: encoder -> decoder with the quantizer bypassed, multi-scale mel L1 + waveform L1
   (an unquantized encoder keeps more of the signal than one trained through a quantizer);
2. quantizers, layer j = 1..12 on the training latents' residual f^{j-1} (Eq. 1): in_proj /
   out_proj = the top 8 principal directions of the residual (so each layer codes what the layers
   before it left, most energetic first), codebook = spherical k-means of the projected residual
   (DAC looks codes up by cosine on l2-normalised vectors; a code's vector is its members' mean);
3. decoder fine-tuned on the quantized latents (encoder and quantizers frozen), with DAC's
   quantizer dropout (half the batch decodes from a random r in 1..12), so reconstruction
   improves as r grows (Fig. 1b).

    python -m siren.demo_assets.codec                 # rebuilds siren/demo_assets/files/dac16k_demo.pth
    python -m siren.demo_assets.codec out=/tmp/c.pth ae_steps=10 ft_steps=10

The file is DAC's own layout (``state_dict`` + ``metadata.kwargs``, 6.7 MiB) and loads with
``CodecConfig(weights="demo")``. Tensors are stored in fp16: perturbing a build's weights by half
an fp16 ulp changed the decoder's mel L1 by 1e-4 and kept 93-99.7% of the codes (deeper layers,
whose residuals are small, flip more).

The committed file was built with the defaults below (ae_steps=2400, ft_steps=1500) and
``device=cuda`` on a lent H200 in under 200 s; on this 2-core CPU the same recipe ran at ~2 steps/s
(about 35 min for the whole build, estimated from 800 of its 2400 autoencoder steps). Measured on
the 90 test clips (never trained on): semantic-probe accuracy 0.91 at layer 1, 0.36-0.56 at layers
2-12 (Fig. 2c, ``python -m analysis.semantic_probe data=demo``; chance 1/15); every code used in every
layer. Reconstruction improves with r, but only a little: mel L1 0.656 (r = 1), 0.619 (r = 4), 0.618
(r = 12) on the 15 first test clips, and 0.618 with the quantizer bypassed: the narrow decoder, not the
codes, limits quality, and the first layer's 8 directions carry most of what it can use (the real DAC's
curve is much steeper).

Where it falls short (measured on one test clip per class, README: Demo world): the output is far too
quiet for tonal classes (RMS 1-10% of the input for siren, whistle, birdsong, alarm, phone, thunder;
30-70% for noise-like ones), identically with the quantizer bypassed, and uncorrelated with the input
waveform. So the autoencoder stage is the limit. Neither dropping the waveform L1 (a phase-blind
decoder minimises it by shrinking its output) nor 300 more decoder steps changed this much within a
400-step trial. A stronger recipe (wider decoder, many more steps, or an STFT-magnitude loss) is the
next thing to try; it needs a GPU or about an hour of this CPU per attempt.
"""
from __future__ import annotations

import csv
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from siren.codec import CODEBOOK_DIM, CODEBOOK_SIZE, DEMO_FILE, DEMO_LABEL, HOP, N_LAYERS, SAMPLE_RATE
from siren.config import load_config
from siren.errors import ConfigError, DataError
from siren.io import atomic_path
from siren.runtime import check_device, resolve_device

log = logging.getLogger(__name__)

# Narrow DAC: the paper's quantizer and 1024-d latent (the model's code embeddings read it), 16- and
# 128-wide convolutions instead of 64 and 1536 (4.2M parameters instead of 74M).
DEMO_KWARGS = dict(encoder_dim=16, encoder_rates=[2, 4, 5, 8], latent_dim=1024, decoder_dim=128,
                   decoder_rates=[8, 5, 4, 2], n_codebooks=N_LAYERS, codebook_size=CODEBOOK_SIZE,
                   codebook_dim=CODEBOOK_DIM, quantizer_dropout=0.5, sample_rate=SAMPLE_RATE)
MEL_SCALES = ((256, 32), (1024, 64), (2048, 128))  # (window, mel bands) of the multi-scale mel loss


@dataclass
class CodecRecipe:
    out: str = str(DEMO_FILE)
    data: str = ""  # a demo source directory to (re)write the clips into; empty: a temporary one
    seed: int = 0
    n_train: int = 20  # demo clips per class (train split; the test split is never read here)
    n_test: int = 6
    segment_s: float = 0.4  # training crops
    batch: int = 8
    ae_steps: int = 2400
    ae_lr: float = 2e-3
    kmeans_iters: int = 25
    ft_steps: int = 1500
    ft_lr: float = 5e-4
    threads: int = 1  # 1 thread: several times faster than 2 on a shared 2-core machine (as tests/conftest.py)
    fp16: bool = True
    device: str = "cpu"  # cpu | cuda | cuda:N | auto: the same recipe on a GPU (the file is stored from the CPU)

    def __post_init__(self):
        for k in ("n_train", "batch", "threads", "kmeans_iters"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}={getattr(self, k)}: must be >= 1")
        check_device(self.device)
        if self.segment_s * SAMPLE_RATE < 4 * HOP:
            raise ConfigError(f"segment_s={self.segment_s}: crops need at least {4 * HOP / SAMPLE_RATE} s")


def train_clips(cfg: CodecRecipe, folder: Path) -> list[torch.Tensor]:
    """The demo set's train split, written under ``folder``: float32 [N_i] at 16 kHz per clip."""
    import soundfile as sf

    from siren.data.demo import make_demo

    manifest = make_demo(folder, seed=cfg.seed, n_train=cfg.n_train, n_test=cfg.n_test)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    return [torch.from_numpy(sf.read(manifest.parent / r["audio"], dtype="float32")[0]) for r in rows]


def crops(clips: list[torch.Tensor], batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random crops of ``n`` samples (clips are >= 1 s) -> [B, 1, n]."""
    out = []
    for i in torch.randint(len(clips), (batch,), generator=gen).tolist():
        x = clips[i]
        s = int(torch.randint(max(1, len(x) - n + 1), (1,), generator=gen))
        out.append(F.pad(x[s:s + n], (0, max(0, n - len(x)))))
    return torch.stack(out)[:, None]


class SpectralLoss(torch.nn.Module):
    """Multi-scale mel L1 on log10 magnitudes (DAC's reconstruction loss, fewer scales) + waveform L1."""

    def __init__(self):
        super().__init__()
        from torchaudio.transforms import MelSpectrogram

        self.mels = torch.nn.ModuleList(MelSpectrogram(SAMPLE_RATE, n_fft=w, hop_length=w // 4, n_mels=m, power=1.0)
                                        for w, m in MEL_SCALES)

    def mel_l1(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return sum((m(y).clamp_min(1e-5).log10() - m(x).clamp_min(1e-5).log10()).abs().mean()
                   for m in self.mels) / len(self.mels)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = min(y.shape[-1], x.shape[-1])  # DAC's transposed convs come out a few samples short
        y, x = y[..., :n], x[..., :n]
        return self.mel_l1(y, x) + (y - x).abs().mean()


def train_autoencoder(model, clips: list[torch.Tensor], cfg: CodecRecipe, gen: torch.Generator) -> list[float]:
    """Stage 1: encoder and decoder, quantizer bypassed. Returns the loss per step."""
    from tqdm import tqdm

    loss_fn, n = SpectralLoss().to(clips[0].device), int(cfg.segment_s * SAMPLE_RATE)
    params = [*model.encoder.parameters(), *model.decoder.parameters()]
    opt = torch.optim.AdamW(params, cfg.ae_lr, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.ae_steps))
    model.train()
    losses = []
    for _ in tqdm(range(cfg.ae_steps), desc="codec 1/3 autoencoder", unit="step"):
        x = crops(clips, cfg.batch, n, gen)
        loss = loss_fn(model.decoder(model.encoder(x)), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def encode_latents(model, clips: list[torch.Tensor]) -> list[torch.Tensor]:
    """Encoder output of each whole clip: [1024, T_i] (T_i = ceil(N_i / 320))."""
    model.eval()
    return [model.encoder(model.preprocess(x[None, None], SAMPLE_RATE))[0] for x in clips]


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
def fit_quantizers(model, latents: list[torch.Tensor], cfg: CodecRecipe, gen: torch.Generator) -> list[dict]:
    """Stage 2: layer j's in/out projections and codebook from the residual f^{j-1} left by layers
    < j (Eq. 1), written into the DAC's own quantizer modules; the residual is then updated by
    running that module, so the next layer sees exactly what DAC's RVQ leaves."""
    from tqdm import tqdm

    residual = torch.cat(latents, dim=1)[None]  # [1, 1024, N frames]
    total = residual.pow(2).sum()
    stats = []
    for j, q in enumerate(tqdm(model.quantizer.quantizers, desc="codec 2/3 quantizers", unit="layer")):
        r = residual[0].T  # [N, 1024]
        mu = r.mean(0)
        _, vecs = torch.linalg.eigh((r - mu).T @ (r - mu) / len(r))
        W = vecs[:, -CODEBOOK_DIM:].flip(1).T.contiguous()  # [8, 1024] top principal directions
        _set_weight_norm(q.in_proj, W[:, :, None])
        q.in_proj.bias.copy_(-W @ mu)  # z_e = W (f - mu)
        _set_weight_norm(q.out_proj, W.T[:, :, None].contiguous())
        q.out_proj.bias.copy_(mu)  # f-hat = W^T z_q + mu
        q.codebook.weight.copy_(spherical_kmeans((r - mu) @ W.T, CODEBOOK_SIZE, cfg.kmeans_iters, gen))
        z_q, *_, idx, _ = q(residual)
        residual = residual - z_q
        stats.append(dict(layer=j + 1, codes_used=int(idx.unique().numel()),
                          residual_energy=float(residual.pow(2).sum() / total)))
    return stats


def _set_weight_norm(conv, w: torch.Tensor) -> None:
    """Weight-normed conv (weight = g v / |v|, norm over all dims but 0) -> weight ``w``."""
    conv.weight_v.copy_(w)
    conv.weight_g.copy_(w.flatten(1).norm(dim=1).reshape(conv.weight_g.shape))


def finetune_decoder(model, clips: list[torch.Tensor], latents: list[torch.Tensor], cfg: CodecRecipe,
                     gen: torch.Generator) -> list[float]:
    """Stage 3: the decoder learns to decode sum_{j<=r} f-hat^j (Eq. 1 cut at r): frame-aligned
    crops of the frozen encoder's latents, quantized by DAC's RVQ in training mode (quantizer
    dropout: a random r for the first half of the batch, r = 12 for the rest)."""
    from tqdm import tqdm

    loss_fn, frames = SpectralLoss().to(clips[0].device), int(cfg.segment_s * SAMPLE_RATE) // HOP
    opt = torch.optim.AdamW(model.decoder.parameters(), cfg.ft_lr, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.ft_steps))
    model.quantizer.train()  # DAC draws the dropout r with the global generator, seeded in build()
    model.decoder.train()
    losses = []
    for _ in tqdm(range(cfg.ft_steps), desc="codec 3/3 decoder on codes", unit="step"):
        zs, xs = [], []
        for i in torch.randint(len(clips), (cfg.batch,), generator=gen).tolist():
            t = int(torch.randint(max(1, latents[i].shape[1] - frames + 1), (1,), generator=gen))
            z = latents[i][:, t:t + frames]
            x = clips[i][t * HOP:(t + frames) * HOP]
            zs.append(F.pad(z, (0, frames - z.shape[1])))
            xs.append(F.pad(x, (0, frames * HOP - len(x))))
        with torch.no_grad():
            z_q, *_ = model.quantizer(torch.stack(zs))
        loss = loss_fn(model.decoder(z_q), torch.stack(xs)[:, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save(model, path: Path, cfg: CodecRecipe, fp16: bool) -> Path:
    """DAC's file layout (``state_dict`` + ``metadata.kwargs``); ``demo`` marks it for the loader's label."""
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).cpu().clone()
             for k, v in model.state_dict().items()}
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("out", "data", "device")}
    meta = {"kwargs": DEMO_KWARGS, "demo": True, "label": DEMO_LABEL, "recipe": recipe,
            "trained_on": f"siren.data.demo train split, {cfg.n_train} clips per class, seed {cfg.seed}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, "metadata": meta}, tmp)
    return path


def build(cfg: CodecRecipe) -> dict:
    """All three stages from ``cfg.seed``; writes ``cfg.out``. Returns timings and per-stage numbers."""
    import dac

    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        clips = [c.to(device) for c in train_clips(cfg, Path(cfg.data or tmp))]
    model = dac.DAC(**DEMO_KWARGS).to(device)
    times, report = {}, {"n_clips": len(clips), "seconds_audio": sum(len(c) for c in clips) / SAMPLE_RATE}
    t = time.perf_counter()
    ae = train_autoencoder(model, clips, cfg, gen)
    times["autoencoder"] = time.perf_counter() - t
    t = time.perf_counter()
    latents = encode_latents(model, clips)
    report["quantizers"] = fit_quantizers(model, latents, cfg, gen)
    times["quantizers"] = time.perf_counter() - t
    t = time.perf_counter()
    ft = finetune_decoder(model, clips, latents, cfg, gen)
    times["decoder"] = time.perf_counter() - t
    save(model, Path(cfg.out), cfg, cfg.fp16)
    times["total"], times["cpu"] = time.perf_counter() - t0, time.process_time() - cpu0
    tail = lambda xs: float(np.mean(xs[-20:])) if xs else None  # noqa: E731
    report.update(times_s=times, ae_loss_end=tail(ae), ft_loss_end=tail(ft), out=cfg.out)
    return report


def main(argv: list[str] | None = None) -> dict:
    from siren import cli

    cfg = load_config(CodecRecipe, cli.start(argv))
    report = build(cfg)
    for s in report["quantizers"]:
        log.info("layer %2d: %4d codes used, residual energy left %.3f", s["layer"], s["codes_used"],
                 s["residual_energy"])
    log.info("last 20 steps' loss: autoencoder %s, decoder on codes %s; times %s", report["ae_loss_end"],
             report["ft_loss_end"], ", ".join(f"{k} {v:.0f} s" for k, v in report["times_s"].items()))
    print(f"demo codec: {cfg.out} ({Path(cfg.out).stat().st_size / 2**20:.1f} MiB)")
    return report


if __name__ == "__main__":
    main()
