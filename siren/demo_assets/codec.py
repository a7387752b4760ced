"""The demo codec: descript-audio-codec's ``DAC`` with the paper's quantizer (12 x 1024 codes x 8-d,
16 kHz, hop 320, 50 frames/s) and narrow convolutions, trained on the embedded demo set's train split.

Training a DAC through its quantizer from step 0 needs 1e4-1e5 steps before RVQ structure
appears (hours on 2 cores; issue #11 measured none after 965 steps). The recipe reaches the
real codec's properties in four stages instead:

1. autoencoder: encoder -> decoder with the quantizer bypassed, multi-scale mel L1 + waveform L1
   (an unquantized encoder keeps more of the signal than one trained through a quantizer), the rate
   warmed up over ``ae_warmup`` steps and then cosine-annealed;
2. quantizers, layer j = 1..12 on the training latents' residual f^{j-1} (Eq. 1): in_proj /
   out_proj = the top 8 principal directions of the residual (so each layer codes what the layers
   before it left, most energetic first), codebook = spherical k-means of the projected residual
   (DAC looks codes up by cosine on l2-normalised vectors; a code's vector is its members' mean; rvq_fit.py);
3. a fresh decoder trained on the quantized latents (encoder and quantizers frozen), with DAC's
   quantizer dropout (half the batch decodes from a random r in 1..12, so reconstruction improves
   as r grows, Fig. 1b), on multi-scale mel L1 + a multi-resolution STFT loss, at a constant rate;
4. the same decoder, as stage 3 stores it (fp16), trained on with the learning rate falling linearly
   to 0, a fresh optimizer and its own seed (so it runs the same on a stored file, ``init_stage=3``):
   at a constant rate the last iterate keeps moving about (FD ratio 0.55-0.62 between checkpoints,
   docs/demo/codec.md), and annealing lets it settle.

    python -m siren.demo_assets.codec                 # rebuilds siren/demo_assets/files/dac16k_demo.pth
    python -m siren.demo_assets.codec init=old.pth    # stages 3-4 alone, on old.pth's encoder and quantizers
    python -m siren.demo_assets.codec init=old.pth init_stage=3   # stage 4 alone, on old.pth's decoder too
    python -m siren.demo_assets.codec out=/tmp/c.pth ae_steps=10 ft_steps=10 decay_steps=10

Stopped part way, the same command resumes: finished stages and a checkpoint every ``checkpoint_every``
steps are kept in ``<out>.build/`` until the file is written (resume.py: in a new process not to the same bits as
a build never stopped). Stages 3 and 4 always start from a stored file (the work folder's stage-2 and stage-3
files, or ``init=``).

The file is DAC's own layout (``state_dict`` + ``metadata.kwargs``, 6.7 MiB) and loads with
``CodecConfig(weights="demo")``. Tensors are stored in fp16: perturbing a build's weights by half
an fp16 ulp changed the decoder's mel L1 by 1e-4 and kept 93-99.7% of the codes (deeper layers,
whose residuals are small, flip more).

A rebuild from scratch (``python -m siren.demo_assets train`` runs this, then the backbones) took 51 min
on an idle 2-core AMD EPYC with AVX-512 (family 26 model 2), stage 3 two thirds of it, 90 min on
another AVX-512 kind (family 25 model 17) and 65 min on an Intel Xeon (family 6 model 167); on the
AVX2-only kind, about 2 hours (estimated from a short run). ``ft_steps=`` trades quality for time. The
committed file is that command's output on the Intel kind (its ``metadata.recipe`` is this recipe's
default, and it has no ``init_from``); how it and the files before it were built, the threads and times
measured, and the trials that chose the stages are in docs/demo/codec.md.
"""
from __future__ import annotations

import csv
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from siren.codec import CODEBOOK_DIM, CODEBOOK_SIZE, DEMO_FILE, DEMO_LABEL, HOP, N_LAYERS, SAMPLE_RATE
from siren.config import check_numbers, load_config
from siren.errors import ConfigError
from siren.io import atomic_path, check_folder, load_torch_file, sha256_file
from siren.runtime import check_device, derive_seed, resolve_device

from .resume import Checkpoint, finished, machine, run_steps, stage_key, work_dir
from .rvq_fit import fit_quantizers
from .spectral_loss import SpectralLoss

log = logging.getLogger(__name__)

