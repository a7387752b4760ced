"""Continuous tokens for ``family=continuous`` (paper/003) in a prepared directory.

    python -m siren.data.latents data=PREP dim=8                      # codec.weights=demo on a demo PREP

After ``siren.data.prepare``: each codes entry's audio is read again with the same preprocessing
(the index's ``audio`` policy: same crop/pad, same items) and run through the DAC encoder up to
the RVQ (``dac_latent``); a whitened PCA of ``dim`` axes is fitted once on the train split's real
frames and stored under its content id; each entry's tokens [S, T, dim] are cached by (codes key,
projection id). Layout, beside siren/data/cache.py's:

    latents/ab/<codes key>.safetensors           z float32 [S, 1024, T] (the codes entry's items)
    latents/projection-<id>.safetensors          the LatentProjection (mean, basis, scale)
    latents/pca<dim>.json                        {"id": ..., "explained": ...}: the fit for this width
    tokens/cd/<key>.safetensors                  tokens float32 [S, T, dim]; key = sha256(codes key, projection id)
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from siren.codec import CodecConfig
from siren.data.audio import AudioConfig, load_audio, n_frames, standardize, unpadded
from siren.data.cache import FORMAT, cache_path, cached, index_path
from siren.data.dataset import PreparedDataset, collate, load_index
from siren.data.index import read_source
from siren.errors import CheckpointError, ConfigError, DataError
from siren.io import read_json, save_tensors, sha256, write_json
from siren.lock import hold
from siren.model.continuous.latent import LatentProjection, dac_latent
from siren.runtime import check_device

log = logging.getLogger(__name__)


def tokens_key(codes_key: str, projection_id: str) -> str:
    return sha256(json.dumps({"codes": codes_key, "projection": projection_id, "format": FORMAT}, sort_keys=True))


def projection_path(out: str | Path, dim: int) -> Path:
    return Path(out) / "latents" / f"pca{dim}.json"


def _read_pointer(out: str | Path, dim: int) -> dict:
    """The fit's record for width ``dim`` ({} when none); its id names a file beside it, so it is checked."""
    pointer = projection_path(out, dim)
    if not pointer.is_file():
        return {}
    fix = f"delete it and run python -m siren.data.latents data={out} dim={dim}"
    record = read_json(pointer, fix)
    if not (isinstance(record, dict) and re.fullmatch(rf"pca{dim}-[0-9a-f]{{16}}", str(record.get("id")))):
        raise DataError(f"{pointer}: not a projection record of width {dim} (its id must read pca{dim}-<16 hex "
                        f"digits>); {fix}")
    return record


def _entries(out: Path, split: str) -> dict[str, dict]:
    """codes key -> its items' source, real frames per segment, of one split."""
    entries: dict[str, dict] = {}
    for it in load_index(out, split)["items"]:
        e = entries.setdefault(it["codes"], {"source": it["source"], "real": {}})
        e["real"][it["segment"]] = it["real_frames"]
    return entries


def _train_digest(train: dict[str, dict]) -> str:
    """What the projection is fitted on: the train split's ``_entries`` (content-keyed codes, their real frames)."""
    return sha256(json.dumps(train, sort_keys=True))[:16]


def _read(path: Path, name: str, fix: str) -> torch.Tensor:
    """Tensor ``name`` of a cache file; a missing or damaged one is a DataError naming it and the fix."""
    try:
        return load_file(path)[name]
    except (SafetensorError, OSError, KeyError) as e:
        raise DataError(f"{path}: a damaged or missing cache file ({e!r:.80}); {fix}") from None


def _again(out: Path, dim: int | str) -> str:
    return f"run python -m siren.data.latents data={out} dim={dim} again: it encodes damaged files again"


def _latent(out: Path, key: str, dim: int) -> torch.Tensor:
    """z [S, 1024, T] of one codes entry, from the cache (``_cache_latent``)."""
    return _read(cache_path(out, "latents", key), "z", _again(out, dim))


