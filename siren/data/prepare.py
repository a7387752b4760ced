"""prepare: a manifest -> cached codec codes and text-encoder states, plus an index per split.

    python -m siren.data.prepare manifest=data/train.csv out=data/prep             # pretrained DAC + CLAP
    python -m siren.data.prepare manifest=demo out=data/demo codec.weights=demo text.weights=demo
    python -m siren.data.prepare manifest=... out=... num_shards=8 shard=3          # one job-array element
    python -m siren.data.prepare manifest=... out=... num_shards=8 step=index       # merge, after all shards

``manifest=demo`` also sets ``audio.policy=crop audio.duration_s=2.0`` (the demo clips' length) unless given.

Caches are content-addressed, so a changed file or model never reuses a stale entry:
codes by (sha256 of the audio file's bytes, preprocessing policy incl. resampler, codec id),
text by (caption, text-encoder id, storage dtype). Every file is written atomically
(siren.io), so a killed run leaves no half-written entry and a re-run continues where it
stopped. Before encoding anything, every uncached file of the shard is read and checked, and
all bad ones are reported in one error (or left out and listed, with ``on_error=skip``). A file an
earlier run hashed, at the same size, mtime and ctime, is not read again unless it is to be encoded.

On-disk layout and cache keys: siren/data/cache.py; the index and its audio check: siren/data/index.py.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from siren.assets import FILE_LABEL
from siren.codec import FRAME_RATE
from siren.config import load_config
from siren.data.audio import AudioConfig, AudioError, load_audio, silent_segments, standardize
from siren.data.cache import HashLedger, cache_path, cached, codes_key, crops_key, open_entry, shard_path, text_key
from siren.data.encode import TEXT_DTYPES, bar, encode_codes, encode_text, score_crop_tables
from siren.data.index import write_index
from siren.data.manifest import Row, read_manifest
from siren.data.prepare_config import ON_ERROR, PrepareConfig
from siren.demo_weights import mode_of, mode_words
from siren.errors import DataError
from siren.io import check_folder, sha256, version, write_json
from siren.lock import hold

log = logging.getLogger(__name__)


def shard_rows(rows: Sequence[Row], num_shards: int, shard: int) -> list[tuple[int, Row]]:
    """Shard ``shard``'s deterministic slice: every num_shards-th row (manifest order), with row numbers."""
    if not 0 <= shard < num_shards:
        raise DataError(f"shard must be in [0, num_shards={num_shards}), got {shard}")
    return [(i, r) for i, r in enumerate(rows) if i % num_shards == shard]


@dataclass
class PrepareReport:
    split: str
    rows: int = 0
    codes_encoded: int = 0  # audio files run through the codec in this call
    codes_cached: int = 0
    text_encoded: int = 0  # distinct captions run through the text encoder
    text_cached: int = 0
    bad: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole call
    text_seconds: float = 0.0  # in the text encoder pass
    codes_seconds: float = 0.0  # in the codec pass (load + resample + encode + save)
    audio_seconds: float = 0.0  # audio encoded, after crop/pad
    crops_scored: int = 0  # files whose crop-filter table was computed in this call
    crops_seconds: float = 0.0

    def __str__(self) -> str:
        speed = (f" (codes {self.codes_seconds:.1f} s: {self.codes_seconds / self.codes_encoded:.2f} s per file, "
                 f"{self.codes_seconds / max(self.audio_seconds, 1e-9):.2f} s per audio second; text "
                 f"{self.text_seconds:.1f} s)" if self.codes_encoded else "")
        speed += (f"; crop filter: {self.crops_scored} files, {self.crops_seconds / self.crops_scored:.2f} s per file"
                  if self.crops_scored else "")
        return (f"{self.split}: audio {self.codes_encoded} to encode, {self.codes_cached} cached; captions "
                f"{self.text_encoded} to encode, {self.text_cached} cached; {len(self.bad)} bad; "
                f"{self.seconds:.1f} s{speed}")


