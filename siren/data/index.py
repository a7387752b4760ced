"""A prepared split's index: the shards' records merged into ``splits/<split>.json`` (item ids -> cache keys, the
audio each came from), and the check that this audio is still what prepare encoded.

Layout and cache keys: siren/data/cache.py; the shards: siren/data/prepare.py.
"""
from __future__ import annotations

import os
from pathlib import Path

from siren.data.cache import index_path, shard_path
from siren.errors import DataError
from siren.io import load_hashed, read_json, sha256, sha256_file, version, write_json


def write_index(out: str | Path, split: str, num_shards: int = 1, manifest: Path | None = None) -> Path:
    """Merge the shards' records into ``splits/<split>.json`` (item ids -> cache keys); with ``manifest``,
    only shards prepared from its current bytes."""
    out = Path(out)
    parts, missing = [], []
    for s in range(num_shards):
        p = shard_path(out, split, s, num_shards)
        (parts.append(read_json(p, f"delete it and run prepare for shard {s} again (its encodings are cached)"))
         if p.is_file() else missing.append(s))
    if missing:
        raise DataError(f"{out}: split '{split}' shard(s) {missing} of {num_shards} are not prepared yet "
                        f"(no {shard_path(out, split, missing[0], num_shards).name}); run prepare with shard=<i> "
                        f"num_shards={num_shards} for each, then the index step again")
    head = {k: v for k, v in parts[0].items() if k not in ("shard", "entries", "bad")}
    if manifest is not None and head.get("manifest_sha256") != sha256(manifest.read_bytes()):
        raise DataError(f"{out}: the shards of split '{split}' were prepared from another version of {manifest} "
                        f"(edited since); run prepare again with num_shards={num_shards} (unchanged files' "
                        f"encodings are cached), then the index step")
    for p in parts[1:]:
        other = {k: v for k, v in p.items() if k not in ("shard", "entries", "bad")}
        if other != head:
            diff = sorted(k for k in head if head[k] != other.get(k))
            raise DataError(f"{out}: shard {p['shard']} of split '{split}' was prepared with a different {diff} "
                            f"than shard 0; re-run the shards with one config")
    items, rows = [], {}  # rows: item id -> the manifest ids of the rows it came from
    for e in sorted((e for p in parts for e in p["entries"]), key=lambda e: e["row"]):
        for s, (real, chunk) in enumerate(zip(e["real_frames"], e["chunks"])):
            # appendix A segmentation: chunk k of a split file (k * duration_s onwards) is item "<id>#<k>"
            item_id = e["id"] if chunk < 0 else f"{e['id']}#{chunk}"
            rows.setdefault(item_id, []).append(e["id"])
            items.append({"id": item_id, "caption": e["caption"],
                          "label": e["label"], "source": e["audio"],
                          **{k: e[k] for k in ("source_sha256", "source_stat") if k in e},
                          "codes": e["codes"], "segment": s,
                          "text": e["text"], "frames": e["frames"], "real_frames": real,
                          **({"crop_filter": e["crop_filter"][s]} if "crop_filter" in e else {})})
    dupes = {i: r for i, r in rows.items() if len(r) > 1}
    if dupes:
        named = "; ".join(f"{i} from rows {', '.join(r)}" for i, r in list(dupes.items())[:10])
        raise DataError(f"{out}: split '{split}' has {len(dupes)} duplicate item id(s) after segmentation (segment k "
                        f"of row ID is named ID#k): {named}; rename those manifest ids")
    bad = sorted((b for p in parts for b in p["bad"]), key=lambda b: b["row"])
    dest = index_path(out, split)
    write_json(dest, {**head, "split": split, "num_items": len(items), "skipped": bad, "items": items}, durable=True)
    return dest


