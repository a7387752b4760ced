"""Fig. 1b: reconstruction improves with the number r of RVQ layers; generation quality need not.

Eq. 1 with the sum cut at r: x-hat_r = D(sum_{j<=r} f-hat^j), decoded from the clip's first r
code layers (r = 1..12), against the audio the codes were made from (the prepared item's
source file through the same preprocessing). Three measures per clip, averaged over clips:

- LSD, log-spectral distance (dB): mean over STFT frames of the RMS over frequency bins of
  10 log10(|X|^2 / |X_r|^2) (512-point Hann STFT, hop 128, power floored at 1e-10);
- mel L1: mean |log10 mel_ref - log10 mel_r| (64 mel bands, 50-8000 Hz, power floored at 1e-5);
- SI-SNR (dB), scale-invariant SNR after removing each signal's mean.

``per_clip.csv`` also has each decode's loudness against its reference (``rms_ratio``, RMS over RMS): not a
quality measure, but where a decoder drops a class (the demo codec's birdsong) it shows as a ratio near 0.

Whether depth helps is read per clip: the change of each measure from the smallest to the largest r,
its mean with the standard error over clips, and how many clips got better (``depth_change.csv``).
By default every clip of the split is decoded whole (the 90 demo test clips take about a minute on
2 CPU cores): on 4 clips of 1 s, the former default, the rebuilt seed-0 demo codecs' mean rose with r
while it fell on the 90 (docs/demo/codec.md, Rebuilt codecs).

The decoder's own limit is drawn beside the curve: the unquantized latent (the encoder's output, no RVQ)
decoded by the same decoder (``ceiling.csv``, the dotted line). Reconstruction from r layers cannot be expected
to come nearer the reference than that.

Generation quality at depth r comes from runs trained with r layers, when given:
``gen_runs=[a,b] gen_r=[4,12]`` reads each run's eval ``results.json`` (metric ``gen_metric``,
default fd; results.json's keys are lower case, so FD reads the same). The harness trains 12-layer models
only, so an r below 12 is of audio generated elsewhere and scored with ``eval/audiocaps.py gen_dir=``; a
results.json of a ``ckpt=`` evaluation (a harness run) with another r is refused. Without them the figure
says that no generation results were given.

    python -m analysis.rvq_depth data=demo
    python -m analysis.rvq_depth data=PREP max_clips=64 seconds=1 device=cuda   # the real DAC: a sample
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from analysis import prepared, style
from analysis.cli import as_list, command, int_list, out_dir, write_csv
from analysis.logs import metric_of, metrics_phrase, read_results, results_weights
from siren.codec import N_LAYERS, SAMPLE_RATE
from siren.config import check_numbers
from siren.errors import ConfigError, DataError
from siren.runtime import resolve_device

N_FFT, HOP_STFT, N_MELS = 512, 128, 64


log = logging.getLogger(__name__)

@dataclass
class RvqDepthConfig:
    data: str = "demo"  # prepared directory | demo
    split: str = "test"
    max_clips: int = 0  # 0 = all; else a seeded draw (the real 74M-parameter DAC decoder is slow on CPU)
    seconds: float = 0.0  # compare the first `seconds` of each clip (0 = whole clips)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda[:N]
    codec: str = ""  # codec weights (pretrained | random | demo | /path.pth); empty: those the data was prepared with
    depths: str = "1,2,3,4,5,6,7,8,9,10,11,12"  # r values to decode with
    gen_runs: str = ""  # optional: run dirs (each with results.json) of models trained with r layers
    gen_r: str = ""  # the r of each gen_runs entry
    gen_metric: str = "fd"  # key in results.json ("metrics" object or top level), any case
    seed: int = 0
    out: str = ""

    def __post_init__(self):
        check_numbers(self, nonneg=("max_clips", "seconds"))


def decode_depths(codec, codes: torch.Tensor, depths: list[int]) -> torch.Tensor:
    """codes [12, T] of one clip -> waveforms [len(depths), T * 320], row i decoded from
    sum_{j<=r} f-hat^j with r = depths[i] (Eq. 1 cut at r), all depths in one decoder batch."""
    _, proj = codec.layer_features(codes[None])  # [1, 12, T, D]
    z = proj[0].cumsum(0)[[r - 1 for r in depths]]  # [R, T, D]: partial sums
    with torch.no_grad():
        wav = codec.dac.decode(z.transpose(1, 2).to(codec.device))[:, 0]
    n = codes.shape[-1] * 320
    return torch.nn.functional.pad(wav, (0, max(0, n - wav.shape[-1])))[:, :n].cpu()


def decode_unquantized(codec, wav: torch.Tensor) -> torch.Tensor:
    """wav [N] -> the decoder's output for the encoder's unquantized latent (no RVQ): the decoder's ceiling."""
    from siren.model.continuous.latent import dac_latent

    with torch.no_grad():
        out = codec.dac.decode(dac_latent(codec, wav))[0, 0].cpu()
    return torch.nn.functional.pad(out, (0, max(0, wav.shape[-1] - out.shape[-1])))[: wav.shape[-1]]


