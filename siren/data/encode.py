"""The model calls of ``prepare``: caption -> text states, audio -> RVQ codes, item -> the crop filter's
CLAP table. Each entry is saved as soon as it is computed, under its content key (siren/data/cache.py),
so a killed run keeps what it finished.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from siren.codec import SAMPLE_RATE
from siren.data.audio import AudioConfig, load_audio, n_frames, standardize, unpadded
from siren.data.cache import cache_path
from siren.data.manifest import Row
from siren.errors import DataError
from siren.io import save_tensors, sha256

log = logging.getLogger(__name__)

TEXT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def bar(it, progress: bool, desc: str, total: int | None = None):
    return tqdm(it, desc=desc, total=total, disable=not progress, unit="file", dynamic_ncols=True)


def encode_text(captions: dict[str, str], out: Path, text_encoder, dtype: str, batch: int, progress: bool) -> None:
    """Encode {key: caption} and store each caption's states trimmed after its last real token."""
    keys = list(captions)
    cut = text_encoder.too_long(list(captions.values()))
    if cut:  # the conditioning loses their tails: say so once, not per batch
        log.warning("%d caption(s) are longer than text.max_length=%d tokens and were cut to it (as the authors' "
                    "tokenizer does), e.g. %r", len(cut), text_encoder.cfg.max_length,
                    cut[0] if len(cut[0]) <= 80 else cut[0][:80] + "...")
    bar = tqdm(total=len(keys), desc="text", disable=not progress, unit="caption", dynamic_ncols=True)
    for s in range(0, len(keys), batch):
        chunk = keys[s:s + batch]
        ts = text_encoder.encode([captions[k] for k in chunk])
        for b, k in enumerate(chunk):
            mask = ts.mask[b].cpu().bool()
            n = int(mask.nonzero().max()) + 1 if mask.any() else 0
            if n == 0:
                raise DataError(f"text encoder {text_encoder.id} returned no real token for caption {captions[k]!r}")
            save_tensors(cache_path(out, "text", k),
                         {"states": ts.states[b, :n].to(TEXT_DTYPES[dtype]), "mask": mask[:n],
                          "pooled": ts.pooled[b].float()},
                         {"text_id": text_encoder.id, "caption": captions[k], "dtype": dtype})
        bar.update(len(chunk))
    bar.close()


def encode_codes(todo: dict[str, Row], sha: dict[str, str], out: Path, codec, audio: AudioConfig,
                  batch_size: int, progress: bool) -> float:
    """Encode {key: row} in codec calls of up to ``batch_size`` standardised items of one shape; a long file's
    segments are spread over several calls, so memory is bounded by the batch, not the file. Each file is
    saved as soon as its last item is encoded; returns the seconds of audio encoded."""
    pending: list[tuple[dict, torch.Tensor, int]] = []  # (file, codec input, item's frames) for the next call
    total = 0.0

    def flush():
        codes = codec.encode(torch.stack([x for _, x, _ in pending])).cpu().to(torch.int16)
        for (f, _, frames), c in zip(pending, codes):
            f["codes"].append(torch.nn.functional.pad(c, (0, frames - c.shape[-1])))  # pad frames: 0, masked
            if len(f["codes"]) == len(f["real"]):  # its last item: save the file's entry
                save_tensors(cache_path(out, "codes", f["key"]),
                             {"codes": torch.stack(f["codes"]),
                              "real_frames": torch.tensor([n_frames(r) for r in f["real"]], dtype=torch.int32),
                              "chunks": torch.tensor(f["chunks"], dtype=torch.int32)},
                             {"codec_id": codec.id, "audio_sha256": sha[f["key"]], "audio": json.dumps(audio.key()),
                              "source": str(f["row"].audio), "device": str(getattr(codec, "device", "unknown"))})
        pending.clear()

    for key, row in bar(todo.items(), progress, "codes", len(todo)):
        data = row.audio.read_bytes()
        if sha256(data) != sha[key]:
            raise DataError(f"{row.audio}: file changed while prepare was running; run prepare again")
        # warn=False: the check pass has already warned about this file
        items, real, chunks = standardize(load_audio(row.audio, data, warn=False), audio, row.audio, warn=False)
        f = {"key": key, "row": row, "real": real, "chunks": chunks, "codes": []}
        for item, r in zip(items, real):
            x = unpadded(item, r)
            if pending and (pending[0][1].shape != x.shape or len(pending) >= batch_size):
                flush()
            pending.append((f, x, n_frames(item.shape[-1])))
        total += items.numel() / SAMPLE_RATE
    if pending:
        flush()
    return total


def score_crop_tables(todo: dict[str, tuple[Row, str, str]], out: Path, clap, audio: AudioConfig, crop: int,
                      step: int, progress: bool) -> None:
    """Appendix B crop filter: {crops key: (row, codes key, the audio's sha256 as checked)} -> the CLAP table of each
    item's crops (crops.py), from the bytes whose codes they filter (a file changed meanwhile is an error)."""
    from siren.data.crops import score_crops

    for key, (row, ckey, sha) in bar(todo.items(), progress, "crops", len(todo)):
        data = row.audio.read_bytes()
        if sha256(data) != sha:
            raise DataError(f"{row.audio}: file changed while prepare was running; run prepare again")
        items, _, _ = standardize(load_audio(row.audio, data, warn=False), audio, row.audio, warn=False)
        save_tensors(cache_path(out, "crops", key), score_crops(clap, items, row.caption, crop, step),
                     {"clap_id": clap.id, "codes": ckey, "crop_frames": str(crop), "step_frames": str(step)})