def _cache_latent(out: Path, key: str, entry: dict, codec, audio: AudioConfig) -> None:
    """Encode one codes entry's z [S, 1024, T] into the cache unless it is there (same items as its codes)."""
    path = cache_path(out, "latents", key)
    if cached(path):  # a file cut short is removed (with a warning) and encoded again
        return
    codes_file = cache_path(out, "codes", key)
    with safe_open(codes_file, "pt") as f:  # the file as prepare read it, not as it is now; and its length
        made_from, frames = f.metadata().get("audio_sha256"), f.get_slice("codes").get_shape()[-1]
    data = read_source(entry["source"], made_from, f"run prepare again, then the latents ({codes_file})")
    items, real, _ = standardize(load_audio(entry["source"], data, warn=False), audio, entry["source"], warn=False)
    full = n_frames(items.shape[-1])  # as its codes: encoded without policy=pad's zeros, the pad frames 0 (masked)
    z = torch.cat([torch.nn.functional.pad(dac_latent(codec, unpadded(x, r)).cpu(), (0, full - n_frames(r)))
                   for x, r in zip(items, real)])
    if z.shape[0] != items.shape[0] or z.shape[-1] != frames:
        raise DataError(f"{entry['source']}: latent {tuple(z.shape)} does not match its codes ({frames} frames); "
                        f"the audio changed since prepare: run prepare again")
    save_tensors(path, {"z": z}, {"codec_id": codec.id, "codes": key})


def prepare_latents(out: str | Path, codec, dim: int, progress: bool = False) -> LatentProjection:
    """Cache the latents of every split, fit (or reuse) the ``dim``-axis projection, cache the tokens."""
    if not index_path(out, "train").is_file():  # before the lock, which would make a folder of a mistyped data=
        raise DataError(f"{out}: no prepared train split to fit the latent projection on ({index_path(out, 'train')} "
                        f"missing); run siren.data.prepare first")
    # two fits of one width at once could each write their own record (a fit on two threads need not equal one on
    # one): tokens of the one, the pointer of the other
    with hold(projection_path(out, dim).with_suffix(".lock"), f"the latent projection of width {dim}",
              "wait for it to finish"):
        return _prepare_latents(Path(out), codec, dim, progress)


def _prepare_latents(out: Path, codec, dim: int, progress: bool) -> LatentProjection:
    from tqdm import tqdm

    splits = [s for s in ("train", "test") if index_path(out, s).is_file()]
    info = load_index(out, "train")
    if info["codec"]["id"] != codec.id:
        raise ConfigError(f"{out} was prepared with codec {info['codec']['id']}, this config builds {codec.id}")
    entries = {s: _entries(out, s) for s in splits}
    # cached first, then read back one file at a time: a paper-scale split's latents (about 2 MB per 10 s
    # clip) do not fit in memory together
    for s in splits:  # each split read as it was prepared (prepare takes an audio policy per split)
        policy = load_index(out, s)["audio"]
        audio = AudioConfig(policy=policy["policy"], duration_s=policy["duration_s"])
        for key, e in tqdm(entries[s].items(), desc=f"latents {s}", disable=not progress, unit="file"):
            _cache_latent(out, key, e, codec, audio)
    pointer = projection_path(out, dim)
    record = _read_pointer(out, dim)
    fitted_on = _train_digest(entries["train"])
    file = out / "latents" / f"projection-{record.get('id')}.safetensors"
    if record.get("codec") == codec.id and record.get("train") == fitted_on and cached(file):
        proj = load_projection(out, dim, codec.id)
    else:  # fitted once per prepared train split and codec (prepared again, from another manifest or with another
        # codec: fitted anew), on the real (unpadded) frames of the train split; also when the record's projection
        # file is missing or damaged (on one machine and thread count the same projection and id again; otherwise
        # another id, whose tokens are made below)
        frames = (z[s, :, :n] for k, e in entries["train"].items() for z in [_latent(out, k, dim)]
                  for s, n in e["real"].items())
        proj = LatentProjection.fit(frames, dim)
        digest = sha256(b"".join(t.contiguous().numpy().tobytes() for t in (proj.mean, proj.basis, proj.scale)))
        proj.id = f"pca{dim}-{digest[:16]}"
        proj.save(out / "latents" / f"projection-{proj.id}.safetensors", codec.id)
        write_json(pointer, {"id": proj.id, "dim": dim, "codec": codec.id, "explained": proj.explained,
                             "train": fitted_on})
        log.info("latent projection %s: %d axes keep %.1f%% of the train latents' variance", proj.id, dim,
                 100 * proj.explained)
    for key in {k: None for s in splits for k in entries[s]}:
        path = cache_path(out, "tokens", tokens_key(key, proj.id))
        if not cached(path):
            save_tensors(path, {"tokens": proj.encode(_latent(out, key, dim))}, {"projection": proj.id, "codes": key})
    return proj