def _power_spec(x: torch.Tensor) -> torch.Tensor:
    win = torch.hann_window(N_FFT, dtype=x.dtype)
    return torch.stft(x, N_FFT, HOP_STFT, window=win, center=True, return_complex=True).abs().pow(2)  # [F, frames]


def log_spectral_distance(ref: torch.Tensor, est: torch.Tensor, floor: float = 1e-10) -> float:
    """Mean over frames of sqrt(mean over bins of (10 log10 P_ref - 10 log10 P_est)^2), in dB."""
    d = 10 * (torch.log10(_power_spec(ref).clamp_min(floor)) - torch.log10(_power_spec(est).clamp_min(floor)))
    return float(d.pow(2).mean(0).sqrt().mean())


def mel_l1(ref: torch.Tensor, est: torch.Tensor, floor: float = 1e-5) -> float:
    from torchaudio.transforms import MelSpectrogram

    mel = MelSpectrogram(SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_STFT, n_mels=N_MELS, f_min=50.0, f_max=8000.0)
    a, b = mel(ref.float()).clamp_min(floor), mel(est.float()).clamp_min(floor)
    return float((torch.log10(a) - torch.log10(b)).abs().mean())


def si_snr(ref: torch.Tensor, est: torch.Tensor, eps: float = 1e-12) -> float:
    """Scale-invariant SNR in dB: 10 log10(|s_t|^2 / |e|^2), s_t the projection of est on ref."""
    ref, est = ref.double() - ref.double().mean(), est.double() - est.double().mean()
    target = (est @ ref) / (ref @ ref + eps) * ref
    return float(10 * torch.log10(target.pow(2).sum() / ((est - target).pow(2).sum() + eps) + eps))


def rms_ratio(ref: torch.Tensor, est: torch.Tensor, eps: float = 1e-12) -> float:
    return float(est.double().pow(2).mean().sqrt() / (ref.double().pow(2).mean().sqrt() + eps))


LOWER_IS_BETTER = {"lsd_db": True, "mel_l1": True, "si_snr_db": False}  # the measures, by column name


def depth_change(per_clip: list[dict], r_from: int, r_to: int) -> list[dict]:
    """Per measure: the mean over clips of (value at r_to - value at r_from), its standard error
    (sample std / sqrt n; NaN for one clip) and the number of clips that got better."""
    out = []
    for m, lower in LOWER_IS_BETTER.items():
        # rows come clip by clip, one per r: the values at one r are in clip order (ids may repeat)
        at = {r: np.array([p[m] for p in per_clip if p["r"] == r]) for r in (r_from, r_to)}
        d = at[r_to] - at[r_from]
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        better = int((d < 0).sum() if lower else (d > 0).sum())
        out.append(dict(metric=m, r_from=r_from, r_to=r_to, mean_change=float(d.mean()), se=se,
                        clips_better=better, n_clips=len(d)))
    return out