def _header(codec, text_encoder, audio: AudioConfig, text_dtype: str, manifest: Path, manifest_sha: str) -> dict:
    from siren.frontends import codec_entry, text_entry

    codec, text = codec_entry(codec), text_entry(text_encoder)
    return {"manifest": str(manifest), "manifest_sha256": manifest_sha, "frame_rate": FRAME_RATE,
            "codec": {"id": codec["id"], "weights": codec["weights"]},
            "text": {"id": text["id"], "weights": text["weights"], "dtype": text_dtype},
            "frontends": {"codec": codec["config"], "text": text["config"]},  # full configs (siren.frontends)
            "audio": audio.key()}


def prepare_shard(rows: Sequence[Row], out: str | Path, split: str, *, codec, text_encoder,
                  audio: AudioConfig = AudioConfig(), text_dtype: str = "float16", num_shards: int = 1,
                  shard: int = 0, batch_size: int = 1, text_batch_size: int = 32, on_error: str = "stop",
                  manifest: Path | None = None, manifest_sha: str = "", progress: bool = True,
                  crop_s: float = 0.0, crop_step_s: float = 0.5) -> PrepareReport:
    """Encode shard ``shard`` of ``num_shards`` of ``rows`` into ``out`` and record it for the index step.

    ``codec`` / ``text_encoder`` are duck-typed: ``.encode`` and ``.id`` (and ``.weights_label``).
    ``crop_s`` > 0 also scores each item's crops of that length every ``crop_step_s`` with
    ``text_encoder.clap`` (the crop filter, siren/data/crops.py).
    """
    audio.validate()
    if crop_s > 0 and not crop_step_s > 0:
        raise DataError(f"crop_step_s must be > 0 when crop_s > 0, got {crop_step_s}")
    if text_dtype not in TEXT_DTYPES or on_error not in ON_ERROR:
        raise DataError(f"text_dtype must be one of {list(TEXT_DTYPES)} and on_error one of {list(ON_ERROR)}; "
                        f"got {text_dtype!r}, {on_error!r}")
    t0, out = time.perf_counter(), Path(out)
    mine = shard_rows(rows, num_shards, shard)
    rep = PrepareReport(split, rows=len(mine))
    # one writer per shard: a second (the same job twice, a wrong shard= on an array) deleted this one's record
    with hold(shard_path(out, split, shard, num_shards).with_suffix(".lock"), f"prepare of {split} shard {shard} of "
              f"{num_shards}", "wait for it to finish (the shards of one run take shard=0..num_shards-1)"):
        # A failed run must not leave an older record of this shard for the index step to merge.
        shard_path(out, split, shard, num_shards).unlink(missing_ok=True)

        # 1. hash every file (one hashed at its version by an earlier run is not read again); read and check the
        # ones not cached yet; report all bad ones at once.
        sha, keys, todo, bad, source = {}, {}, {}, {}, {}
        silent = {}  # file -> its silent segments left out (policy segment): said once, not in a line per file

        def key_of(h: str) -> str:
            return codes_key(h, audio.key(), codec.id)

        def encoded(key: str) -> bool:
            return key in todo or cached(cache_path(out, "codes", key))

        with HashLedger(shard_path(out, split, shard, num_shards).parent, shard, num_shards,
                        {str(r.audio) for _, r in mine}) as ledger:
            for i, row in bar(mine, progress, f"check {split} shard {shard} of {num_shards}"):
                try:  # read to hash it, or to encode it (the bytes hashed are the ones encoded)
                    h, st, data = ledger.lookup(row.audio, lambda h: not encoded(key_of(h)))
                except FileNotFoundError:
                    bad[i] = f"{row.audio}: audio file not found (id {row.id})"
                    continue
                except OSError as e:
                    bad[i] = f"{row.audio}: cannot read ({e.strerror}) (id {row.id})"
                    continue
                ledger.put(row.audio, st, h)  # a full disk here is an error of its own, not a bad audio file
                key = key_of(h)
                sha[key], keys[i] = h, key
                source[i] = {"source_sha256": h, "source_stat": version(st)}  # for changed_sources
                if data is None or encoded(key):  # data None: found encoded above
                    continue
                try:
                    wav = load_audio(row.audio, data)
                    if left_out := silent_segments(wav, standardize(wav, audio, row.audio, warn=False)[2], audio):
                        silent[row.audio] = left_out
                    todo[key] = row
                except AudioError as e:
                    bad[i] = f"{e} (id {row.id})"
        if silent:
            log.warning("%s shard %d of %d: %d silent %g s segment(s) of %d file(s) left out, e.g. %s", split, shard,
                        num_shards, sum(map(len, silent.values())), audio.duration_s, len(silent),
                        "; ".join(f"{f}: {', '.join(f'#{k}' for k in ks)}" for f, ks in list(silent.items())[:3]))
        if bad and on_error == "stop":
            raise DataError(f"{manifest or split}: {len(bad)} bad audio file(s) in shard {shard} of {num_shards} "
                            f"(nothing encoded by this run; cached items kept). Fix or remove them, or pass "
                            f"on_error=skip to leave them out (they are listed in the index):\n  "
                            + "\n  ".join(bad.values()))
        rep.bad = list(bad.values())
        good = [(i, r) for i, r in mine if i not in bad]

        # 2. text states of the captions not cached yet.
        tkeys = {i: text_key(r.caption, text_encoder.id, text_dtype) for i, r in good}
        captions = {tkeys[i]: r.caption for i, r in good}
        text_todo = {k: c for k, c in captions.items() if not cached(cache_path(out, "text", k))}
        rep.text_encoded, rep.text_cached = len(text_todo), len(captions) - len(text_todo)
        rep.codes_encoded, rep.codes_cached = len(todo), len({keys[i] for i, _ in good}) - len(todo)
        if progress:
            log.info("%s shard %d of %d: audio %d to encode, %d cached; captions %d to encode, %d cached", split, shard,
                     num_shards, rep.codes_encoded, rep.codes_cached, rep.text_encoded, rep.text_cached)
        t = time.perf_counter()
        if text_todo:
            encode_text(text_todo, out, text_encoder, text_dtype, text_batch_size, progress)
        rep.text_seconds = time.perf_counter() - t

        # 3. codes of the audio not cached yet (each file saved as soon as it is encoded).
        t = time.perf_counter()
        if todo:
            rep.audio_seconds = encode_codes(todo, sha, out, codec, audio, batch_size, progress)
        rep.codes_seconds = time.perf_counter() - t

        # 3b. the crop filter's table of CLAP similarities (appendix B), not cached yet.
        crop_keys = {}
        if crop_s > 0:
            from siren.data.crops import frames_of

            clap = getattr(text_encoder, "clap", None)
            if clap is None:
                raise DataError("crop_s > 0 needs the text encoder's CLAP model (siren.text.TextEncoder.clap)")
            crop, step = frames_of(crop_s), frames_of(crop_step_s)
            crop_keys = {i: crops_key(keys[i], r.caption, clap.id, crop, step) for i, r in good}
            crop_todo = {crop_keys[i]: (r, keys[i], sha[keys[i]]) for i, r in good
                         if not cached(cache_path(out, "crops", crop_keys[i]))}
            if crop_todo:
                t = time.perf_counter()
                score_crop_tables(crop_todo, out, clap, audio, crop, step, progress)
                rep.crops_scored, rep.crops_seconds = len(crop_todo), time.perf_counter() - t

        # 4. what this shard holds, for the index step.
        entries = []
        for i, r in good:
            with open_entry(cache_path(out, "codes", keys[i])) as f:
                real, chunks = f.get_tensor("real_frames").tolist(), f.get_tensor("chunks").tolist()
                frames = f.get_slice("codes").get_shape()[-1]
            entries.append({"row": i, "id": r.id, "caption": r.caption, "label": r.label, "audio": str(r.audio),
                            **source[i], "codes": keys[i], "text": tkeys[i], "frames": frames, "real_frames": real,
                            "chunks": chunks})
            if i in crop_keys:
                c = load_file(cache_path(out, "crops", crop_keys[i]))
                entries[-1]["crop_filter"] = [{"crop_frames": crop, "offsets": c["offsets"].tolist(),
                                               "clap": cl.tolist(), "energy_db": db.tolist()}
                                              for cl, db in zip(c["clap"], c["energy_db"])]
        write_json(shard_path(out, split, shard, num_shards),
                   {**_header(codec, text_encoder, audio, text_dtype, manifest, manifest_sha),
                    "shard": shard, "num_shards": num_shards, "entries": entries,
                    "bad": [{"row": i, "id": mine_row.id, "reason": bad[i]} for i, mine_row in mine if i in bad]})
        rep.seconds = time.perf_counter() - t0
        return rep


