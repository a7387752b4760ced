"""Layout and keys of a prepared directory: content-addressed, so a changed file or model never hits a stale entry.

    codes/ab/<key>.safetensors   codes int16 [S, 12, T], real_frames int32 [S], chunks int32 [S] (S items of one file)
                                 key = sha256(audio file bytes, preprocessing policy incl. resampler, codec id)
    text/cd/<key>.safetensors    states [L, 768] float16|32, mask bool [L], pooled float32 [512]
                                 key = sha256(caption, text-encoder id, storage dtype)
    crops/ef/<key>.safetensors   clap float32 [S, O], energy_db float32 [S, O], offsets int32 [O]: CLAP similarity
                                 and loudness of each crop on the grid (siren/data/crops.py)
                                 key = sha256(codes key, caption, CLAP id, crop and grid length in frames)
    clap_audio/../<key>          (siren.data.filter) CLAP audio embedding [512] + activity SNR of one clip
                                 key = sha256(audio file bytes, preprocessing policy, CLAP id, SNR estimator)
    clap_text/../<key>           (siren.data.filter) CLAP text embedding [512]; key = sha256(caption, CLAP id)
    splits/<split>.shards/shard-<i>-of-<n>.json   what shard i encoded
    splits/<split>.shards/sources-<i>-of-<n>.jsonl   the sha256 shard i read of each audio file, at the file's version
                                 (size, mtime, ctime): a later prepare reads a file again only if it changed
                                 (``HashLedger``; the filter keeps its own beside its shards)
    splits/<split>.json          the index: item ids -> cache keys, plus the models and policy used
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from siren.errors import DataError
from siren.io import open_append, sha256, version

log = logging.getLogger(__name__)

FORMAT = 1  # layout of the cached files; part of every key, so a new layout never reads an old file


def codes_key(audio_sha256: str, policy: dict, codec_id: str) -> str:
    if policy.get("policy") == "pad":  # since 2026-12-06 encoded without the pad's zeros (audio.unpadded)
        policy = {**policy, "codec_input": "unpadded"}
    return sha256(json.dumps({"audio": audio_sha256, "policy": policy, "codec": codec_id, "format": FORMAT},
                             sort_keys=True))


def text_key(caption: str, text_id: str, dtype: str) -> str:
    return sha256(json.dumps({"caption": caption, "text": text_id, "dtype": dtype, "format": FORMAT}, sort_keys=True))


def crops_key(codes: str, caption: str, clap_id: str, crop_frames: int, step_frames: int) -> str:
    return sha256(json.dumps({"codes": codes, "caption": caption, "clap": clap_id, "crop": crop_frames,
                              "step": step_frames, "format": FORMAT}, sort_keys=True))


def clap_audio_key(audio_sha256: str, policy: dict, clap_id: str, estimator: str) -> str:
    return sha256(json.dumps({"audio": audio_sha256, "policy": policy, "clap": clap_id, "snr": estimator,
                              "format": FORMAT}, sort_keys=True))


def clap_text_key(caption: str, clap_id: str) -> str:
    return sha256(json.dumps({"caption": caption, "clap": clap_id, "format": FORMAT}, sort_keys=True))


def cache_path(out: str | Path, kind: str, key: str) -> Path:
    """kind: "codes", "text", "crops", "clap_audio" or "clap_text"."""
    return Path(out) / kind / key[:2] / f"{key}.safetensors"


def index_path(out: str | Path, split: str) -> Path:
    return Path(out) / "splits" / f"{split}.json"


def shard_path(out: str | Path, split: str, shard: int, num_shards: int) -> Path:
    return Path(out) / "splits" / f"{split}.shards" / f"shard-{shard}-of-{num_shards}.json"


class HashLedger:
    """sha256 of source audio files by path and version (size, mtime, ctime: ``siren.io.version``), kept in
    ``sources-<shard>-of-<n>.jsonl`` beside a step's shard records: a later run (any sharding, finished or killed)
    does not read a file again unless it changed or is to be encoded. At 436k files, reading and hashing every
    source again took each prepare 0.2-2 h. Only ``paths``' lines are kept in memory; a line cut short by a kill is
    skipped; this shard's lines are appended line by line, so a kill keeps each one."""

    def __init__(self, folder: Path, shard: int, num_shards: int, paths: set[str]):
        self.known: dict[tuple[str, tuple[int, ...]], str] = {}
        for path in sorted(folder.glob("sources-*.jsonl")):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        e = json.loads(line)
                        if e["source"] in paths:
                            self.known[e["source"], tuple(e["version"])] = e["sha256"]
                    except (ValueError, KeyError, TypeError):
                        continue
        folder.mkdir(parents=True, exist_ok=True)
        own = folder / f"sources-{shard}-of-{num_shards}.jsonl"
        with open_append(own, "ab+") as f:  # a link planted in a shared output folder is refused, not followed
            if f.seek(0, os.SEEK_END):
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line a kill cut short: the next one starts on a line of its own
                    f.write(b"\n")
        self.file = open_append(own, encoding="utf-8", buffering=1)

    def get(self, path: str | Path, st: os.stat_result) -> str | None:
        """The sha256 recorded for the file at ``path`` as ``st`` says it is now, if any."""
        return self.known.get((str(path), tuple(version(st))))

    def lookup(self, path: str | Path, needed: Callable[[str], bool]) -> tuple[str, os.stat_result, bytes | None]:
        """(the file's sha256, the version it is of, its bytes where they were read): a file recorded at its current
        version is read only if ``needed(sha256)`` (its cached result is missing). Record the answer with ``put``:
        an error writing the ledger is then not taken for one reading the audio."""
        st = os.stat(path)
        h = self.get(path, st)
        if h is not None and not needed(h):
            return h, st, None
        with open(path, "rb") as fh:
            st, data = os.fstat(fh.fileno()), fh.read()  # the version before the read
        return sha256(data), st, data

    def put(self, path: str | Path, st: os.stat_result, sha256: str) -> None:
        """Record the hash of the bytes read after ``st`` was taken (the version before the read: a write during or
        after it moves the file past it)."""
        if self.get(path, st) != sha256:
            self.file.write(json.dumps({"source": str(path), "version": version(st), "sha256": sha256}) + "\n")
            self.known[str(path), tuple(version(st))] = sha256

    def __enter__(self) -> HashLedger:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def filter_shard_path(out: str | Path, shard: int, num_shards: int) -> Path:
    """What shard ``shard`` of the data engine's filter scored (siren.data.filter), for its select step."""
    return Path(out) / "shards" / f"shard-{shard}-of-{num_shards}.json"


def cached(path: Path) -> bool:
    """Whether a cache entry is there and whole (safetensors checks that its header covers the file): one cut short
    (a node lost after the rename, a half-copied cache) is removed with a warning, to be encoded again; as a
    mere existence check, it was trusted, and the next read failed without naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(path, "pt"):
            return True
    except (SafetensorError, OSError) as e:
        log.warning("%s: a damaged cache entry (%s); encoding it again", path, e)
        path.unlink(missing_ok=True)
        return False


def open_entry(path: Path):
    """``safe_open`` of a prepared entry; a damaged one is a DataError naming it and the fix."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path}: a damaged or missing prepared file ({e}); run prepare again with the same "
                        f"arguments: it encodes damaged entries again") from None

