"""The reference set (e.g. AudioCaps test) and its pairing with a folder of generated clips.

A manifest is CSV or JSONL with columns ``id, audio, caption`` (read by siren.data.manifest, the
project's one manifest reader; relative audio paths are relative to the manifest's folder).
AudioCaps lists 5 captions per clip
as 5 rows with the same id: ``caption_index=k`` takes each id's k-th row (in file order). A
``subset`` file (one id per line) restricts the set, e.g. to the 964 clips AudioLDM evaluates
on. Both are protocol parameters and go into the card.

The generated folder holds ``<id>.wav`` for exactly the reference ids: KL pairs clips by id, so
missing or extra files are an error that lists them, never a silent intersection.
"""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from eval.audio import Clip
from siren.data.manifest import Row, read_text, text_lines
from siren.errors import ManifestError
from siren.io import sha256


@dataclass(frozen=True)
class RefItem:
    id: str
    audio: Path
    caption: str


def select(rows: list[Row], manifest: str | Path, caption_index: int = 0,
           subset: str | Path | None = None) -> list[RefItem]:
    """One item per id (order of first appearance), with the id's ``caption_index``-th caption.
    ``rows``: ``siren.data.manifest.read_manifest(manifest, unique_ids=False)``."""
    by_id: dict[str, list[Row]] = {}
    for r in rows:
        by_id.setdefault(r.id, []).append(r)
    if subset:
        if not Path(subset).is_file():
            raise ManifestError(f"subset={subset} is not a file; give a text file of reference ids, one per line")
        wanted = [line.strip() for line in text_lines(read_text(subset)) if line.strip()]
        if not wanted:
            raise ManifestError(f"subset {subset} lists no id; give one reference id per line")
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
        audio = {r.audio for r in rs}
        if len(audio) > 1:
            raise ManifestError(f"{manifest}: id {i} has different audio paths {sorted(map(str, audio))}")
        items.append(RefItem(id=i, audio=rs[0].audio, caption=rs[caption_index].caption))
    return items


def _show(ids: list[str], n: int = 20) -> str:
    # a name with spaces at an end is quoted: the manifest's ids are stripped, so " a" and "a" printed alike
    ids = [repr(i) if i != i.strip() else i for i in ids]
    return ", ".join(ids[:n]) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


def match_generated(gen_dir: str | Path, ids: list[str], subset: bool = False) -> tuple[dict[str, Path], int]:
    """(``id -> gen_dir/<id>.wav`` for every reference id, the files left out); missing or extra ``.wav`` files
    are an error listing them. With ``subset`` (the reference restricted by subset=), files of the ids outside it
    are left out, not extra: a folder generated for the whole test set is evaluated on the subset."""
    gen_dir = Path(gen_dir)
    if not gen_dir.is_dir():
        raise ManifestError(f"gen_dir {gen_dir} is not a folder")
    wavs = [p for p in gen_dir.iterdir() if p.suffix == ".wav" and not p.name.startswith(".")]  # as glob("*.wav")
    odd = [p.name for p in wavs if not p.is_file()]  # read, a folder fails in libsndfile and a pipe blocks
    if odd:
        raise ManifestError(f"{gen_dir}: {len(odd)} .wav name(s) that are not files (a folder, a pipe, a link to "
                            f"nothing): {_show(sorted(odd))}; remove them")
    have = {p.stem: p for p in wavs}
    missing = [i for i in ids if i not in have]
    extra = [] if subset else sorted(set(have) - set(ids))
    if missing or extra:
        msg = [f"generated clips in {gen_dir} do not match the reference ids (KL pairs clips by id, <id>.wav):"]
        if missing:
            msg.append(f"  missing {len(missing)}: {_show(missing)}")
            lost = {i.lower() for i in missing}  # the same name in another case or format: say so
            near = sorted(p.name for p in gen_dir.iterdir() if p.suffix != ".wav" and p.stem.lower() in lost
                          and not p.name.startswith("."))
            if near:
                msg.append(f"  under other names there: {_show(near)} (clips are read as <id>.wav: rename or "
                           f"convert them)")
            nfc = {unicodedata.normalize("NFC", i) for i in missing}  # looks the same on screen: say why it is not
            forms = sorted(f"{n!a}" for n in set(have) - set(ids) if unicodedata.normalize("NFC", n) in nfc)
            if forms:
                msg.append(f"  the same names in another Unicode form there (as a Mac's HFS+ or a copy from it "
                           f"writes them): {_show(forms)}; rename them to the ids' exact form")
        if extra:
            msg.append(f"  extra {len(extra)} (not in the reference set): {_show(extra)}")
        msg.append("  generate the missing ones, remove the extra ones, or restrict the reference with subset=IDS.txt")
        raise ManifestError("\n".join(msg))
    return {i: have[i] for i in ids}, len(set(have) - set(ids))


def set_hash(clips: list[Clip], captions: list[str] | None = None) -> str:
    """sha256 over (id, audio content hash[, caption]) of a set, in id order."""
    caps = captions if captions is not None else [None] * len(clips)
    rows = sorted((c.id, c.content_hash, cap) for c, cap in zip(clips, caps))
    return sha256(json.dumps(rows))
