"""Manifests: the list of (id, audio file, caption[, label]) a dataset is made of.

CSV (header row) or JSONL (one object per line). Audio paths may be relative to the
manifest's folder. Every problem is an error naming the manifest, the line and what to fix.

CSV is read strictly: Python's csv module, left lenient, lets an unterminated quote swallow the
rest of the file into one caption and files extra fields under a ``None`` key. Ids become file
names (``<out>/<id>.wav``, ``<id>#<k>`` items), so they are checked here, once: no path
separators, no ``..``, no control characters (``check_id``); ``child_path`` checks every path
built from one stays in its folder.
"""
from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from siren.errors import DataError, ManifestError

REQUIRED = ("id", "audio", "caption")
OPTIONAL = ("label",)
EXTENSIONS = (".csv", ".jsonl")
MAX_ID_BYTES = 200  # file systems allow 255 per name: <id> + a suffix + atomic_path's ".<name>.XXXXXXXX.tmp"


@dataclass(frozen=True)
class Row:
    id: str
    audio: Path  # absolute
    caption: str
    label: str | None = None


def check_id(id: str, where: str) -> None:
    """Raise ManifestError (naming ``where``, e.g. "file:line") unless ``id`` is safe as a file name."""
    bad = [why for why, hit in [("'/'", "/" in id), ("'\\'", "\\" in id), ("'..'", ".." in id),
                                ("a control character", any(unicodedata.category(c) == "Cc" for c in id)),
                                ("a leading '.'", id.startswith("."))] if hit]  # a hidden file: never matched
    if bad:
        raise ManifestError(f"{where}: id {id!r} contains {' and '.join(bad)}; ids name output files "
                            f"(<out>/<id>.wav): rename it without path separators, '..', control characters or a "
                            f"leading '.'")
    if len(id.encode()) > MAX_ID_BYTES:  # with a suffix and atomic_path's temp name, over the 255-byte file name
        raise ManifestError(f"{where}: id {id[:40]!r}... is {len(id.encode())} bytes; ids name output files "
                            f"(<out>/<id>.wav): shorten it to at most {MAX_ID_BYTES} bytes")


def check_one_line(text: str, where: str) -> None:
    """Captions and labels are one line: a line break inside one passed a JSONL manifest, then broke every CSV
    written from it (segments.csv, train.csv) and the line numbers of every error after it."""
    if any(unicodedata.category(c) == "Cc" and c != "\t" for c in text):
        raise ManifestError(f"{where} {text[:60]!r} contains a line break or another control character; "
                            "write it on one line")


def child_path(folder: str | Path, id: str, suffix: str = "") -> Path:
    """``folder/<id><suffix>``, after checking it names a file directly inside ``folder``."""
    folder = Path(folder)
    path = folder / f"{id}{suffix}"
    where = Path(os.path.abspath(path))  # lexical: resolves '..' without following a symlinked file
    if where.parent != Path(os.path.abspath(folder)):
        raise DataError(f"id {id!r} would write {where}, outside {os.path.abspath(folder)}; ids must be plain "
                        f"file names (no '/', '\\', '..')")
    return path


