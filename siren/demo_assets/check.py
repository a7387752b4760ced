"""Do the committed demo backbones carry signal? Measured through the evaluation's own loaders.

    python -m siren.demo_assets.check [per_half=10]

- FD (PANNs) and FAD (VGGish) between two disjoint halves of the demo training clips (the same
  classes: should be small) against FD/FAD between a half and as many noise clips (should be large);
- the Inception Score of the test split (at most its number of classes, 15; >= 3 needs a backbone
  that tells the classes apart and 10 splits of >= 6 clips);
- CLAP: cosine of each test clip with its own caption vs with the captions of other classes.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.audio import make_clip
from eval.metrics import FewSamplesWarning, clap_score, frechet_distance_from_embeddings, inception_score
from siren import demo_weights
from siren.codec import DEMO_FILE
from siren.config import check_numbers, load_config
from siren.demo_assets.data import N_TEST, N_TRAIN, Split, demo_data
from siren.errors import ConfigError

log = logging.getLogger(__name__)


def _embed(bb, wavs: list[np.ndarray], key: str, batch: int = 16) -> list[np.ndarray]:
    """Backbone output ``key`` per clip, in order; batches are runs of equal ``batch_key``."""
    out, run = [], []
    for i, w in enumerate(wavs):
        x = bb.prepare(make_clip(str(i), w, 16000))
        if run and (len(run) == batch or bb.batch_key(x) != bb.batch_key(run[0])):
            out += [o[key] for o in bb.embed_batch(run)]
            run = []
        run.append(x)
    return out + [o[key] for o in bb.embed_batch(run)]


def noise(n: int, seed: int) -> list[np.ndarray]:
    """White noise clips, 1-2 s, peak level 0.3-0.9 (the demo clips' range)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal(int(rng.uniform(1, 2) * 16000))
        out.append((x / np.abs(x).max() * rng.uniform(0.3, 0.9)).astype(np.float32))
    return out


def measure(data: dict[str, Split], per_half: int = 10, seed: int = 0, only: str = "fd,fad,clap") -> dict:
    from eval.backbones import ClapAudio, PannsCnn14, VGGish

    train, test = data["train"].subset("original"), data["test"]
    k = np.array([np.sum(train.labels[:i] == train.labels[i]) for i in range(len(train))])  # index within class
    halves = [[w for w, j in zip(train.wavs, k) if lo <= j < lo + per_half] for lo in (0, per_half)]
    noisy = noise(len(halves[0]), seed)
    out: dict = {"label": demo_weights.LABEL, "clips_per_set": len(halves[0])}
    for name, cls, key, pool in (("fd", PannsCnn14, "embedding", False), ("fad", VGGish, "frames", True)):
        if name not in only.split(","):
            continue
        t, bb = time.perf_counter(), cls("demo")
        emb = [_embed(bb, s, key) for s in (*halves, noisy)]
        emb = [np.concatenate(e) if pool else np.stack(e) for e in emb]  # FAD pools the frames of a set
        with warnings.catch_warnings():  # said once below, in one line, not as four warning blocks
            warnings.simplefilter("ignore", FewSamplesWarning)
            out[name] = {"real_vs_real": frechet_distance_from_embeddings(emb[0], emb[1]),
                         "real_vs_noise": frechet_distance_from_embeddings(emb[0], emb[2]), "seconds": 0.0}
        if len(emb[0]) < emb[0].shape[1]:
            log.info("%s from %d samples of %d-d embeddings a set: biased by the number of samples; compare only "
                     "with this check's own numbers", name.upper(), len(emb[0]), emb[0].shape[1])
        if name == "fd":
            for src in sorted(set(test.source)):
                logits = np.stack(_embed(bb, test.subset(src).wavs, "logits"))
                out[f"isc_test_{src}"] = inception_score(logits)
        out[name]["seconds"] = round(time.perf_counter() - t, 1)
    clap = ClapAudio("demo") if "clap" in only.split(",") else None
    for src in sorted(set(test.source)) if clap else []:
        d = test.subset(src)
        audio, text = np.stack(_embed(clap, d.wavs, "audio")), clap.embed_text(d.captions)
        other = d.labels[:, None] != d.labels[None]
        unit = [e / np.linalg.norm(e, axis=1, keepdims=True) for e in (audio, text)]
        out[f"clap_test_{src}"] = {"clap_score_matched": clap_score(text, audio),
                                   "clap_score_other_class": 100 * float((unit[0] @ unit[1].T)[other].mean())}
    return out


@dataclass
class CheckConfig:
    per_half: int = 10  # training clips per class in each of the two real sets
    only: str = "fd,fad,clap"  # which of the measurements to make
    seed: int = 0
    codec: str = "auto"  # also measure resynthesised test clips: a DAC file, auto (the demo codec if built) or none

    def __post_init__(self):
        check_numbers(self, positive=("per_half",), nonneg=("seed",))
        if self.per_half > N_TRAIN // 2:  # two sets of per_half clips per class from N_TRAIN
            raise ConfigError(f"per_half={self.per_half}: at most {N_TRAIN // 2} "
                              f"(two sets from {N_TRAIN} clips per class)")
        bad = set(self.only.split(",")) - {"fd", "fad", "clap"}
        if bad:
            raise ConfigError(f"only={self.only}: unknown {sorted(bad)}; give some of fd,fad,clap")
        if self.codec not in ("auto", "none") and not Path(self.codec).is_file():  # found after the demo set was made
            raise ConfigError(f"codec={self.codec}: no such file (give a DAC file, auto or none)")


def main(argv: list[str] | None = None) -> int:
    from siren import cli

    cfg = load_config(CheckConfig, cli.start(argv))
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as work:
        codec = DEMO_FILE if cfg.codec == "auto" and DEMO_FILE.is_file() else (
            None if cfg.codec in ("auto", "none") else Path(cfg.codec))
        data = demo_data(Path(work), cfg.seed, N_TRAIN, N_TEST, codec)
        print(json.dumps(measure(data, cfg.per_half, cfg.seed, cfg.only), indent=2))
    return 0


if __name__ == "__main__":
    from siren import cli

    cli.run(main, CheckConfig, __doc__)