def prepare(manifest: str | Path, out: str | Path, *, codec, text_encoder, split: str | None = None,
            audio: AudioConfig = AudioConfig(), text_dtype: str = "float16", num_shards: int = 1,
            shard: int | None = None, batch_size: int = 1, text_batch_size: int = 32, on_error: str = "stop",
            progress: bool = True, crop_s: float = 0.0, crop_step_s: float = 0.5) -> PrepareReport:
    """Prepare one manifest (one split). ``shard=None``: every shard in this process, then the index;
    ``shard=i``: only that shard (run ``write_index`` once all are done)."""
    manifest = Path(manifest).resolve()
    rows = read_manifest(manifest)
    split = split or manifest.stem
    kw = dict(codec=codec, text_encoder=text_encoder, audio=audio, text_dtype=text_dtype, num_shards=num_shards,
              batch_size=batch_size, text_batch_size=text_batch_size, on_error=on_error, manifest=manifest,
              manifest_sha=sha256(manifest.read_bytes()), progress=progress, crop_s=crop_s,
              crop_step_s=crop_step_s)
    if shard is not None:
        return prepare_shard(rows, out, split, shard=shard, **kw)
    total = PrepareReport(split)
    for s in range(num_shards):
        r = prepare_shard(rows, out, split, shard=s, **kw)
        for f in ("rows", "codes_encoded", "codes_cached", "text_encoded", "text_cached", "seconds", "text_seconds",
                  "codes_seconds", "audio_seconds", "crops_scored", "crops_seconds"):
            setattr(total, f, getattr(total, f) + getattr(r, f))
        total.bad += r.bad
    write_index(out, split, num_shards)
    return total