def load_projection(out: str | Path, dim: int, codec_id: str) -> LatentProjection:
    """The ``dim``-axis projection fitted on ``out``'s latents of codec ``codec_id`` (the one it is prepared with)."""
    pointer = projection_path(out, dim)
    fix = f"run python -m siren.data.latents data={out} dim={dim}"
    record = _read_pointer(out, dim)
    if not record:
        raise DataError(f"{out}: no latents of width {dim} ({pointer} missing); {fix}")
    if record.get("codec") != codec_id:
        raise DataError(f"{pointer}: the projection was fitted on codec {record.get('codec')}'s latents, but {out} is "
                        f"now prepared with {codec_id}; {fix}")
    digest = _train_digest(_entries(Path(out), "train"))
    if record.get("train", digest) != digest:  # a record before 2026-12-06 has none: taken to match
        raise DataError(f"{pointer}: the projection was fitted on another train split than {out}'s (prepared again "
                        f"since); {fix}")
    pid = record["id"]
    file = Path(out) / "latents" / f"projection-{pid}.safetensors"
    try:
        proj = LatentProjection.load(file)
    except (CheckpointError, SafetensorError, OSError) as e:
        raise DataError(f"{pointer}: its projection file {file.name} is missing or damaged ({str(e)[:80]}); {fix} "
                        f"(it fits it again)") from None
    proj.id = pid
    return proj


class LatentDataset(PreparedDataset):
    """A prepared split's items as continuous tokens [T, k] (the same crops as its codes would get)."""

    FRAMES = ("latents", 0)  # tokens [T, k]

    def __init__(self, prepared_dir, split: str, crop_s: float | None, seed: int, projection_id: str,
                 crop_min_clap: float = 0.0):
        super().__init__(prepared_dir, split, crop_s, seed, crop_min_clap)
        self.projection_id = projection_id

    def _path(self, it: dict) -> Path:
        return cache_path(self.dir, "tokens", tokens_key(it["codes"], self.projection_id))

    def _fix(self) -> str:
        return _again(self.dir, self.projection_id.split("-")[0].removeprefix("pca"))

    def check_tokens(self, split: str) -> None:
        """Every item's tokens are there: said before training, not at the batch (or the final validation, before
        the last checkpoint) that first reads a missing file, losing the steps since the last checkpoint."""
        missing = [it["id"] for it in {it["codes"]: it for it in self.items}.values() if not self._path(it).is_file()]
        if missing:
            raise DataError(f"{self.dir}: {len(missing)} file(s) of its {split} split have no tokens of projection "
                            f"{self.projection_id} (items {missing[:3]}); {self._fix()}")

    def tokens(self, i: int) -> torch.Tensor:
        it = self.items[i]
        return _read(self._path(it), "tokens", self._fix())[it["segment"]]

    def frames(self, i: int) -> torch.Tensor:
        return self.tokens(i)


def collate_latents(items: list[dict], n_frames: int | None = None) -> dict:
    """latents [B, T, k] (0 past each item's end) + frame_mask [B, T], text and text_mask padded to the longest."""
    return collate(items, n_frames, *LatentDataset.FRAMES)


@dataclass
class LatentsConfig:
    data: str = ""  # a prepared directory (siren.data.prepare)
    dim: int = 64  # axes kept by the PCA (1024 = the full latent, rotated and whitened)
    codec: CodecConfig = field(default_factory=CodecConfig)  # the codec the directory was prepared with
    # the encoder's: auto = cuda when available, else cpu. A GPU's latents differ from the CPU's in rounding (cuDNN
    # convolutions in TF32), as prepare's codes may: one directory is best made on one kind of device
    device: str = "auto"

    def __post_init__(self):
        if not 1 <= self.dim <= 1024:
            raise ConfigError(f"dim must be in [1, 1024], got {self.dim}")
        check_device(self.device)


def main(argv: list[str] | None = None) -> int:
    from siren import cli
    from siren.config import load_config
    from siren.frontends import build_codec, check_keys
    from siren.runtime import resolve_device

    cfg = load_config(LatentsConfig, cli.start(argv))
    if not cfg.data:
        raise ConfigError("data= (a prepared directory) is required")
    if not index_path(cfg.data, "train").is_file():  # said before the codec's build
        raise DataError(f"data={cfg.data}: no prepared train split ({index_path(cfg.data, 'train')} missing); run "
                        f"siren.data.prepare first")
    # other codec keys than the directory's: named before a build
    check_keys({"codec": load_index(cfg.data, "train").get("frontends", {}).get("codec")}, {"codec": cfg.codec},
               f"{cfg.data} was prepared")
    proj = prepare_latents(cfg.data, build_codec(cfg.codec, resolve_device(cfg.device)), cfg.dim, progress=True)
    print(json.dumps({"projection": proj.id, "dim": proj.dim}))
    return 0


if __name__ == "__main__":
    from siren.cli import run

    run(main, LatentsConfig, __doc__)
