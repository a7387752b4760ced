"""The evaluation's settings (``python eval/audiocaps.py KEY=VALUE ...``): what to evaluate, which metrics and
backbone weights, each metric's audio protocol and, for ``ckpt=``, how to generate. Checked when read, so a grid
names a wrong key before any job runs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from eval import metrics as M
from eval.audio import CHANNELS, CROPS
from eval.backbones import RESAMPLERS, VGGish
from siren.assets import WEIGHTS_MODES
from siren.config import check_numbers
from siren.errors import ConfigError
from siren.runtime import check_device
from siren.sample import SampleConfig

METRICS = ("fad", "fd", "isc", "kl", "clap")
# the keys of generating (ckpt=); a gen_dir= evaluation generates nothing, so one given there would be recorded as
# if applied (candidates=4 on clips no one reject-sampled)
GENERATION_KEYS = ("seconds", "gen_batch_size", "gen_seed", "candidates", "sample")


@dataclass
class EvalConfig:
    ckpt: str = ""  # a run directory (siren.load): generate for every reference caption, then evaluate
    gen_dir: str = ""  # folder of generated <id>.wav
    ref: str = ""  # reference manifest, CSV or JSONL with columns id,audio,caption; "demo": the demo test split
    out: str = ""  # results folder; default: <ckpt>/eval, or <gen_dir>_eval beside gen_dir
    name: str = ""  # system name in the printed row; default: the ckpt's or gen_dir's folder name
    # pretrained | demo (trained on the embedded set, siren.demo_assets) | random (seeded smoke-test backbones);
    # anything but pretrained is flagged in every card and table
    weights: str = "pretrained"
    seed: int = 0  # seed of the random backbone weights
    metrics: str = "fad,fd,isc,kl,clap"  # which of fad, fd, isc, kl, clap to compute
    caption_index: int = 0  # which caption of each id (AudioCaps has 5 rows per clip), for the CLAP score
    subset: str = ""  # optional file of reference ids (one per line) to evaluate on
    # Audio protocol; defaults are each metric's reference code (audioldm_eval 0.0.3 for FD/KL/IS,
    # its FAD and frechet_audio_distance 0.3.4 for FAD, laion_clap 1.1.7 for CLAP).
    crop: str = "whole"  # whole | 10s: the whole file (as all three), or its first 10 s
    channel: str = "first"  # first | mean: multi-channel files for FD/KL/IS (audioldm_eval: channel 0)
    resampler: str = "torchaudio"  # torchaudio | resampy | librosa, for FD/KL/IS
    fad_channel: str = "mean"  # both FAD peers average the channels
    fad_resampler: str = "resampy"
    vggish_short: str = "skip"  # skip | pad | error: clips under 0.975 s (no VGGish example); skip = audioldm_eval
    clap_channel: str = "mean"  # laion_clap reads files with librosa.load (mean of channels, soxr_hq)
    clap_resampler: str = "librosa"
    batch_size: int = 8
    cache_dir: str = ""  # embedding cache; default $SIREN_CACHE/embeddings
    cache: bool = True
    is_splits: int = M.IS_SPLITS
    is_seed: int = M.IS_SEED
    kl_eps: float = M.KL_EPS  # audioldm_eval's epsilon inside log(p_gen + eps); 0 = exact KL
    device: str = "cpu"  # cpu | cuda | auto
    # generation (ckpt= only); Table 1 times a batch of 16 clips of 10 s
    seconds: float = 10.0
    gen_batch_size: int = 16
    gen_seed: int = 0
    candidates: int = 1  # > 1: CLAP-score reject sampling, the best of N per caption (paper, after GenAU)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    def __post_init__(self):
        check_numbers(self, positive=("batch_size", "gen_batch_size", "candidates", "is_splits", "seconds"),
                      nonneg=("caption_index", "kl_eps", "seed", "gen_seed", "is_seed"))
        if self.is_seed >= 2**32:
            raise ConfigError(f"is_seed must be < 2**32 (numpy RandomState, as audioldm_eval), got {self.is_seed}")
        check_device(self.device)
        if self.weights not in WEIGHTS_MODES:  # now: backbones() checked it after out= and its lock were made
            raise ConfigError(f"weights must be pretrained, demo or random, got {self.weights!r}")
        if self.gen_dir and not self.ckpt:
            given = [k for k in GENERATION_KEYS if getattr(self, k) != getattr(EvalConfig, k, None)
                     and not (k == "sample" and self.sample == SampleConfig())]
            if given:
                raise ConfigError(f"{', '.join(given)}: key(s) of generating (ckpt=); gen_dir={self.gen_dir} is "
                                  f"evaluated as found: leave them out")
        metrics = metric_list(self)  # an unknown metric is named now (a grid: before any job), not after generating
        if self.candidates > 1 and "clap" not in metrics:  # the CLAP metric's model scores the candidates
            raise ConfigError(f"candidates={self.candidates} (CLAP reject sampling) needs the CLAP model: add clap "
                              f"to metrics={self.metrics}")
        for key, allowed in [("crop", tuple(CROPS)), ("channel", CHANNELS), ("fad_channel", CHANNELS),
                             ("clap_channel", CHANNELS), ("resampler", tuple(RESAMPLERS)),
                             ("fad_resampler", tuple(RESAMPLERS)), ("clap_resampler", tuple(RESAMPLERS)),
                             ("vggish_short", VGGish.SHORT)]:
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")


def max_is_splits(n_clips: int) -> int:
    """The most IS splits of ``n_clips``: 2 clips a split (a split of one clip scores exactly 1 whatever the audio)."""
    return n_clips // 2


def metric_list(cfg: EvalConfig) -> list[str]:
    want = [m.strip().lower() for m in cfg.metrics.split(",") if m.strip()]
    bad = [m for m in want if m not in METRICS]
    if bad or not want:
        raise ConfigError(f"metrics={cfg.metrics!r}: {f'unknown {bad}' if bad else 'no metric'}; choose from "
                          f"{', '.join(METRICS)}")
    return [m for m in METRICS if m in want]