def text_lines(text: str) -> list[str]:
    """Lines as `wc -l` counts them (\\n, \\r\\n or \\r): str.splitlines also breaks at U+2028, U+0085 and other
    separators that text copied from web pages or PDFs carries inside a line."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _no_constant(name: str):
    raise ValueError(f"{name} (what json.dumps writes for a missing value)")


def read_text(path: str | Path) -> str:
    """A text file the user wrote (manifest, ids, captions) as UTF-8, without a leading BOM (Excel writes one); other
    encodings are an error naming the line, not a UnicodeDecodeError traceback."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ManifestError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8") \
            from None


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, [(line number, record)]); a malformed line is an error naming it."""
    records = []
    with io.StringIO(read_text(path), newline="") as f:  # a BOM (Excel) is not part of "id"
        reader = csv.reader(f, strict=True)
        start, header = 1, None
        while True:
            try:
                fields = next(reader, None)
            except csv.Error as e:
                if "unexpected end of data" in str(e):
                    raise ManifestError(f"{path}:{start}: a quoted field opened on this line is never closed (it "
                                        f"runs to the end of the file, line {reader.line_num}); close the quote, "
                                        f"and write a quote inside a field as \"\"") from None
                raise ManifestError(f"{path}:{start}: malformed CSV ({e}); quote a field holding a comma or quote "
                                    f"as \"...\" and write a quote inside it as \"\"") from None
            if fields is None:
                break
            line, end, start = start, reader.line_num, reader.line_num + 1
            if not fields:  # blank line
                continue
            if header is None:
                header = [c.strip() for c in fields]
                twice = sorted({c for c in header if header.count(c) > 1})
                if twice:  # dict(zip(...)) kept the last of them, without a word
                    raise ManifestError(f"{path}:{line}: column(s) {', '.join(twice)} appear more than once in the "
                                        f"header; keep one of each")
                continue
            if len(fields) != len(header):
                raise ManifestError(f"{path}:{line}: {len(fields)} fields, the header has {len(header)} "
                                    f"({','.join(header)}); quote a field that holds a comma")
            if end != line:  # only a quoted line break makes a record span lines
                raise ManifestError(f"{path}:{line}: a quoted field runs over lines {line}-{end} (an unbalanced "
                                    f"quote?); ids, paths and captions are one line each")
            records.append((line, dict(zip(header, fields))))
    return header or [], records


class _RepeatedKey(ValueError):
    pass


def _no_repeats(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique (json keeps the last of a repeated key, without a word; the CSV reader
    refuses a repeated column)."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise _RepeatedKey(", ".join(sorted({k for k in keys if keys.count(k) > 1})))
    return dict(pairs)


def read_records(path: Path, required: tuple[str, ...] = REQUIRED) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, [(line number, record)]) of a CSV (by suffix) or JSONL file, strictly parsed; no value checks."""
    if path.suffix == ".csv":
        return _read_csv(path)
    records, columns = [], {}
    with io.StringIO(read_text(path), newline=None) as f:  # universal newlines, as open() reads
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line, parse_constant=_no_constant, object_pairs_hook=_no_repeats)  # NaN: "nan"
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except _RepeatedKey as e:
                raise ManifestError(f"{path}:{n}: {e} given more than once in this record (JSON keeps the last); "
                                    f"give each key once") from None
            except ValueError as e:
                raise ManifestError(f"{path}:{n}: a value is {e}; fill it in or leave the record out") from None
            if not isinstance(r, dict):
                raise ManifestError(f"{path}:{n}: expected a JSON object with keys {list(required)}")
            nested = [k for k in (*REQUIRED, *OPTIONAL) if isinstance(r.get(k), (list, dict, bool))]
            if nested:  # str() made "['a', 'b']" a caption
                raise ManifestError(f"{path}:{n}: {nested[0]} is {json.dumps(r[nested[0]])[:60]}; ids, paths, "
                                    f"captions and labels are strings (or numbers)")
            if isinstance(r.get("id"), float):  # str() made 1e400 "inf" and 1.0 "1.0" (a CSV's 1 stays "1")
                raise ManifestError(f"{path}:{n}: id is the number {json.dumps(r['id'])}; give ids as strings "
                                    f"(\"id\": \"...\") or whole numbers")
            columns.update(dict.fromkeys(r))
            records.append((n, r))
    # A key no line has is a missing column (reported by the caller); one only some lines lack names them.
    lacking = [f"line {n}: no {', '.join(gone)}" for n, r in records
               if (gone := [c for c in required if c in columns and c not in r])]
    if lacking:
        raise ManifestError(f"{path}: {len(lacking)} line(s) lack required key(s): " + "; ".join(lacking[:20]))
    return list(columns), records


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
    columns, records = read_records(path)
    if not records:
        raise ManifestError(f"{path}: manifest is empty (no rows); it needs columns {', '.join(REQUIRED)}")
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; required columns are "
                            f"{', '.join(REQUIRED)} (optional: {', '.join(OPTIONAL)}); "
                            f"found: {', '.join(columns) or 'none'}")
    rows, blank, lines, folded = [], [], {}, {}
    for n, r in records:
        vals = {c: ("" if r.get(c) is None else str(r[c]).strip()) for c in (*REQUIRED, *OPTIONAL)}
        empty = [c for c in REQUIRED if not vals[c]]
        if empty:
            blank.append(f"line {n}: empty {', '.join(empty)}")
            continue
        check_id(vals["id"], f"{path}:{n}")
        check_one_line(vals["caption"], f"{path}:{n}: caption")
        check_one_line(vals["label"], f"{path}:{n}: label")
        lines.setdefault(vals["id"], []).append(n)
        folded.setdefault(unicodedata.normalize("NFC", vals["id"]).casefold(), {}).setdefault(vals["id"], n)
        audio = Path(vals["audio"]).expanduser()
        rows.append(Row(vals["id"], audio if audio.is_absolute() else path.parent / audio, vals["caption"],
                        vals["label"] or None))
    # Both kinds of problem in one message, each with its lines: one fix-and-rerun, not one per kind.
    problems = [f"{len(blank)} row(s) with empty required values: " + "; ".join(blank[:20])] if blank else []
    dups = sorted(i for i, ns in lines.items() if len(ns) > 1) if unique_ids else []
    if dups:
        problems.append(f"duplicate id(s) {', '.join(f'{i} (lines {_lines(lines[i])})' for i in dups[:20])}"
                        f"{' ...' if len(dups) > 20 else ''}; ids must be unique: rename or remove the repeats")
    # on a case-insensitive or normalising file system (macOS, SMB, exFAT) they name one output file
    clash = [ids for ids in folded.values() if len(ids) > 1]
    if clash:
        problems.append("ids that differ only in letter case or Unicode form: " +
                        "; ".join(" and ".join(f"{i!r} (line {n})" for i, n in ids.items()) for ids in clash[:20]) +
                        " (each names the same output file on a case-insensitive file system): rename one of each")
    if problems:
        raise ManifestError(f"{path}: " + "; and ".join(problems))
    return rows


