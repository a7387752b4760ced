"""Inputs of the codec probes (Fig. 1b, Fig. 2a/2c, Figs. 8/9): a prepared directory
(``python -m siren.data.prepare``) holds every clip's RVQ codes, its label and its source file.

``data=demo`` prepares the embedded demo set (15 labelled classes, 1-2 s clips) once, under
``$SIREN_CACHE/analysis/demo-v<demo set version>-<codec weights>-text-<demo CLAP's sha256>``, with the codec
the probe asks for and the demo text encoder, the one the demo runs (a grid's ``outputs/demo/stage1/<id>``)
train with, so the probes that read a run's conditioning (gradient_angles, caption_reliance) take them on
``data=demo`` too.

The codec that made the codes must be the codec the probe builds (its code tables turn codes
into features): ``codec=`` empty takes the weights the directory was prepared with, and a
mismatch of codec ids is an error naming both.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.logs import weights_phrase
from siren import assets
from siren.codec import DEMO_FILE, N_LAYERS, Codec, CodecConfig, weights_arg
from siren.data import PreparedDataset
from siren.data.audio import AudioConfig, load_audio, standardize
from siren.data.cache import index_path
from siren.data.index import read_source
from siren.errors import ConfigError, DataError
from siren.io import sha256_file
from siren.lock import hold
from siren.run_dir import read_run_config

log = logging.getLogger(__name__)

FEATURE_SPACES = ("projected", "codebook")


@dataclass
class Items:
    """Some items of one prepared split, codes cut to their real (unpadded) frames."""
    dataset: PreparedDataset
    index: list[int]  # positions in ``dataset``
    codes: list[torch.Tensor]  # [12, real_frames_i] int64

    @property
    def ids(self) -> list[str]:
        return [self.dataset.items[i]["id"] for i in self.index]

    @property
    def labels(self) -> list[str | None]:
        return [self.dataset.items[i]["label"] for i in self.index]

    def check_sources(self) -> None:
        """Every item's audio file is there: found before a probe decodes, not at the clip (and after the work) that
        reads it."""
        gone = sorted({it["source"] for it in map(self.dataset.items.__getitem__, self.index)
                       if not Path(it["source"]).is_file()})
        if gone:
            raise DataError(f"{self.dataset.dir}: {len(gone)} audio file(s) its items were prepared from are gone "
                            f"(e.g. {gone[0]}); put them back, or prepare {self.dataset.dir} again")

    def waveform(self, n: int) -> torch.Tensor:
        """The audio item ``n`` was encoded from: its source file through the same preprocessing, real samples only."""
        it = self.dataset.items[self.index[n]]
        pol = self.dataset.info["audio"]
        data = read_source(it["source"], it.get("source_sha256"), f"prepare {self.dataset.dir} again")
        items, real, _ = standardize(load_audio(it["source"], data, warn=False),
                                     AudioConfig(pol["policy"], pol["duration_s"]), it["source"], warn=False)
        return items[it["segment"], : real[it["segment"]]]  # "segment": the item's row among the kept chunks


def resolve(data: str, codec: str = "") -> Path:
    """A prepared directory for ``data`` (a path, or ``demo``: prepared here on first use)."""
    if data == "demo":
        weights = codec or "demo"
        if weights in ("random", "pretrained"):
            tag = weights
        else:  # a file's content names the directory: a rebuilt demo codec prepares afresh
            path = DEMO_FILE if weights == "demo" else Path(weights)
            if not path.is_file():
                raise assets.MissingWeightsError(f"codec={weights}: weights file {path} does not exist")
            tag = ("demo-" if weights == "demo" else "") + sha256_file(path)[:16]
        from siren import demo_weights
        from siren.data.demo import VERSION

        text_tag = sha256_file(demo_weights.demo_file("clap"))[:16]  # a rebuilt demo CLAP prepares afresh too
        # and the demo set's generators (VERSION): otherwise a changed set was probed through the old one's codes
        out = assets.cache_dir() / "analysis" / f"demo-v{VERSION}-{tag}-text-{text_tag}"
        if all(index_path(out, s).is_file() for s in ("train", "test")):
            return out
        from siren.data import prepare

        # two probes started together prepared into one folder: one's shard record was deleted under the other
        with hold(out / "prepare.lock", "the demo set's preparation for the probes", "", wait=True):
            if all(index_path(out, s).is_file() for s in ("train", "test")):  # the other probe prepared it
                return out
            log.info("preparing the demo set into %s (once) ...", out)
            try:
                prepare.run(prepare.parse(["manifest=demo", f"out={out}", f"codec.weights={weights}",
                                           "text.weights=demo"]))
            except assets.MissingWeightsError as e:
                raise assets.MissingWeightsError(f"{e} (for the analysis probes: codec=demo, or codec=random for "
                                                 f"mechanics only)") from None
        return out
    path = Path(data).expanduser()
    if not (path / "splits").is_dir():
        raise DataError(f"data={data}: not a prepared directory (no splits/ folder); make one with "
                        f"python -m siren.data.prepare manifest=<manifest.csv> out={data}, or use data=demo")
    return path


def check_run_data(run_dir: str | Path, ds: PreparedDataset, where: Path) -> None:
    """A run probed on a prepared split: its codec and text encoder must be the ones that made the split's codes
    and text states (other text states would condition the model on inputs it never saw, without an error)."""
    saved = read_run_config(run_dir)
    if saved["model"].get("family") == "continuous":
        raise DataError(f"{run_dir}: a continuous-token model; this probe reads discrete-token (RVQ code) runs")
    for key in ("codec", "text"):
        if saved[key]["id"] != ds.info[key]["id"]:
            raise DataError(f"{where}: {key} {ds.info[key]['id']} made this split, but {run_dir} was trained with "
                            f"{key} {saved[key]['id']}; pass data= the prepared directory the run trained on")


def splits(prepared: Path) -> list[str]:
    return sorted(p.stem for p in (prepared / "splits").glob("*.json"))


def open_codec(prepared: Path, splits: list[str], weights: str = "") -> Codec:
    """The codec the splits were prepared with (``weights`` empty: the directory's own weights label)."""
    infos = {s: PreparedDataset(prepared, s, crop_s=None).info["codec"] for s in splits}
    first = next(iter(infos.values()))
    weights = weights or weights_arg(first["weights"])
    codec = build_codec(weights)
    for split, info in infos.items():
        if codec.id != info["id"]:
            raise DataError(f"{index_path(prepared, split)}: codes were made by codec {info['id']} ({info['weights']} "
                            f"weights), but codec={weights} builds {codec.id}; pass the codec "
                            f"weights the directory was prepared with")
    return codec


def codec_words(codec: Codec) -> str:
    """The printed results' words on whose codec made the codes (the figures carry ``weights_note``)."""
    label = codec.weights_label
    return f"codec {codec.id}, {'RANDOM weights' if label == 'random' else label}"


def weights_note(codec: Codec) -> str:
    """The figure note on whose weights made the codes."""
    return weights_phrase("codec", codec.weights_label)


def build_codec(weights: str) -> Codec:
    """The frozen codec of ``weights`` (siren.frontends keeps one per process: probes share it)."""
    from siren import frontends

    return frontends.build_codec(CodecConfig(weights=weights))


def load(prepared: Path, split: str, max_items: int = 0, seed: int = 0, need_labels: bool = False) -> Items:
    """Items of ``split`` (at most ``max_items``, a seeded draw kept in order; 0 = all)."""
    ds = PreparedDataset(prepared, split, crop_s=None)
    index = list(range(len(ds)))
    if 0 < max_items < len(index):
        index = sorted(np.random.default_rng(seed).permutation(len(index))[:max_items].tolist())
    if need_labels:
        missing = [ds.items[i]["id"] for i in index if not ds.items[i]["label"]]
        if missing:
            raise DataError(f"{index_path(prepared, split)}: {len(missing)} item(s) without a label (e.g. "
                            f"{missing[:3]}); this probe needs the manifest's 'label' column")
    codes = [ds.codes(i)[:, : ds.items[i]["real_frames"]] for i in index]
    if any(c.shape[0] != N_LAYERS for c in codes):
        raise DataError(f"{index_path(prepared, split)}: codes are not {N_LAYERS}-layer RVQ codes")
    return Items(ds, index, codes)


def pooled_features(codec: Codec, codes: list[torch.Tensor], space: str = "projected") -> np.ndarray:
    """Appendix D.1: f-hat^j = pool(f-hat^j_1..l), the mean over a clip's frames -> [N, 12, D]."""
    # pooled as each chunk comes: every clip's frames kept until the end were ~49 MB per 10 s clip
    return np.stack(_features(codec, codes, space, lambda f: f.mean(0)))


def frame_features(codec: Codec, codes: list[torch.Tensor], space: str = "projected",
                   keep: np.ndarray | None = None) -> np.ndarray:
    """Section 3's per-time-step variant: every frame of every clip -> [sum T_i, 12, D], or only the frames ``keep``
    (sorted indices into that concatenation), each clip's taken as it comes: every frame of every clip held in
    float64 and then subsampled was ~94 MB per 10 s clip."""
    offsets = np.cumsum([0] + [c.shape[-1] for c in codes])
    keep = np.arange(offsets[-1]) if keep is None else np.asarray(keep)
    if len(keep) and (np.any(np.diff(keep) < 0) or keep[0] < 0 or keep[-1] >= offsets[-1]):
        raise ValueError(f"keep: sorted frame indices in [0, {offsets[-1]}) are needed")
    bounds = np.searchsorted(keep, offsets)
    local = iter([keep[bounds[i]:bounds[i + 1]] - offsets[i] for i in range(len(codes))])
    return np.concatenate(_features(codec, codes, space, lambda f: f[next(local)]))


def check_features(space: str) -> None:
    """A probe's ``features=``: named when its config is read, before the demo set is prepared (45 s)."""
    if space not in FEATURE_SPACES:
        raise ConfigError(f"features must be one of {', '.join(FEATURE_SPACES)}, got '{space}'")


def _features(codec: Codec, codes: list[torch.Tensor], space: str, per_clip: Callable[[np.ndarray], np.ndarray],
              max_frames: int = 2048) -> list[np.ndarray]:
    """``per_clip`` of each clip's [T, 12, D]: ``projected`` = f-hat^j of Eq. 1 (1024-d), ``codebook`` = Z^j[q] (8-d).

    Clips go through ``codec.layer_features`` in zero-padded chunks of <= ``max_frames`` frames
    (features are per frame, so padding never leaks into a clip's own frames)."""
    check_features(space)
    out, start = [], 0
    while start < len(codes):
        T, end = codes[start].shape[-1], start + 1
        while end < len(codes) and (end - start + 1) * max(T, codes[end].shape[-1]) <= max_frames:
            T, end = max(T, codes[end].shape[-1]), end + 1
        chunk = torch.zeros(end - start, N_LAYERS, T, dtype=torch.long)
        for i, c in enumerate(codes[start:end]):
            chunk[i, :, : c.shape[-1]] = c
        vec, proj = codec.layer_features(chunk)
        feats = (proj if space == "projected" else vec).transpose(1, 2).double().cpu().numpy()  # [n, T, 12, D]
        out += [per_clip(feats[i, : c.shape[-1]]) for i, c in enumerate(codes[start:end])]
        start = end
    return out