def _models(cfg: PrepareConfig):
    from siren.frontends import build_codec, build_text
    from siren.runtime import resolve_device

    device = resolve_device(cfg.device)
    # the demo CLAP's text tower regenerates and checks its seeded base: ~7 s on 2 cores before the first bar
    log.info("building the codec (%s) and text encoder (%s) on %s ...", cfg.codec.weights, cfg.text.weights, device)
    return build_codec(cfg.codec, device), build_text(cfg.text, device)


def _splits(cfg: PrepareConfig) -> list[tuple[Path, str]]:
    if cfg.manifest == "demo":
        from siren.data.demo import demo_set

        demo = demo_set(Path(cfg.out) / "demo_source", cfg.demo_seed, cfg.demo_train, cfg.demo_test)
        return [(demo.train, "train"), (demo.test, "test")]
    if not cfg.manifest:
        raise DataError("manifest=<path to .csv/.jsonl> (or manifest=demo) is required")
    return [(Path(cfg.manifest), cfg.split or Path(cfg.manifest).stem)]


def _worker(cfg: PrepareConfig, splits: list[tuple[Path, str]], shards: list[int], num_shards: int,
            threads: int | None = None) -> list[str]:
    """Encode ``shards`` of every split with one codec and text encoder; report lines."""
    if threads:  # a spawned worker process (workers > 1): the command's log format and warning filters too
        from siren import cli

        cli.setup_logging()
        torch.set_num_threads(threads)
    codec, text_encoder = _models(cfg)
    return [f"shard {s} of {num_shards}: {_run_shard(cfg, m, split, codec, text_encoder, s, num_shards)}"
            for s in shards for m, split in splits]


