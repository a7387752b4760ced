"""Appendix A's first step as files: cut long recordings into 10 s mono 16 kHz segments for captioning.

    python -m siren.data.segment manifest=raw.csv out=SEG            # SEG/audio/*.wav + SEG/segments.csv

The paper segments its raw audio into 10 s clips, then captions each segment (Qwen2-Audio, five
captions, LLM-polished) and filters the pairs (siren.data.filter). ``prepare audio.policy=segment``
cuts the same way at encoding time, but captioning and the filter need one file per segment, so this
writes them: ``siren.data.audio.standardize`` with ``policy=segment`` (non-overlapping ``duration_s``
chunks, the residual dropped, silent chunks dropped; a shorter file is kept at its length, for prepare's
``pad`` policy to pad and mask), 16-bit PCM.
``segments.csv`` names segment k of row ``id`` ``id#k`` (as prepare does) and carries the row's
caption and label, a placeholder for the captioner to replace or to add ``caption_2 ..`` columns to.
Files already written with the same content are left alone, so a re-run writes nothing.
"""
from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from siren.codec import SAMPLE_RATE
from siren.config import load_config
from siren.data.audio import AudioConfig, load_audio, silent_segments, standardize
from siren.data.cache import sha256
from siren.data.filter_select import write_csv
from siren.data.manifest import read_manifest
from siren.errors import AudioError, ConfigError, DataError
from siren.io import atomic_path, check_folder

log = logging.getLogger(__name__)


@dataclass
class SegmentConfig:
    manifest: str = ""  # CSV/JSONL: id, audio, caption[, label] of the raw recordings
    out: str = ""  # audio/<name>.wav per segment + segments.csv (+ skipped.csv: unusable files, silent segments)
    duration_s: float = 10.0  # appendix A: 10 s segments

    def __post_init__(self):  # AudioConfig's check, named by this command's own key (audio.duration_s is prepare's)
        try:
            AudioConfig("segment", self.duration_s).validate()
        except DataError as e:
            raise ConfigError(str(e).replace("audio.duration_s", "duration_s")) from None


SILENT = "silent segment (left out)"


def file_name(item_id: str) -> str:
    """A file name for any id: its safe characters plus a short hash (two ids never share a file)."""
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', item_id)[:80]}-{sha256(item_id)[:8]}.wav"


def segment(manifest: str | Path, out: str | Path, duration_s: float = 10.0, progress: bool = True
            ) -> tuple[Path, int, list[dict]]:
    """Write the segments of every row; returns (segments.csv, segments written or kept, skipped rows)."""
    out, audio = Path(out), AudioConfig("segment", duration_s)
    audio.validate()
    rows, skipped, n_new, made_by = [], [], 0, {}
    for r in tqdm(read_manifest(manifest), desc="segment", disable=not progress, unit="file", dynamic_ncols=True):
        try:
            wav = load_audio(r.audio)
            chunks, real, index = standardize(wav, audio, r.audio, warn=False)
        except AudioError as e:
            skipped.append({"id": r.id, "audio": str(r.audio), "reason": str(e)})
            continue
        # split: its silent chunks are left out, and listed
        skipped += [{"id": f"{r.id}#{k}", "audio": str(r.audio), "reason": SILENT}
                    for k in silent_segments(wav, index, audio)]
        for x, n, k in zip(chunks, real, index):
            seg_id = r.id if k < 0 else f"{r.id}#{k}"
            what = f"row {r.id}" if k < 0 else f"segment {k} of row {r.id}"
            if seg_id in made_by:  # a row id "a#0" beside a long "a": the second overwrote the first's file
                raise DataError(f"{manifest}: segment id {seg_id} is both {made_by[seg_id]} and {what} (segment k of "
                                f"row ID is named ID#k); rename one of those ids")
            made_by[seg_id] = what
            dest = out / "audio" / file_name(seg_id)
            buf = io.BytesIO()
            # a file shorter than duration_s at its own length: zero padding written here would pass the filter's
            # activity SNR and CLAP as audio, and prepare would train on it as real frames
            sf.write(buf, x[:n].numpy(), SAMPLE_RATE, format="WAV", subtype="PCM_16")
            if not dest.is_file() or dest.read_bytes() != buf.getvalue():
                with atomic_path(dest) as tmp:
                    tmp.write_bytes(buf.getvalue())
                n_new += 1
            rows.append({"id": seg_id, "audio": f"audio/{dest.name}", "caption": r.caption, "label": r.label or ""})
    if not rows:
        raise DataError(f"{manifest}: no usable segment in any file ({len(skipped)} skipped)")
    write_csv(out / "segments.csv", rows, ["id", "audio", "caption", "label"])
    if skipped:
        write_csv(out / "skipped.csv", skipped, ["id", "audio", "reason"])
    else:  # a rerun's folder is this run's: a former run's list would name files since mended
        (out / "skipped.csv").unlink(missing_ok=True)
    # an earlier run's segments (another duration_s, a row since removed) are kept, but said: audio/ is what a
    # user lists to caption, and segments.csv is the set
    listed = {Path(r["audio"]).name for r in rows}
    stale = sorted(p.name for p in (out / "audio").glob("*.wav") if p.name not in listed)
    if stale:
        log.warning("%d file(s) in %s are not in this run's segments.csv (an earlier run's, e.g. %s): caption the "
                    "files segments.csv lists, or delete the others", len(stale), out / "audio", stale[0])
    return out / "segments.csv", n_new, skipped


def main(argv: Sequence[str] | None = None) -> None:
    from siren import cli

    cfg = load_config(SegmentConfig, cli.start(argv))
    if not cfg.manifest or not cfg.out:
        raise ConfigError("manifest=<raw recordings .csv/.jsonl> and out=<segment directory> are required")
    check_folder(cfg.out, "out")
    dest, n_new, skipped = segment(cfg.manifest, cfg.out, cfg.duration_s)
    n = len(read_manifest(dest))
    silent = sum(s["reason"] == SILENT for s in skipped)
    print(f"{dest}: {n} segments of {cfg.duration_s:g} s ({n_new} written, {n - n_new} unchanged); "
          f"{len(skipped) - silent} unusable file(s), {silent} silent segment(s) left out"
          + (f", listed in {dest.with_name('skipped.csv')}" if skipped else ""))


if __name__ == "__main__":
    from siren import cli

    cli.run(main, SegmentConfig, __doc__)