def plot(rows: list[dict], gen: list[tuple[int, float]], gen_metric: str, note: str, ceiling: float | None = None):
    fig, ax = style.figure(style.COLUMN, 0.7)
    rs = [r["r"] for r in rows]
    c = style.layer_colors(3)
    ax.plot(rs, [r["lsd_db"] for r in rows], marker="o", color=c[0], label="reconstruction LSD (dB)")
    if ceiling is not None:
        ax.axhline(ceiling, color=c[0], lw=0.8, ls=":", label="decoder ceiling (no RVQ)")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("RVQ layers used $r$")
    ax.set_ylabel("Log-spectral distance (dB) $\\downarrow$", color=c[0])
    ax.set_xticks(rs)
    ax2 = ax.twinx()
    ax2.spines["right"].set_visible(True)
    if gen:
        ax2.plot([g[0] for g in gen], [g[1] for g in gen], marker="s", color=c[1], ls="--",
                 label=f"generation {gen_metric}")
        ax2.set_ylabel(f"Generation {gen_metric}", color=c[1])
    else:
        ax2.set_yticks([])
        ax.set_title("generation quality: no results given", fontsize=6, color="0.4")
    style.note(fig, note)
    return fig


def run(cfg: RvqDepthConfig) -> list:
    folder = out_dir(cfg.out, "rvq_depth")
    depths = int_list(cfg.depths, "depths")
    if not depths or any(not 1 <= r <= N_LAYERS for r in depths):
        raise ConfigError(f"depths={cfg.depths}: each r must be in 1..{N_LAYERS}")
    runs, rs = as_list(cfg.gen_runs), int_list(cfg.gen_r, "gen_r")
    if len(runs) != len(rs):
        raise ConfigError(f"gen_runs has {len(runs)} entries but gen_r has {len(rs)}; give one r per run")
    if any(not 1 <= r <= N_LAYERS for r in rs):  # an r = 0 point was drawn on Fig. 1b
        raise ConfigError(f"gen_r={cfg.gen_r}: each r must be in 1..{N_LAYERS}")
    gen, missing = [], []  # read before the decoding: a bad results.json is named at once
    for run_dir, r in zip(runs, rs):
        res = read_results(run_dir)
        if res is None:  # was a warning that the metric was missing, and a figure without the point
            raise DataError(f"gen_runs: {run_dir} holds no results.json; give the folder (or file) that "
                            f"eval/audiocaps.py out= wrote")
        made_by = ((res or {}).get("config") or {}).get("ckpt")
        if made_by and r != N_LAYERS:
            raise ConfigError(f"gen_r={r} for {run_dir}: its results.json is an evaluation of the harness run "
                              f"{made_by}, whose models decode all {N_LAYERS} layers. The harness trains "
                              f"{N_LAYERS}-layer models only: give r = {N_LAYERS} for it, and for other r the results "
                              f"of audio generated with r layers elsewhere (eval/audiocaps.py gen_dir=)")
        v = metric_of(res, cfg.gen_metric.lower())
        (gen.append((r, v, results_weights(res))) if v is not None else missing.append(run_dir))
    if missing:
        log.warning("no '%s' in results.json of %s; left out of the figure", cfg.gen_metric, missing)
    data = prepared.resolve(cfg.data, cfg.codec)
    items = prepared.load(data, cfg.split, cfg.max_clips, cfg.seed)
    items.check_sources()
    codec = prepared.open_codec(data, [cfg.split], cfg.codec)
    codec.to(resolve_device(cfg.device))
    keep = int(round(cfg.seconds * 50)) if cfg.seconds > 0 else None  # frames (50 per second)
    per_clip, ceiling = [], []
    from tqdm import tqdm

    def measures(ref, est):
        return dict(lsd_db=log_spectral_distance(ref, est), mel_l1=mel_l1(ref, est), si_snr_db=si_snr(ref, est),
                    rms_ratio=rms_ratio(ref, est))

    short = []  # clips prepare kept with a warning, too short for the STFT's reflect padding (a traceback, all lost)
    for n, codes in enumerate(tqdm(items.codes, desc="decode clips", unit="clip")):
        codes = codes[:, :keep]
        ref = items.waveform(n)[: codes.shape[-1] * 320]
        if ref.shape[-1] <= N_FFT // 2:
            short.append(items.ids[n])
            continue
        for r, est in zip(depths, decode_depths(codec, codes, depths)[:, : ref.shape[-1]]):
            per_clip.append(dict(id=items.ids[n], r=r, **measures(ref, est)))
        ceiling.append(measures(ref, decode_unquantized(codec, ref)))
    if short:
        log.warning("%d clip(s) of %d left out: at most %d samples of audio, too short for the %d-point STFT: %s",
                    len(short), len(items.codes), N_FFT // 2, N_FFT, ", ".join(short[:10]))
    if not ceiling:
        raise DataError(f"{data} split {cfg.split}: no clip longer than {N_FFT // 2} samples to measure")
    prov = dict(codec=codec.id, weights=codec.weights_label, n_clips=len(ceiling))
    rows = [dict(r=r, **{m: float(np.mean([p[m] for p in per_clip if p["r"] == r]))
                         for m in LOWER_IS_BETTER}, **prov) for r in depths]
    top = {m: float(np.mean([p[m] for p in ceiling])) for m in LOWER_IS_BETTER}
    made = dict(codec=codec.id, weights=codec.weights_label)  # every CSV says what made its numbers
    written = [write_csv(folder / "reconstruction.csv", rows),
               write_csv(folder / "per_clip.csv", [dict(**p, **made) for p in per_clip]),
               write_csv(folder / "ceiling.csv", [dict(decoded_from="unquantized latent (no RVQ)", **top, **prov)])]
    change = depth_change(per_clip, min(depths), max(depths)) if len(depths) > 1 else []
    written.append(write_csv(folder / "depth_change.csv", [dict(**c, **made) for c in change],
                             columns=["metric", "r_from", "r_to", "mean_change", "se", "clips_better", "n_clips",
                                      *made]))
    written.append(write_csv(folder / "generation.csv",
                             [dict(r=r, metric=cfg.gen_metric, value=v, weights=w) for r, v, w in sorted(gen)],
                             columns=["r", "metric", "value", "weights"]))
    note = "; ".join([prepared.weights_note(codec), *sorted({metrics_phrase(w) for _, _, w in gen})])
    written += style.save_figure(plot(rows, sorted((r, v) for r, v, _ in gen), cfg.gen_metric, note, top["lsd_db"]),
                                 folder, "fig1b_rvq_depth")
    print(f"reconstruction from the first r layers of {len(items.codes)} clips; {prepared.codec_words(codec)}")
    for row in [*rows, dict(r="no RVQ", **top)]:
        print(f"r={row['r']:>2}: LSD {row['lsd_db']:6.2f} dB  mel-L1 {row['mel_l1']:.3f}  "
              f"SI-SNR {row['si_snr_db']:6.2f} dB")
    for c in change:
        print(f"r={c['r_from']} -> r={c['r_to']}: {c['metric']} {c['mean_change']:+.4f} +- {c['se']:.4f} "
              f"(mean change +- standard error over clips), better for {c['clips_better']} of {c['n_clips']} clips")
    if not gen:
        print("generation quality vs r: no results given (gen_runs=[...] gen_r=[...])")
    return written


if __name__ == "__main__":
    command("rvq_depth", RvqDepthConfig, run, __doc__)
