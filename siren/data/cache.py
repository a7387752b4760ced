"""Layout and keys of a prepared directory: content-addressed, so a changed file or model never hits a stale entry.

    codes/ab/<key>.safetensors   codes int16 [S, 12, T], real_frames int32 [S], chunks int32 [S] (S items of one file)
                                 key = sha256(audio file bytes, preprocessing policy incl. resampler, codec id)
    text/cd/<key>.safetensors    states [L, 768] float16|32, mask bool [L], pooled float32 [512]
                                 key = sha256(caption, text-encoder id, storage dtype)
    splits/<split>.shards/shard-<i>-of-<n>.json   what shard i encoded
    splits/<split>.json          the index: item ids -> cache keys, plus the models and policy used
"""
from __future__ import annotations

import json
from pathlib import Path

from siren.io import sha256

FORMAT = 1  # layout of the cached files; part of every key, so a new layout never reads an old file


def codes_key(audio_sha256: str, policy: dict, codec_id: str) -> str:
    return sha256(json.dumps({"audio": audio_sha256, "policy": policy, "codec": codec_id, "format": FORMAT}, sort_keys=True))


def text_key(caption: str, text_id: str, dtype: str) -> str:
    return sha256(json.dumps({"caption": caption, "text": text_id, "dtype": dtype, "format": FORMAT}, sort_keys=True))


def cache_path(out: str | Path, kind: str, key: str) -> Path:
    """kind: "codes" or "text"."""
    return Path(out) / kind / key[:2] / f"{key}.safetensors"


def index_path(out: str | Path, split: str) -> Path:
    return Path(out) / "splits" / f"{split}.json"


def shard_path(out: str | Path, split: str, shard: int, num_shards: int) -> Path:
    return Path(out) / "splits" / f"{split}.shards" / f"shard-{shard}-of-{num_shards}.json"
