"""Training batches from a prepared directory (see siren.data.prepare).

Batches are dicts (the interface every trainer builds on):
    codes       LongTensor [B, 12, T]   RVQ codes, 0 where frame_mask is False
    frame_mask  BoolTensor [B, T]       True = real frame
    text        FloatTensor [B, L, 768] text-encoder token states, padded to the batch's longest
    text_mask   BoolTensor [B, L]       True = real token
    ids, captions  list[str]

Only an item's real frames are trained on: ``audio.policy=pad`` zero-pads short clips to 10 s (the paper's
preprocessing), and the codes of that padding are no target (a crop starts where it covers real frames,
and what it lacks is frame_mask False), as in the authors' code, which encodes each clip at its own length
and masks the batch's padding.

Random crops (appendix B: 6 s segments from the 10 s clips, 50 frames/s) are a pure function of
(seed, epoch, item index), so a resumed run sees exactly the crops it would have seen. With
``crop_min_clap`` > 0 (appendix B: 0.20) a crop starts only on a grid offset whose CLAP similarity to
the caption is above it and that is not silent (siren/data/crops.py; needs ``prepare crop_s=``).
Order: ``siren.data.sampler.EpochBatches`` (each pass over a loader is the next epoch; a resumed
run sets it with ``loader.batch_sampler.set_epoch(epoch, skip=examples_already_seen_this_epoch)``).
"""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from siren.codec import FRAME_RATE
from siren.data.cache import cache_path, index_path, open_entry
from siren.data.sampler import epoch_loader
from siren.errors import DataError
from siren.io import read_json, sha256

log = logging.getLogger(__name__)


def load_index(prepared_dir: str | Path, split: str) -> dict:
    p = index_path(Path(prepared_dir), split)
    if not p.is_file():
        raise DataError(f"{p}: no prepared split '{split}' in {prepared_dir}; run "
                        f"python -m siren.data.prepare manifest=<{split} manifest> out={prepared_dir} split={split}")
    return read_json(p, f"run python -m siren.data.prepare for split '{split}' into {prepared_dir} again: it "
                        f"rewrites the index and reuses every encoding it cached")


class IndexItems(Sequence):
    """A split's items, held as their JSON in one bytes object with offsets and decoded when read (``items[i]`` is
    a new dict): as Python objects, 450k items took 590 MB in each training process, and each loader worker copied
    the pages it touched, as reading an object writes its reference count (``python -m benchmarks.index_memory``)."""

    def __init__(self, items: list[dict]):
        rows = [json.dumps(it, separators=(",", ":")).encode() for it in items]
        self._ends = np.cumsum([len(r) for r in rows], dtype=np.int64)
        self._blob = b"".join(rows)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> dict:
        i = range(len(self))[i]  # negative indexes as a list's; IndexError past the end
        return json.loads(self._blob[int(self._ends[i - 1]) if i else 0:int(self._ends[i])])


