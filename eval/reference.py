"""The reference set (e.g. AudioCaps test) and its pairing with a folder of generated clips.

A manifest is CSV or JSONL with columns ``id, audio, caption`` (more columns are ignored);
relative audio paths are relative to the manifest's folder. AudioCaps lists 5 captions per clip
as 5 rows with the same id: ``caption_index=k`` takes each id's k-th row (in file order). A
``subset`` file (one id per line) restricts the set, e.g. to the 964 clips AudioLDM evaluates
on. Both are protocol parameters and go into the card.

The generated folder holds ``<id>.wav`` for exactly the reference ids: KL pairs clips by id, so
missing or extra files are an error that lists them, never a silent intersection.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from eval.audio import Clip
from siren.data.manifest import check_id, read_records
from siren.errors import ManifestError  # noqa: F401  (re-exported: eval's callers catch it from here)

COLUMNS = ("id", "audio", "caption")


@dataclass(frozen=True)
class RefItem:
    id: str
    audio: Path
    caption: str


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a CSV / JSONL manifest as dicts with at least ``id, audio, caption`` (all str).

    Parsed strictly by siren.data.manifest (the same format, id,audio,caption[,label]); unlike a
    training manifest an id may repeat (AudioCaps: one row per caption). Ids are checked as file names.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"reference manifest {path} does not exist (pass ref=PATH to a CSV/JSONL with columns "
                            f"{', '.join(COLUMNS)})")
    columns, records = read_records(path)
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"manifest {path} lacks column(s) {missing}; it has {columns}; "
                            f"needed: {', '.join(COLUMNS)}")
    rows, empty = [], []
    for n, r in records:
        row = {c: "" if r.get(c) is None else str(r[c]) for c in COLUMNS}
        if not row["id"] or not row["audio"]:
            empty.append(n)
            continue
        check_id(row["id"], f"{path}:{n}")
        rows.append(row)
    if empty:
        raise ManifestError(f"manifest {path}: empty id or audio on line(s) {empty[:20]}")
    return rows


def select(rows: list[dict], manifest: str | Path, caption_index: int = 0, subset: str | Path | None = None) -> list[RefItem]:
    """One item per id (order of first appearance), with the id's ``caption_index``-th caption."""
    base = Path(manifest).parent
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    if subset:
        wanted = [line.strip() for line in Path(subset).read_text().splitlines() if line.strip()]
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            raise ManifestError(f"subset {subset}: {len(unknown)} id(s) not in {manifest}: {_show(unknown)}")
        by_id = {i: by_id[i] for i in dict.fromkeys(wanted)}
    short = [i for i, rs in by_id.items() if len(rs) <= caption_index]
    if short:
        raise ManifestError(f"caption_index={caption_index} but {len(short)} id(s) have fewer captions "
                            f"({_show(short)}); use a smaller caption_index")
    items = []
    for i, rs in by_id.items():
        audio = {r["audio"] for r in rs}
        if len(audio) > 1:
            raise ManifestError(f"{manifest}: id {i} has different audio paths {sorted(audio)}")
        p = Path(rs[0]["audio"])
        items.append(RefItem(id=i, audio=p if p.is_absolute() else base / p, caption=rs[caption_index]["caption"]))
    return items


def _show(ids: list[str], n: int = 20) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


def match_generated(gen_dir: str | Path, ids: list[str]) -> dict[str, Path]:
    """``id -> gen_dir/<id>.wav`` for every reference id; missing or extra ``.wav`` files are an error listing them."""
    gen_dir = Path(gen_dir)
    if not gen_dir.is_dir():
        raise ManifestError(f"gen_dir {gen_dir} is not a folder")
    have = {p.stem: p for p in gen_dir.glob("*.wav")}
    missing = [i for i in ids if i not in have]
    extra = sorted(set(have) - set(ids))
    if missing or extra:
        msg = [f"generated clips in {gen_dir} do not match the reference ids (KL pairs clips by id, <id>.wav):"]
        if missing:
            msg.append(f"  missing {len(missing)}: {_show(missing)}")
        if extra:
            msg.append(f"  extra {len(extra)} (not in the reference set): {_show(extra)}")
        msg.append("  generate the missing ones, remove the extra ones, or restrict the reference with subset=IDS.txt")
        raise ManifestError("\n".join(msg))
    return {i: have[i] for i in ids}


def set_hash(clips: list[Clip], captions: list[str] | None = None) -> str:
    """sha256 over (id, audio content hash[, caption]) of a set, in id order."""
    caps = captions if captions is not None else [None] * len(clips)
    rows = sorted((c.id, c.content_hash, cap) for c, cap in zip(clips, caps))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
