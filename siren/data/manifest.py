"""Manifests: the list of (id, audio file, caption[, label]) a dataset is made of.

CSV (header row) or JSONL (one object per line). Audio paths may be relative to the
manifest's folder. Every problem is an error naming the manifest and what to fix.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from siren.errors import ManifestError

REQUIRED = ("id", "audio", "caption")
OPTIONAL = ("label",)
EXTENSIONS = (".csv", ".jsonl")


@dataclass(frozen=True)
class Row:
    id: str
    audio: Path  # absolute
    caption: str
    label: str | None = None


def _read_records(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, [(line number, record)])."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a BOM (Excel) is not part of "id"
            reader = csv.DictReader(f)
            records = [(reader.line_num, r) for r in reader]
            return [c.strip() for c in reader.fieldnames or []], [
                (n, {k.strip(): v for k, v in r.items() if k is not None}) for n, r in records]
    records, columns = [], {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(r, dict):
                raise ManifestError(f"{path}:{n}: expected a JSON object with keys {list(REQUIRED)}")
            columns.update(dict.fromkeys(r))
            records.append((n, r))
    # A JSONL line lacking a key is a missing column for that line; report it per column below.
    missing_somewhere = [c for c in REQUIRED if any(c not in r for _, r in records)]
    return [c for c in columns if c not in missing_somewhere], records


def read_manifest(path: str | Path, unique_ids: bool = True) -> list[Row]:
    """Rows of a CSV/JSONL manifest with columns id, audio, caption and optional label. The one
    manifest reader of the project: prepare, eval references and RL prompts read through it.
    ``unique_ids=False`` for reference sets that list several captions of one clip as rows with the
    same id (AudioCaps: 5 per clip)."""
    path = Path(path).expanduser().resolve()
    if path.suffix not in EXTENSIONS:
        raise ManifestError(f"{path}: unknown manifest extension '{path.suffix}'; use one of {', '.join(EXTENSIONS)}")
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file does not exist")
    columns, records = _read_records(path)
    if not records:
        raise ManifestError(f"{path}: manifest is empty (no rows); it needs columns {', '.join(REQUIRED)}")
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; required columns are "
                            f"{', '.join(REQUIRED)} (optional: {', '.join(OPTIONAL)}); found: {', '.join(columns) or 'none'}")
    rows, blank = [], []
    for n, r in records:
        vals = {c: ("" if r.get(c) is None else str(r[c]).strip()) for c in (*REQUIRED, *OPTIONAL)}
        empty = [c for c in REQUIRED if not vals[c]]
        if empty:
            blank.append(f"line {n}: empty {', '.join(empty)}")
            continue
        audio = Path(vals["audio"]).expanduser()
        rows.append(Row(vals["id"], audio if audio.is_absolute() else path.parent / audio, vals["caption"],
                        vals["label"] or None))
    if blank:
        raise ManifestError(f"{path}: {len(blank)} row(s) with empty required values: " + "; ".join(blank[:20]))
    dups = sorted(i for i, c in Counter(r.id for r in rows).items() if c > 1) if unique_ids else []
    if dups:
        raise ManifestError(f"{path}: duplicate id(s) {', '.join(dups[:20])}{' ...' if len(dups) > 20 else ''}; "
                            f"ids must be unique")
    return rows


def read_captions(path: str | Path) -> list[str]:
    """Captions (e.g. stage-2 prompts) from a .txt (one per line), or a .csv / .jsonl with a 'caption'
    column (other columns, id and audio included, are optional here)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(f"{path}: captions file does not exist (a .txt, .csv or .jsonl of captions)")
    if path.suffix in EXTENSIONS:
        columns, records = _read_records(path)
        if "caption" not in columns and not any("caption" in r for _, r in records):
            raise ManifestError(f"{path}: no 'caption' column (columns: {columns})")
        missing = [n for n, r in records if "caption" not in r]
        if missing:
            raise ManifestError(f"{path}:{missing[0]}: no 'caption' in this record")
        caps = ["" if r["caption"] is None else str(r["caption"]) for _, r in records]
    else:
        caps = path.read_text(encoding="utf-8").splitlines()
    caps = [c.strip() for c in caps if c and c.strip()]
    if not caps:
        raise ManifestError(f"{path} holds no caption")
    return caps