class PreparedDataset(Dataset):
    """Items of one prepared split; ``ds[i]`` or ``ds[(epoch, i)]`` (the epoch only moves the crop)."""

    def __init__(self, prepared_dir: str | Path, split: str = "train", crop_s: float | None = 6.0, seed: int = 0,
                 crop_min_clap: float = 0.0):
        self.dir = Path(prepared_dir)
        index = load_index(prepared_dir, split)
        items = index.pop("items")
        self.items = IndexItems(items)
        # what every draw reads, as an array (each item's decode is microseconds, its frames needed by the sampler)
        self._real_frames = np.array([min(it["frames"], it.get("real_frames", it["frames"])) for it in items],
                                     dtype=np.int64)
        self.info = index  # models (ids, weight labels), preprocessing policy, manifest hash, skipped files
        self.crop = None if crop_s is None else max(1, round(crop_s * FRAME_RATE))
        self.seed = seed
        self.crop_min_clap = crop_min_clap
        self.fallbacks = 0  # crops drawn by the fallback (no offset passed the filter), in this process
        if crop_min_clap > 0 and self.crop is not None:
            self._check_crop_filter(items, prepared_dir, split)

    def _check_crop_filter(self, items: list[dict], prepared_dir, split: str) -> None:
        from siren.data.crops import allowed

        bad = [it["id"] for it in items if it.get("crop_filter", {}).get("crop_frames") != self.crop]
        if bad:
            raise DataError(f"{index_path(Path(prepared_dir), split)}: crop_min_clap={self.crop_min_clap} needs CLAP "
                            f"scores of {self.crop}-frame crops, missing for {len(bad)} item(s) (e.g. {bad[0]}); "
                            f"run prepare again with crop_s={self.crop / FRAME_RATE:g}")
        # the offsets crop_start can draw: those ending in real audio, of items longer than the crop (a shorter one is
        # taken whole)
        ok = [allowed(np.array(it["crop_filter"]["clap"]), np.array(it["crop_filter"]["energy_db"]),
                      self.crop_min_clap)[np.array(it["crop_filter"]["offsets"]) <= room]
              for i, it in enumerate(items) if (room := self.real_frames(i) - self.crop) > 0]
        none = sum(not m.any() for m in ok)
        log.log(logging.WARNING if none else logging.INFO,
                "crop filter (CLAP > %g, not silent): %d of %d crop offsets pass; %d of %d items have none and use "
                "their best offset", self.crop_min_clap, sum(int(m.sum()) for m in ok), sum(m.size for m in ok),
                none, len(ok))

    def __len__(self) -> int:
        return len(self.items)

    @functools.cached_property
    def longest(self) -> int:
        """The most frames of audio of any item (``policy=pad``'s zeros left out, as training leaves them)."""
        return int(self._real_frames.max(initial=0))

    @property
    def max_frames(self) -> int:
        """The last position a model trained on this split has a loss at: the crop, or the longest item if shorter
        (a crop longer than every item is padded and masked: its last positions are never trained)."""
        return min(self.crop, self.longest) if self.crop else self.longest

    # what training reads of an item: content-keyed codes and text states, their frames, the crop scores; not
    # where its audio sits or the file's stats (a moved or re-checked source is the same data)
    READ = ("id", "caption", "label", "codes", "segment", "text", "frames", "real_frames", "crop_filter")

    @functools.cached_property
    def digest(self) -> str:
        """16 hex digits of the split's items as training reads them, in order: a resumed run checks them."""
        return sha256(json.dumps([{k: it.get(k) for k in self.READ} for it in self.items], sort_keys=True))[:16]

    @property
    def ids(self) -> list[str]:
        return [it["id"] for it in self.items]

    @property
    def captions(self) -> list[str]:
        return [it["caption"] for it in self.items]

    @property
    def labels(self) -> list[str | None]:
        return [it["label"] for it in self.items]

    def real_frames(self, i: int) -> int:
        """Item i's frames of audio, before ``policy=pad``'s zeros (indexes older than the key: all its frames)."""
        return int(self._real_frames[i])

    def crop_start(self, epoch: int, i: int) -> int:
        """First frame of item i's crop in ``epoch`` (0 when its real frames are not more than the crop)."""
        room = self.real_frames(i) - (self.crop or 0)
        if self.crop is None or room <= 0:
            return 0
        rng = np.random.default_rng([self.seed, epoch, i])
        if self.crop_min_clap <= 0:
            return int(rng.integers(0, room + 1))
        from siren.data.crops import allowed, fallback

        table = self.items[i]["crop_filter"]
        clap, loud, offsets = np.array(table["clap"]), np.array(table["energy_db"]), np.array(table["offsets"])
        inside = offsets <= room  # crops that end in real audio: policy=pad's zeros are masked, not trained on
        ok = np.flatnonzero(allowed(clap, loud, self.crop_min_clap) & inside)
        if ok.size:
            return int(offsets[ok[rng.integers(0, ok.size)]])
        # counted, not warned per item: loader workers are made anew each epoch, so a per-item warning came back
        # every epoch; the items without a passing crop are logged once, when the dataset is built
        self.fallbacks += 1
        return int(offsets[fallback(np.where(inside, clap, -np.inf), loud)])

    def codes(self, i: int) -> torch.Tensor:
        """All codes of item i: LongTensor [12, frames]."""
        it = self.items[i]
        with open_entry(cache_path(self.dir, "codes", it["codes"])) as f:
            return f.get_slice("codes")[it["segment"]].long()

    def text(self, i: int) -> dict[str, torch.Tensor]:
        """states [L, 768] float32, mask [L], pooled [512] of item i's caption."""
        with open_entry(cache_path(self.dir, "text", self.items[i]["text"])) as f:
            t = {k: f.get_tensor(k) for k in ("states", "mask", "pooled")}
        return {"states": t["states"].float(), "mask": t["mask"], "pooled": t["pooled"]}

    FRAMES = ("codes", -1)  # the batch key of an item's frames and their time axis: codes [12, T]

    def frames(self, i: int) -> torch.Tensor:
        return self.codes(i)

    def collate(self, items: list[dict]) -> dict:
        return collate(items, self.crop, *self.FRAMES)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        name, axis = self.FRAMES
        x = self.frames(i).movedim(axis, 0)[:self.real_frames(i)]  # time first
        if self.crop is not None:
            s = self.crop_start(epoch, i)
            x = x[s:s + self.crop]
        t, it = self.text(i), self.items[i]
        return {name: x.movedim(0, axis), "text": t["states"], "text_mask": t["mask"], "id": it["id"],
                "caption": it["caption"]}