def _run_shard(cfg, manifest, split, codec, text_encoder, shard, num_shards) -> PrepareReport:
    return prepare(manifest, cfg.out, codec=codec, text_encoder=text_encoder, split=split, audio=cfg.audio,
                   text_dtype=cfg.text_dtype, num_shards=num_shards, shard=shard, batch_size=cfg.batch_size,
                   text_batch_size=cfg.text_batch_size, on_error=cfg.on_error, crop_s=cfg.crop_s,
                   crop_step_s=cfg.crop_step_s)


def parse(args: Sequence[str]) -> PrepareConfig:
    defaults = []
    if "manifest=demo" in args:
        from siren.data.demo import AUDIO

        defaults = [f"{k}={v}" for k, v in AUDIO.items()]  # explicit audio.* arguments still win
    cfg = load_config(PrepareConfig, args, defaults=defaults)
    if not cfg.out:
        raise DataError("out=<prepared directory> is required")
    check_folder(cfg.out, "out")
    if cfg.step not in ("all", "index"):
        raise DataError(f"step must be 'all' or 'index', got '{cfg.step}'")
    return cfg


def run(cfg: PrepareConfig) -> list[Path]:
    """What ``python -m siren.data.prepare`` does: encode the shards (all, or ``cfg.shard``), then write
    the index of every split; returns the index paths (none when one shard of several was encoded)."""
    t0 = time.perf_counter()
    splits = _splits(cfg)
    if cfg.step == "all":  # a wrong path or a malformed row is named now, not after the models load (minutes)
        for manifest, _ in splits:
            read_manifest(manifest)
    n = max(cfg.num_shards, cfg.workers) if cfg.shard < 0 else cfg.num_shards
    if cfg.step == "all" and cfg.shard >= 0:  # one job-array element
        for line in _worker(cfg, splits, [cfg.shard], n):
            log.info(line)
        log.info("shard %d of %d done; after every shard: python -m siren.data.prepare %s %s num_shards=%d step=index",
                 cfg.shard, n, shlex.quote("manifest=" + cfg.manifest), shlex.quote("out=" + cfg.out), n)
        return []
    if cfg.step == "all" and cfg.workers > 1:  # worker w takes shards w, w + workers, ...
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        w, threads = cfg.workers, max(1, (os.cpu_count() or 1) // cfg.workers)
        with ProcessPoolExecutor(w, mp_context=mp.get_context("spawn")) as ex:
            for lines in ex.map(_worker, [cfg] * w, [splits] * w, [list(range(i, n, w)) for i in range(w)],
                                [n] * w, [threads] * w):
                for line in lines:
                    log.info(line)
    elif cfg.step == "all":
        for line in _worker(cfg, splits, list(range(n)), n):
            log.info(line)
    indexes = [write_index(cfg.out, split, n, manifest) for manifest, split in splits]
    log.info("done in %.1f s", time.perf_counter() - t0)
    return indexes


def main(argv: Sequence[str] | None = None) -> int:
    from siren import cli

    for path in run(parse(cli.start(argv))):
        idx = json.loads(path.read_text())
        # a text entry records "demo", a codec entry the whole label: say each part's label
        shown = {k: mode_words("demo", k) if mode_of(idx[k]["weights"]) == "demo" else idx[k]["weights"]
                 for k in ("codec", "text")}
        warn = [f"{k} weights are {w if w.startswith(FILE_LABEL) else w.upper()}" for k, w in shown.items()
                if w != "pretrained"]
        print(f"{path}: {idx['num_items']} items, {len(idx['skipped'])} skipped; codec {idx['codec']['id']}, "
              f"text {idx['text']['id']}" + (f" ({'; '.join(warn)})" if warn else ""))
    return 0


if __name__ == "__main__":
    from siren.cli import run as run_cli

    run_cli(main, PrepareConfig, __doc__)
