"""The clips every demo recipe trains on: the grown embedded demo set, original and codec-resynthesised.

A metric network trained on original audio alone recognises codec-resynthesised audio poorly
(issue 11 measured 0.04-0.21), and the audio it scores is resynthesised; so when a demo codec
file is given, each training clip is also encoded and decoded through it and both versions train.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from siren.data.demo import CLASSES, SR, make_demo

log = logging.getLogger(__name__)

# Clips per class (the grown demo set): ISC over 10 splits needs >= 6 test clips per class.
N_TRAIN, N_TEST = 20, 6


@dataclass
class Split:
    wavs: list[np.ndarray]  # float32 [N] at 16 kHz
    captions: list[str]
    labels: np.ndarray  # int64 [n], index into siren.data.demo.CLASSES
    source: list[str] = field(default_factory=list)  # "original" | "resynthesised"

    def subset(self, source: str) -> "Split":
        keep = [i for i, s in enumerate(self.source) if s == source]
        return Split([self.wavs[i] for i in keep], [self.captions[i] for i in keep], self.labels[keep],
                     [source] * len(keep))

    def subset_per_class(self, k: int) -> "Split":
        """The first ``k`` clips of each class and source."""
        count: dict = {}
        keep = []
        for i, key in enumerate(zip(self.labels.tolist(), self.source)):
            count[key] = count.get(key, 0) + 1
            if count[key] <= k:
                keep.append(i)
        return Split([self.wavs[i] for i in keep], [self.captions[i] for i in keep], self.labels[keep],
                     [self.source[i] for i in keep])

    def __len__(self) -> int:
        return len(self.wavs)


def read_split(root: Path, split: str) -> Split:
    names = [c.name for c in CLASSES]
    with open(root / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    wavs = [sf.read(root / r["audio"], dtype="float32")[0] for r in rows]  # PCM-16 round trip, as eval reads it
    return Split(wavs, [r["caption"] for r in rows], np.array([names.index(r["label"]) for r in rows]),
                 ["original"] * len(rows))


def load_codec(path: Path):
    """The DAC of a codec file (siren.codec.load_dac: its recorded kwargs, weights_only=True; a file it cannot read is
    an error naming it), in eval mode."""
    from siren.codec import load_dac

    return load_dac(path)[0].eval().requires_grad_(False)


@torch.no_grad()
def resynthesise(codec, wavs: list[np.ndarray]) -> list[np.ndarray]:
    """encode -> 12-layer codes -> decode, each clip cut back to its own length."""
    out = []
    for w in wavs:
        x = codec.preprocess(torch.from_numpy(w)[None, None], SR)
        z, *_ = codec.encode(x)
        y = codec.decode(z)[0, 0, :len(w)].numpy()
        out.append(np.pad(y, (0, len(w) - len(y))).astype(np.float32))
    return out


def demo_data(work: Path, seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST,
              codec: Path | None = None) -> dict[str, Split]:
    """{"train", "test"} clips of the demo set made under ``work``; with ``codec`` each split also
    holds every clip resynthesised (``source`` tells them apart)."""
    make_demo(work, seed=seed, n_train=n_train, n_test=n_test)
    data = {s: read_split(Path(work), s) for s in ("train", "test")}
    if codec is not None:
        net = load_codec(codec)
        for s, d in data.items():
            n = len(d)
            log.info("resynthesising %d %s clips through %s", n, s, codec.name)
            d.wavs += resynthesise(net, d.wavs)
            d.captions += d.captions
            d.labels = np.concatenate([d.labels, d.labels])
            d.source += ["resynthesised"] * n
    return data