def _lines(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:5])) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")


def read_captions(path: str | Path) -> list[str]:
    """Captions (e.g. stage-2 prompts) from a .txt (one per line), or a .csv / .jsonl with a 'caption'
    column (other columns, id and audio included, are optional here)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(f"{path}: captions file does not exist (a .txt, .csv or .jsonl of captions)")
    if path.suffix not in (*EXTENSIONS, ".txt"):  # read line by line, a prompts.CSV's header was a prompt
        raise ManifestError(f"{path}: captions are read by suffix from a .txt (one per line), .csv or .jsonl (a "
                            f"'caption' column); give the file one of those")
    if path.suffix in EXTENSIONS:
        columns, records = read_records(path, required=())  # the caption check below names the line
        if "caption" not in columns and not any("caption" in r for _, r in records):
            raise ManifestError(f"{path}: no 'caption' column (columns: {columns})")
        missing = [n for n, r in records if "caption" not in r]
        if missing:
            raise ManifestError(f"{path}:{missing[0]}: no 'caption' in this record")
        caps = ["" if r["caption"] is None else str(r["caption"]) for _, r in records]
        for (n, _), c in zip(records, caps):
            check_one_line(c.strip(), f"{path}:{n}: caption")
        empty = [n for (n, _), c in zip(records, caps) if not c.strip()]
        if empty:  # dropping them would train on fewer prompts than the file lists, in silence
            raise ManifestError(f"{path}:{empty[0]}: empty caption ({len(empty)} record(s) in all); "
                                "fill them in or remove those records")
    elif path.suffix == ".txt":
        caps = text_lines(read_text(path))
        for n, c in enumerate(caps, 1):
            check_one_line(c.strip(), f"{path}:{n}: caption")
    caps = [c.strip() for c in caps if c and c.strip()]
    if not caps:
        raise ManifestError(f"{path} holds no caption")
    return caps