def collate(items: list[dict], n_frames: int | None = None, key: str = "codes", axis: int = -1) -> dict:
    """Pad each item's ``key`` along its time ``axis`` to ``n_frames`` (default: the longest; 0 past an item's end,
    frame_mask False) and text to the longest caption, with masks. codes [12, T] -> [B, 12, T]; a continuous
    family's latents [T, k] (``axis=0``) -> [B, T, k]."""
    frames = [it[key].movedim(axis, 0) for it in items]  # time first
    T = n_frames or max(len(f) for f in frames)
    L = max(it["text"].shape[0] for it in items)
    B, D = len(items), items[0]["text"].shape[-1]
    x = torch.zeros(B, T, *frames[0].shape[1:], dtype=frames[0].dtype)
    batch = {"frame_mask": torch.zeros(B, T, dtype=torch.bool),
             "text": torch.zeros(B, L, D), "text_mask": torch.zeros(B, L, dtype=torch.bool),
             "ids": [it["id"] for it in items], "captions": [it["caption"] for it in items]}
    for b, (f, it) in enumerate(zip(frames, items)):
        t, n = min(len(f), T), it["text"].shape[0]
        x[b, :t] = f[:t]
        batch["frame_mask"][b, :t] = True
        batch["text"][b, :n] = it["text"]
        batch["text_mask"][b, :n] = it["text_mask"]
    return {key: x.movedim(1, axis + 1 if axis >= 0 else axis).contiguous(), **batch}


def make_loader(prepared_dir: str | Path, split: str = "train", batch_size: int = 8, crop_s: float | None = 6.0,
                shuffle: bool = True, seed: int = 0, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches of a prepared split, in ``EpochBatches`` order (each pass is the next epoch). With
    ``crop_s`` every batch has T = crop_s * 50 frames (shorter items padded, frame_mask False);
    with ``crop_s=None`` whole items padded to the batch's longest."""
    ds = PreparedDataset(prepared_dir, split, crop_s, seed)
    return epoch_loader(ds, ds.collate, batch_size, seed=seed, shuffle=shuffle, num_workers=num_workers,
                        pin_memory=pin_memory)
