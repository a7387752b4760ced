"""Embedding cache: one safetensors file per (clip content, backbone + weights, protocol).

The key hashes the clip's samples (``Clip.content_hash``), the backbone id and weight sha256,
and the backbone's full protocol dict, so a changed file, weight file, seed or protocol parameter
never reuses a stale entry, and re-evaluating a set only reads files. Entries are written
atomically (``siren.io.save_tensors``) right after each batch, so an interrupted evaluation keeps
what it computed. A corrupt entry is recomputed and overwritten. Nothing is ever unpickled.

Default location: ``$SIREN_CACHE/embeddings`` (``cache_dir=`` overrides it).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.audio import BadAudioError, Clip
from eval.backbones import Backbone, ClapAudio
from siren import assets
from siren.errors import ConfigError
from siren.io import save_tensors

KEY_VERSION = 1


def default_dir() -> Path:
    return assets.cache_dir() / "embeddings"


@dataclass
class CacheStats:
    hits: int = 0
    computed: int = 0


class EmbeddingCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_dir()
        there = next(p for p in (self.root, *self.root.parents) if p.exists())  # checked before anything is computed
        if not there.is_dir():
            raise ConfigError(f"embedding cache {self.root}: {there} is a file, not a folder; pass cache_dir=FOLDER "
                              f"(or cache=false)")

    @staticmethod
    def key(content_hash: str, backbone_id: str, weights_sha256: str, protocol: dict) -> str:
        blob = json.dumps({"v": KEY_VERSION, "content": content_hash, "backbone": backbone_id,
                           "weights_sha256": weights_sha256, "protocol": protocol}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, backbone_id: str, key: str) -> Path:
        return self.root / backbone_id / key[:2] / f"{key}.safetensors"

    def get(self, backbone_id: str, key: str, outputs: tuple[str, ...]) -> dict[str, np.ndarray] | None:
        p = self.path(backbone_id, key)
        if not p.is_file():
            return None
        from safetensors.numpy import load_file

        try:
            entry = load_file(str(p))
        except Exception as e:  # noqa: BLE001 - any unreadable entry is a miss
            warnings.warn(f"embedding cache entry {p} is unreadable ({e}); recomputing it")
            return None
        if set(entry) != set(outputs):
            warnings.warn(f"embedding cache entry {p} holds {sorted(entry)}, "
                          f"expected {sorted(outputs)}; recomputing it")
            return None
        return entry

    def put(self, backbone_id: str, key: str, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> None:
        save_tensors(self.path(backbone_id, key),
                     {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, metadata=meta)


def embed_clips(backbone: Backbone, clips: list[Clip], cache: EmbeddingCache | None = None, batch_size: int = 8,
                desc: str = "") -> tuple[list[dict[str, np.ndarray]], CacheStats]:
    """Per clip {output: array} from ``backbone``, reading what the cache has and computing (and storing) the rest.

    Misses are batched among clips whose prepared inputs have the same ``Backbone.batch_key`` (their shape, so no clip
    is padded to another's length), in the order they come; a batch runs when it is full, the partial ones at the
    end. Clips with identical content are computed once.
    """
    stats = CacheStats()
    protocol = backbone.protocol()
    keys = [EmbeddingCache.key(c.content_hash, backbone.id, backbone.weights_sha256, protocol) for c in clips]
    results: list[dict[str, np.ndarray] | None] = [None] * len(clips)
    todo: dict[str, list[int]] = defaultdict(list)  # key -> clip indices
    for i, k in enumerate(keys):
        hit = cache.get(backbone.id, k, backbone.outputs) if cache else None
        if hit is None:
            todo[k].append(i)
        else:
            results[i] = hit
            stats.hits += 1
    pending: dict[Hashable, list[tuple[str, torch.Tensor]]] = defaultdict(list)  # batch key -> inputs not yet run
    with tqdm(total=len(todo), desc=desc or backbone.name, unit="clip", disable=not todo) as bar:
        def run(batch_key: Hashable) -> None:
            chunk = pending.pop(batch_key)
            for (k, _), out in zip(chunk, backbone.embed_batch([x for _, x in chunk])):
                if not all(np.isfinite(v).all() for v in out.values()):  # not cached, not averaged into a metric
                    c = clips[todo[k][0]]
                    raise BadAudioError(f"{c.path or c.id}: {backbone.name} gave NaN/inf for this clip (clips computed "
                                        f"before it are cached); check its samples (a float file far outside "
                                        f"[-1, 1]?), then evaluate again")
                for i in todo[k]:
                    results[i] = out
                if cache:
                    c = clips[todo[k][0]]
                    cache.put(backbone.id, k, out, {"clip_id": c.id, "content_sha256": c.content_hash,
                                                    "backbone": backbone.id})
                stats.computed += 1
            bar.update(len(chunk))

        # each batch runs as soon as it is full, so at most one batch of prepared inputs per key is held, not the
        # whole set's (PANNs' were 640 kB per 10 s clip, CLAP's at 48 kHz 1.9 MB); the batches are the same
        for k, idx in todo.items():
            x = backbone.prepare(clips[idx[0]])
            pending[bk := backbone.batch_key(x)].append((k, x))
            if len(pending[bk]) == batch_size:
                run(bk)
        for batch_key in list(pending):
            run(batch_key)
    return results, stats  # type: ignore[return-value]


def embed_texts(clap: ClapAudio, captions: list[str], cache: EmbeddingCache | None = None,
                batch_size: int = 32) -> tuple[np.ndarray, CacheStats]:
    """CLAP text embeddings [N, 512] of ``captions``, cached like audio (keyed by the caption's sha256)."""
    stats = CacheStats()
    # the audio key's protocol without the audio settings: texts computed under another transformers or on a GPU
    # are not reused
    bid, protocol = f"{clap.id}-text", {**clap.model_protocol(), "input": "text", **clap.runtime()}
    keys = [EmbeddingCache.key("text:" + hashlib.sha256(c.encode()).hexdigest(), bid, clap.weights_sha256, protocol)
            for c in captions]
    out: list[np.ndarray | None] = [None] * len(captions)
    for i, k in enumerate(keys):
        hit = cache.get(bid, k, ("text",)) if cache else None
        if hit is not None:
            out[i] = hit["text"]
            stats.hits += 1
    todo = [i for i, o in enumerate(out) if o is None]
    for s in tqdm(range(0, len(todo), batch_size), desc="clap text", unit="batch", disable=not todo):
        idx = todo[s:s + batch_size]
        for i, e in zip(idx, clap.embed_text([captions[i] for i in idx])):
            out[i] = e
            if cache:
                cache.put(bid, keys[i], {"text": e}, {"caption": captions[i], "backbone": bid})
            stats.computed += 1
    return np.stack(out), stats  # type: ignore[arg-type]