# Narrow DAC: the paper's quantizer and 1024-d latent (the model's code embeddings read it), 16- and
# 128-wide convolutions instead of 64 and 1536 (3.5M parameters instead of 74M).
DEMO_KWARGS = dict(encoder_dim=16, encoder_rates=[2, 4, 5, 8], latent_dim=1024, decoder_dim=128,
                   decoder_rates=[8, 5, 4, 2], n_codebooks=N_LAYERS, codebook_size=CODEBOOK_SIZE,
                   codebook_dim=CODEBOOK_DIM, quantizer_dropout=0.5, sample_rate=SAMPLE_RATE)


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
    # stage 1's rate rises linearly over these steps, then the cosine: from 2e-3 at step 0 the autoencoder
    # can sit on a loss plateau near 0.8 for most of the stage (docs/demo/codec.md, "Stage 1's plateau")
    ae_warmup: int = 200
    kmeans_iters: int = 25
    ft_steps: int = 16000
    ft_lr: float = 1e-3  # constant: the decoder keeps improving at this rate (docs/demo/codec.md)
    decay_steps: int = 2000  # stage 4: lr from ft_lr linearly to 0 (0: no stage 4)
    init: str = ""  # a DAC file whose stages 1..init_stage to keep; the later stages run on it
    init_stage: int = 2  # 2: its encoder and quantizers (stages 3-4 run); 3: its decoder too (stage 4 runs)
    # 2 on an idle 2-core machine: 1.4-1.8x faster per step than 1 (docs/demo/codec.md); give 1 when
    # another job shares the cores, where 2 threads run several times slower (as tests/conftest.py)
    threads: int = 2
    fp16: bool = True
    checkpoint_every: int = 500  # steps between a stage's checkpoints (a stopped build resumes: resume.py)
    # cpu | cuda | cuda:N | auto: the same recipe on a GPU (the file is stored from the CPU); a GPU build does not
    # give the same bits twice (the k-means' index_add_ and cuDNN's kernels are not deterministic there)
    device: str = "cpu"

    def __post_init__(self):
        check_numbers(self, positive=("n_train", "batch", "threads", "kmeans_iters", "ae_lr", "ft_lr",
                                          "checkpoint_every"),
                      nonneg=("ae_steps", "ae_warmup", "ft_steps", "decay_steps", "seed", "n_test"))
        if self.init_stage not in (2, 3):
            raise ConfigError(f"init_stage={self.init_stage}: 2 (keep init's encoder and quantizers) "
                              "or 3 (its decoder too)")
        if self.init and self.init_stage == 3 and not self.decay_steps:
            raise ConfigError("init_stage=3 keeps every stage the file has and decay_steps=0 skips stage 4: "
                              "nothing would train; give decay_steps > 0")
        if self.init and not Path(self.init).is_file():  # before the demo clips are made (hashed first: a traceback)
            raise ConfigError(f"init={self.init}: no such file (give a DAC file built by this recipe, or leave init "
                              f"empty)")
        check_device(self.device)
        check_folder(Path(self.out).parent, "out")  # before the stages: a bad out= failed after all four
        if Path(self.out).is_dir():
            raise ConfigError(f"out={self.out} is a folder; give the path of the DAC file to write (a .pth)")
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


def _update(opt, sched, params: list, loss: torch.Tensor) -> float:
    """One optimiser step of stage 1, 3 or 4 (gradients clipped to norm 1); returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss.item()


def autoencoder_schedule(opt, cfg: CodecRecipe):
    """Stage 1's rate: a linear warmup over ``ae_warmup`` steps times a cosine to 0 over all ``ae_steps``."""
    warm, steps = max(1, cfg.ae_warmup), max(1, cfg.ae_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))


def train_autoencoder(model, clips: list[torch.Tensor], cfg: CodecRecipe, gen: torch.Generator,
                      ckpt: Checkpoint) -> list[float]:
    """Stage 1: encoder and decoder, quantizer bypassed. Returns the loss per step."""
    loss_fn, n = SpectralLoss().to(clips[0].device), int(cfg.segment_s * SAMPLE_RATE)
    params = [*model.encoder.parameters(), *model.decoder.parameters()]
    opt = torch.optim.AdamW(params, cfg.ae_lr, betas=(0.8, 0.99))
    sched = autoencoder_schedule(opt, cfg)
    model.train()

    def step() -> float:
        x = crops(clips, cfg.batch, n, gen)
        return _update(opt, sched, params, loss_fn(model.decoder(model.encoder(x)), x))

    return run_steps(step, cfg.ae_steps, ckpt, model, opt, sched, gen, "codec 1/4 autoencoder")


@torch.no_grad()
def encode_latents(model, clips: list[torch.Tensor]) -> list[torch.Tensor]:
    """Encoder output of each whole clip: [1024, T_i] (T_i = ceil(N_i / 320))."""
    model.eval()
    return [model.encoder(model.preprocess(x[None, None], SAMPLE_RATE))[0] for x in clips]


def fresh_decoder(model):
    """A new DAC (seeded init from the global generator) holding ``model``'s encoder and quantizers:
    stage 3 trains its decoder from scratch on codes (fine-tuning the autoencoder's decoder kept its
    faults: tonal classes came back at 1-10% of their RMS)."""
    import dac

    new = dac.DAC(**DEMO_KWARGS)
    new.encoder.load_state_dict(model.encoder.state_dict())
    new.quantizer.load_state_dict(model.quantizer.state_dict())
    return new.eval().requires_grad_(False)