def changed_files(records: list[dict], threads: int | None = None) -> tuple[list[str], list[str], bool]:
    """(files whose bytes are no longer the recorded ones, files no longer there, whether ``records`` were updated)
    for records {"source", "source_sha256", "source_stat"}. A file whose size, mtime and ctime
    (``siren.io.version``) are as recorded is taken as unchanged; any other is hashed again, and one with the same
    bytes (a copy, a restore) gets its new version in ``records``: the caller writes them back, so the next check
    does not hash it again. Files are stat'ed and hashed by ``threads`` threads (default: 4 per core, at most 32):
    the launcher runs this on a login node, over every source of a training set, where a network filesystem
    answers each call in turn, and a ``chmod -R`` moves every ctime."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def check(it: dict) -> tuple[str, list[int] | None]:  # (what became of the file, its version if restated)
        try:
            st = os.stat(it["source"])
        except FileNotFoundError:
            return "gone", None
        if version(st) == it["source_stat"]:  # indexes before 2026-12-06 hold [size, mtime]: hashed once
            return "same", None
        return ("changed", None) if sha256_file(it["source"]) != it["source_sha256"] else ("restat", version(st))

    unique = list({it["source"]: it for it in records if "source_stat" in it}.values())  # one check per file
    chunks = [unique[i:i + 64] for i in range(0, len(unique), 64)]  # a task per file cost 10% on a local disk
    with ThreadPoolExecutor(threads or min(32, 4 * (os.cpu_count() or 1))) as ex, \
            tqdm(total=len(unique), desc="check sources", unit="file", disable=None if len(unique) > 1000 else True
                 ) as bar:
        found = []
        for part in ex.map(lambda chunk: [check(it) for it in chunk], chunks):
            found += part
            bar.update(len(part))
    changed = [it["source"] for it, (what, _) in zip(unique, found) if what == "changed"]
    gone = [it["source"] for it, (what, _) in zip(unique, found) if what == "gone"]
    restat = {it["source"]: v for it, (what, v) in zip(unique, found) if what == "restat"}
    for it in records:
        if it.get("source") in restat:
            it["source_stat"] = restat[it["source"]]
    return changed, gone, bool(restat)


def changed_sources(out: str | Path, split: str) -> tuple[list[str], list[str]]:
    """(the audio files of a prepared split whose bytes are no longer the ones prepare encoded, those no longer
    there); a file with the same bytes (a copy, a restore) gets its new version recorded in the index, so the next
    check does not hash it again. Prepare's codes are keyed by content, but a finished grid does not run it
    again, so without this check a file replaced under the same path kept the former audio's codes and the
    models trained on them."""
    path = index_path(Path(out), split)
    index = read_json(path, "run prepare again")
    changed, gone, restated = changed_files(index.get("items", []))
    if restated:
        write_json(path, index)
    return changed, gone


def source_record(path: str | Path) -> dict:
    """{"source", "source_sha256", "source_stat"} of one audio file, as prepare records its sources."""
    st, h = load_hashed(path, lambda fh: os.fstat(fh.fileno()))  # the version of the bytes hashed
    return {"source": str(path), "source_sha256": h, "source_stat": version(st)}


def reference_sources(manifest: str | Path) -> dict[str, dict]:
    """id -> ``source_record`` of every clip of an evaluation's reference manifest that exists (a missing one is
    the evaluation's to report), hashed once per file."""
    from siren.data.manifest import read_manifest

    rows = {r.id: r.audio for r in read_manifest(manifest, unique_ids=False)}  # 5 rows per AudioCaps clip
    records = {str(a): source_record(a) for a in set(rows.values()) if a.is_file()}
    return {i: records[str(a)] for i, a in rows.items() if str(a) in records}


def clips_shared_with_training(out: str | Path, test: dict[str, dict]) -> list[tuple[str, str]]:
    """(test id, train id) of every test clip (``reference_sources``) whose audio file has the same bytes as a
    training item's source. AudioSet holds AudioCaps' test clips: a training set gathered from it can hold the
    test audio, and FD or KL then read better than they are. A clip downloaded twice (other bytes) is not seen."""
    index = read_json(index_path(Path(out), "train"), "run prepare again")
    train = {it["source_sha256"]: it["id"] for it in index.get("items", []) if "source_sha256" in it}
    return [(i, train[r["source_sha256"]]) for i, r in test.items() if r["source_sha256"] in train]


def read_source(path: str | Path, recorded: str | None, fix: str) -> bytes:
    """A prepared item's audio file, read once, its bytes checked against the sha256 prepare recorded (None: not
    recorded, unchecked): a file replaced under the same path would be read as the audio its codes came from."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:  # moved or deleted since prepare: named, not a traceback
        raise DataError(f"{path}: the audio prepare encoded cannot be read ({e.strerror or e}); put it back, or "
                        f"{fix}") from None
    if recorded and sha256(data) != recorded:
        raise DataError(f"{path}: changed since prepare encoded it (its sha256 is not the one prepare recorded); {fix}")
    return data