def train_decoder(model, clips: list[torch.Tensor], latents: list[torch.Tensor], cfg: CodecRecipe,
                  gen: torch.Generator, ckpt: Checkpoint, anneal: bool = False) -> list[float]:
    """Stage 3 (``cfg.ft_steps`` at constant lr) or 4 (``anneal``: ``cfg.decay_steps``, lr falling
    linearly to 0): the decoder learns to decode sum_{j<=r} f-hat^j (Eq. 1 cut at r): frame-aligned
    crops of the frozen encoder's latents, quantized by DAC's RVQ in training mode (quantizer
    dropout: a random r for the first half of the batch, r = 12 for the rest); mel + STFT loss."""
    loss_fn, frames = SpectralLoss().to(clips[0].device), int(cfg.segment_s * SAMPLE_RATE) // HOP
    params = list(model.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    steps = cfg.decay_steps if anneal else cfg.ft_steps
    opt = torch.optim.AdamW(params, cfg.ft_lr, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps if anneal else 1.0)
    model.quantizer.train()  # DAC draws the dropout r with the global generator, seeded in build()
    model.decoder.train()

    def step() -> float:
        zs, xs = [], []
        for i in torch.randint(len(clips), (cfg.batch,), generator=gen).tolist():
            t = int(torch.randint(max(1, latents[i].shape[1] - frames + 1), (1,), generator=gen))
            z = latents[i][:, t:t + frames]
            x = clips[i][t * HOP:(t + frames) * HOP]
            zs.append(F.pad(z, (0, frames - z.shape[1])))
            xs.append(F.pad(x, (0, frames * HOP - len(x))))
        with torch.no_grad():
            z_q, *_ = model.quantizer(torch.stack(zs))
        loss = loss_fn(model.decoder(z_q), torch.stack(xs)[:, None], waveform=False)
        return _update(opt, sched, params, loss)

    desc = "codec 4/4 decoder, lr annealed" if anneal else "codec 3/4 decoder on codes"
    losses = run_steps(step, steps, ckpt, model, opt, sched, gen, desc)
    model.eval()
    return losses


def _stored(state: dict, fp16: bool) -> dict:
    """Tensors as the file stores them (fp16 when ``fp16``), on the CPU."""
    return {k: (v.half() if fp16 and v.is_floating_point() else v).cpu().clone() for k, v in state.items()}


def recorded_recipe(cfg: CodecRecipe) -> dict:
    """The recipe keys a built file records (where it was written and from what are not the recipe)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "data", "device", "init", "checkpoint_every")}


def save(model, path: Path, cfg: CodecRecipe, fp16: bool, init: dict | None = None,
         build_key: dict | None = None) -> Path:
    """DAC's file layout (``state_dict`` + ``metadata.kwargs``); ``demo`` marks it for the loader's label;
    ``init`` records the file the kept stages came from; ``build_key`` marks a stage file of the work folder."""
    state = _stored(model.state_dict(), fp16)
    meta = {"kwargs": DEMO_KWARGS, "demo": True, "label": DEMO_LABEL, "recipe": recorded_recipe(cfg),
            "built_on": machine(),
            "trained_on": f"siren.data.demo train split, {cfg.n_train} clips per class, seed {cfg.seed}"}
    if init:
        meta["init_from"] = init
    if build_key:
        meta["build_key"] = build_key
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: torch names the zip's records "archive/",
        torch.save({"state_dict": state, "metadata": meta}, f)  # by a path after its random temporary name
    return path


def build(cfg: CodecRecipe) -> dict:
    """All four stages from ``cfg.seed`` (or the stages after ``cfg.init_stage`` on ``cfg.init``);
    writes ``cfg.out``. Returns timings and per-stage numbers.

    Stages 3 and 4 always start from a stored file, the stage-2 and stage-3 files of the work folder
    (or ``init=``): so one run from scratch, a run stopped and resumed, and a chain of separate runs
    (docs/demo/codec.md) run the same code on the same bits."""
    import dac

    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out, t0, cpu0 = Path(cfg.out), time.perf_counter(), time.process_time()
    work = work_dir(out, cfg.init)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(cfg.seed)
        clips = [c.to(device) for c in train_clips(cfg, Path(cfg.data or tmp))]
    times, report = {}, {"n_clips": len(clips), "seconds_audio": sum(len(c) for c in clips) / SAMPLE_RATE}
    ae, ft, decay = [], [], []
    start = Path(cfg.init) if cfg.init else work / "stage2.pth"
    if not cfg.init and not finished(start, stage_key(cfg, 2)):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = dac.DAC(**DEMO_KWARGS).to(device)
        t = time.perf_counter()
        ae = train_autoencoder(model, clips, cfg, gen, Checkpoint(work / "stage1.ckpt", stage_key(cfg, 1),
                                                                  cfg.checkpoint_every))
        times["autoencoder"] = time.perf_counter() - t
        t = time.perf_counter()
        report["quantizers"] = fit_quantizers(model, encode_latents(model, clips), cfg.kmeans_iters, gen)
        save(model, start, cfg, cfg.fp16, build_key=stage_key(cfg, 2))
        times["quantizers"] = time.perf_counter() - t
    if not cfg.init or cfg.init_stage == 2:
        stage3, key = work / "stage3.pth", stage_key(cfg, 3, sha256_file(start))
        if not (cfg.decay_steps and finished(stage3, key)):
            t = time.perf_counter()
            torch.manual_seed(cfg.seed)  # seeds the fresh decoder's init and DAC's quantizer dropout
            gen = torch.Generator().manual_seed(cfg.seed)
            model = fresh_decoder(_from_file(start, 2, device)).to(device)
            ft = train_decoder(model, clips, encode_latents(model, clips), cfg, gen,
                               Checkpoint(work / "stage3.ckpt", key, cfg.checkpoint_every))
            times["decoder"] = time.perf_counter() - t
            if cfg.decay_steps:
                save(model, stage3, cfg, cfg.fp16, build_key=key)
        start = stage3
    if cfg.decay_steps:  # stage 4, on the decoder as the file stores it, with its own seed
        t = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, 4))
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 4))
        model = _from_file(start, 3, device)
        ckpt = Checkpoint(work / "stage4.ckpt", stage_key(cfg, 4, sha256_file(start)), cfg.checkpoint_every)
        decay = train_decoder(model, clips, encode_latents(model, clips), cfg, gen, ckpt, anneal=True)
        times["decoder_annealed"] = time.perf_counter() - t
    save(model, out, cfg, cfg.fp16, init_record(Path(cfg.init), cfg.init_stage) if cfg.init else None)
    shutil.rmtree(work, ignore_errors=True)
    times["total"], times["cpu"] = time.perf_counter() - t0, time.process_time() - cpu0
    tail = lambda xs: float(np.mean(xs[-20:])) if xs else None  # noqa: E731
    report.update(times_s=times, ae_loss_end=tail(ae), ft_loss_end=tail(ft), decay_loss_end=tail(decay), out=cfg.out)
    return report


def _from_file(path: Path, stage: int, device):
    """A stored file's DAC, its stages 1..``stage`` kept and frozen."""
    return load_init(path, stage)[0].to(device).requires_grad_(False)


def load_init(path: Path, stage: int):
    """``init=``: a demo-width DAC file whose stages 1..``stage`` are kept -> (model, what the new file
    records about it: its sha256, the stages kept, the recipe that built it and where its own came from)."""
    from siren.codec import load_dac

    model, _ = load_dac(path)
    theirs = {"encoder_dim": model.encoder_dim, "encoder_rates": list(model.encoder_rates),
              "latent_dim": model.latent_dim}
    mine = {k: DEMO_KWARGS[k] for k in theirs}
    if theirs != mine:
        raise ConfigError(f"init={path}: encoder/latent widths {theirs} are not the demo codec's {mine}; "
                          "the later stages keep the encoder, so build from scratch (init empty)")
    return model, init_record(path, stage)


def init_record(path: Path, stage: int) -> dict:
    """What a file built on ``path`` records about it (``metadata.init_from``)."""
    meta = load_torch_file(path).get("metadata", {})
    # files built before stage 4 existed name their init "stages_1_2_from"
    return {"sha256": sha256_file(path), "stages_kept": list(range(1, stage + 1)), "recipe": meta.get("recipe"),
            "init_from": meta.get("init_from", meta.get("stages_1_2_from"))}


def main(argv: list[str] | None = None) -> int:
    from siren import cli

    run(load_config(CodecRecipe, cli.start(argv)))
    return 0


def run(cfg: CodecRecipe) -> dict:
    """``build`` with its report logged; the file's path and size printed."""
    report = build(cfg)
    for s in report.get("quantizers", []):
        log.info("layer %2d: %4d codes used, residual energy left %.3f", s["layer"], s["codes_used"],
                 s["residual_energy"])
    log.info("last 20 steps' loss: autoencoder %s, decoder on codes %s, annealed %s; times %s",
             report["ae_loss_end"], report["ft_loss_end"], report["decay_loss_end"],
             ", ".join(f"{k} {v:.0f} s" for k, v in report["times_s"].items()))
    print(f"demo codec: {cfg.out} ({Path(cfg.out).stat().st_size / 2**20:.1f} MiB)")
    return report


if __name__ == "__main__":
    from siren import cli

    cli.run(main, CodecRecipe, __doc__)
