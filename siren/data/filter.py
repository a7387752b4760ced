"""The data engine's filter (appendix A): CLAP text-audio score and acoustic activity per clip, then selection.

    python -m siren.data.filter manifest=clips.csv out=FILT select=siren-1.6b          # score + select
    python -m siren.data.filter manifest=clips.csv out=FILT num_shards=64 shard=$SLURM_ARRAY_TASK_ID
    python -m siren.data.filter manifest=clips.csv out=FILT num_shards=64 step=select select=siren-3.1b select_out=S31
    python -m siren.data.filter manifest=demo out=FILT select=siren-1.6b rl_top=10 weights=demo
    (``manifest=demo`` also sets ``audio.policy=crop audio.duration_s=2.0`` unless given.)

Per manifest row: the clip is loaded and cut as ``prepare`` cuts it (``audio.*``, one item per row), its
activity SNR is estimated (siren/data/activity.py) and its CLAP audio embedding and every candidate
caption's text embedding are computed with ``siren.clap.Clap`` (the CLAP score of eval and the
stage-2 reward: resample to 48 kHz, 16-bit, first 10 s, repeat-pad the real samples, no zero padding).
The score of a caption is the cosine of the two embeddings; the best candidate is kept and recorded.

Several captions per clip (the paper generates five with Qwen2-Audio and polishes them with an LLM):
the manifest's ``caption`` column plus any number of ``caption_<k>`` columns (``caption_2 .. caption_5``);
an empty cell means no candidate. The activity filter is the paper's "for video-derived audio": with an
optional ``video`` column (true/false, 1/0, yes/no) it applies to the rows marked true only; without one,
to every row. ``train.csv`` and ``rl_prompts.csv`` carry the chosen caption in
``caption`` and its column in ``caption_column``, so they are manifests for ``prepare`` and ``siren.rl``.

Caches (content-addressed, like prepare; keys in siren/data/cache.py): the audio entry (embedding +
SNR) by (audio bytes, ``audio.*`` policy, CLAP id, estimator), the text entry by (caption, CLAP id);
a re-run, another threshold or another shard count computes nothing already computed.
Selection and outputs: siren/data/filter_select.py.
"""
from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from siren.config import load_config
from siren.data import activity
from siren.data.audio import AudioConfig, load_audio, standardize
from siren.data.cache import HashLedger, cache_path, cached, clap_audio_key, clap_text_key, filter_shard_path, sha256
from siren.data.manifest import Row, check_one_line, read_manifest, read_records
from siren.data.prepare import shard_rows
from siren.errors import AudioError, ConfigError, DataError, ManifestError
from siren.io import check_folder, save_tensors, write_json
from siren.lock import hold

log = logging.getLogger(__name__)

PRESETS = {"select": {
    # tau 0.4 -> the 1.6B collection (117k pairs): the top 1k are the stage-2 prompts, 100k at random stage 1
    "siren-1.6b": {"preset": "siren-1.6b", "tau": 0.4, "rl_top": 1000, "train_n": 100_000},
    # tau 0.35 -> 436k pairs for the 3.1B model: the union of the 1.6B set and 320k moderately aligned pairs
    "siren-3.1b": {"preset": "siren-3.1b", "tau": 0.35, "rl_top": 1000, "train_n": 0},
}}
STEPS = ("all", "select")


@dataclass
class FilterConfig:
    manifest: str = ""  # CSV/JSONL: id, audio, caption[, caption_2 ..][, label]; or "demo" (the embedded train set)
    out: str = ""  # caches, shard records and the outputs
    audio: AudioConfig = field(default_factory=AudioConfig)  # how prepare will cut the clips (policy pad|crop)
    weights: str = "pretrained"  # CLAP weights (siren.clap.ClapConfig.weights): pretrained | demo | random | a .pt path
    clap_seed: int = 0  # random-init seed for weights=random
    num_shards: int = 1
    shard: int = -1  # >= 0: score only this shard (one job-array element); then step=select once all are done
    step: str = "all"  # all: score every shard (or `shard`), then select; select: merge the shards and select only
    batch_size: int = 16  # clips per CLAP audio call
    device: str = "auto"  # auto: cuda when available, else cpu
    preset: str = ""  # set by select=siren-1.6b | siren-3.1b only (recorded in report.json)
    tau: float = 0.4  # keep pairs with CLAP score >= tau
    min_snr_db: float = 6.0  # keep clips with activity SNR > this (paper: 6 dB)
    rl_top: int = 1000  # the highest-scoring kept pairs become the stage-2 prompts (rl_prompts.csv)
    train_n: int = 0  # stage-1 items drawn at random from the other kept pairs; 0 = all of them
    seed: int = 0  # of the train_n draw
    demo_seed: int = 0  # manifest=demo only
    select_out: str = ""  # where the selection's files go (default: out); one per preset keeps both collections

    def __post_init__(self):
        if self.step not in STEPS:
            raise ConfigError(f"step must be one of {', '.join(STEPS)}, got '{self.step}'")
        if self.num_shards < 1 or not -1 <= self.shard < self.num_shards:
            raise ConfigError(f"need num_shards >= 1 and shard in [0, num_shards) (or -1: every shard), got "
                              f"num_shards={self.num_shards}, shard={self.shard}")
        if self.audio.policy == "segment":
            raise ConfigError("audio.policy=segment: the filter scores one item per manifest row (appendix A "
                              "captions each 10 s segment); cut the files into segments first, or use pad/crop")
        for k in ("batch_size",):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("rl_top", "train_n", "demo_seed", "seed"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
        if not -1 <= self.tau <= 1:
            raise ConfigError(f"tau is a cosine threshold in [-1, 1], got {self.tau}")


@dataclass(frozen=True)
class Item:
    row: Row
    captions: tuple[tuple[str, str], ...]  # (column, caption) candidates, `caption` first
    video: bool = True  # video-derived audio: the activity (SNR) filter applies (appendix A)


VIDEO_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def caption_columns(columns: Sequence[str]) -> list[str]:
    """``caption`` then the ``caption_<k>`` columns by k."""
    extra = [c for c in columns if c.startswith("caption_") and c[len("caption_"):].isdigit()]
    return ["caption", *sorted(extra, key=lambda c: int(c[len("caption_"):]))]


def read_items(path: str | Path) -> list[Item]:
    """Manifest rows with their candidate captions (module docstring)."""
    rows = read_manifest(path)  # validates id/audio/caption, unique ids
    columns, records = read_records(Path(path).expanduser().resolve())
    cols = caption_columns(columns if Path(path).suffix == ".csv" else {k for _, r in records for k in r})
    items = []
    for row, (n, rec) in zip(rows, records):
        cands = [(c, str(rec.get(c) or "").strip()) for c in cols]
        for c, t in cands:
            check_one_line(t, f"{path}:{n}: {c}")
        video = str(rec.get("video", "true")).strip().lower()
        if video not in VIDEO_VALUES:
            raise ManifestError(f"{path}:{n}: video={rec.get('video')!r}; the video column marks video-derived "
                                f"audio (the activity filter applies to it): true/false, 1/0 or yes/no")
        items.append(Item(row, tuple((c, t) for c, t in cands if t), VIDEO_VALUES[video]))
    return items


@dataclass
class ScoreReport:
    rows: int = 0
    audio_embedded: int = 0  # clips run through CLAP's audio branch in this call
    audio_cached: int = 0
    text_embedded: int = 0  # distinct captions run through CLAP's text branch in this call
    text_cached: int = 0
    bad: int = 0
    seconds: float = 0.0
    audio_seconds: float = 0.0  # load + cut + SNR + embed + save, over the clips embedded

    def __str__(self) -> str:
        per = f", {self.audio_seconds / self.audio_embedded:.3f} s per clip" if self.audio_embedded else ""
        return (f"{self.rows} rows: audio {self.audio_embedded} embedded, {self.audio_cached} cached; captions "
                f"{self.text_embedded} embedded, {self.text_cached} cached; {self.bad} unreadable; "
                f"{self.seconds:.1f} s{per}")


def header(clap, audio: AudioConfig, manifest: Path, manifest_sha: str) -> dict:
    return {"manifest": str(manifest), "manifest_sha256": manifest_sha, "clap": clap.card(),
            "weights": clap.weights_label, "audio": audio.key(), "snr_estimator": activity.ESTIMATOR}


def score_shard(items: Sequence[Item], out: str | Path, *, clap, audio: AudioConfig | None = None,
                num_shards: int = 1, shard: int = 0, batch_size: int = 16, manifest: Path | None = None,
                manifest_sha: str = "", progress: bool = True) -> ScoreReport:
    """Score shard ``shard`` of ``num_shards`` of ``items`` into ``out`` and record it for the select step.

    ``clap`` is a ``siren.clap.Clap`` (``embed_audio``, ``embed_text``, ``id``, ``card``, ``weights_label``).
    """
    # one writer per shard, as prepare: a second copy (a wrong shard= on an array) deleted this one's record
    with hold(filter_shard_path(out, shard, num_shards).with_suffix(".lock"), f"the filter's shard {shard} of "
              f"{num_shards}", "wait for it to finish (the shards of one run take shard=0..num_shards-1)"):
        return _score_shard(items, Path(out), clap, audio or AudioConfig(), num_shards, shard, batch_size, manifest,
                            manifest_sha, progress)


def _score_shard(items, out: Path, clap, audio: AudioConfig, num_shards: int, shard: int, batch_size: int,
                 manifest: Path | None, manifest_sha: str, progress: bool) -> ScoreReport:
    t0 = time.perf_counter()
    mine = shard_rows(items, num_shards, shard)
    rep = ScoreReport(rows=len(mine))
    filter_shard_path(out, shard, num_shards).unlink(missing_ok=True)  # a failed run leaves no stale record

    # 1. audio: hash, then (uncached only) load, cut, SNR, embed; unreadable files are rejections. CLAP's embedding
    # of a clip moves in its last bits with the batch it is in: the batches are the shard's rows by position
    # (batch_size at a time), and one with any clip not cached is embedded whole, so a run stopped part way and run
    # again scores every clip as the uninterrupted run (it embedded only the missing ones, batched anew)
    akeys, hashes, bad, have = {}, {}, {}, {}

    def key_of(h: str) -> str:
        return clap_audio_key(h, audio.key(), clap.id, activity.ESTIMATOR)

    def is_cached(key: str) -> bool:  # one header read per entry (cached() opens it)
        if key not in have:
            have[key] = cached(cache_path(out, "clap_audio", key))
        return have[key]

    def clip_of(i: int, it: Item, data: bytes):
        try:
            wav, real, _ = standardize(load_audio(it.row.audio, data), audio, it.row.audio)
        except AudioError as e:
            bad[i] = f"unusable audio: {e}"
            del akeys[i]
            return None
        return wav[0, :real[0]]  # what prepare keeps, without its zero padding (CLAP repeat-pads, as in eval)

    bar = tqdm(total=len(mine), desc=f"audio shard {shard} of {num_shards}", disable=not progress, unit="clip",
               dynamic_ncols=True)
    with HashLedger(filter_shard_path(out, shard, num_shards).parent, shard, num_shards,
                    {str(it.row.audio) for _, it in mine}) as ledger:
        for b in range(0, len(mine), batch_size):
            batch, read = mine[b:b + batch_size], {}
            for i, it in batch:  # an unchanged file already embedded is not read again
                try:
                    h, st, read[i] = ledger.lookup(it.row.audio, lambda h: not is_cached(key_of(h)))
                except OSError as e:
                    bad[i] = f"unreadable: {it.row.audio}: {e.strerror or 'cannot read'}"
                    continue
                ledger.put(it.row.audio, st, h)
                akeys[i], hashes[i] = key_of(h), h
            bar.update(len(batch))
            todo = [i for i, _ in batch if i in akeys and not is_cached(akeys[i])]
            if not todo:
                rep.audio_cached += sum(i in akeys for i, _ in batch)
                continue
            t = time.perf_counter()
            members = {}  # key -> (clip, its meta): the batch's clips, each once
            for i, it in batch:
                if i not in akeys or akeys[i] in members:
                    continue
                if read[i] is None:  # cached, but in a batch embedded again: read for the batch's sake
                    h, st, read[i] = ledger.lookup(it.row.audio, lambda h: True)
                    if key_of(h) != akeys[i]:
                        raise DataError(f"{it.row.audio}: changed while this shard was scored; run it again")
                clip = clip_of(i, it, read[i])
                if clip is not None:
                    members[akeys[i]] = (clip, {"clap_id": clap.id, "audio_sha256": hashes[i],
                                                "source": str(it.row.audio)})
            if members:
                embs = clap.embed_audio([c for c, _ in members.values()], batch_size=len(members)).float().cpu()
                for (key, (clip, meta)), e in zip(members.items(), embs):
                    if not is_cached(key):
                        have[key] = True
                        save_tensors(cache_path(out, "clap_audio", key),
                                     {"embedding": e, "snr_db": torch.tensor(activity.snr_db(clip))}, meta)
            rep.audio_embedded += len(members)  # run through CLAP's audio branch (a cached one again for its batch)
            rep.audio_cached += sum(i in akeys for i, _ in batch) - len(members)
            rep.audio_seconds += time.perf_counter() - t
    bar.close()
    rep.bad = len(bad)

    # 2. text: every distinct candidate caption, embedded 64 at a time by position in the same way
    captions = {clap_text_key(c, clap.id): c for i, it in mine if i not in bad for _, c in it.captions}
    keys = list(captions)
    chunks = [keys[s:s + 64] for s in range(0, len(keys), 64)]
    whole = {k: cached(cache_path(out, "clap_text", k)) for k in keys}  # one header read per entry
    todo = [c for c in chunks if not all(whole[k] for k in c)]  # a chunk with one missing or cut short: again
    missing = sum(not cache_path(out, "clap_text", k).is_file() for c in todo for k in c)
    rep.text_embedded, rep.text_cached = missing, len(captions) - missing
    for chunk in tqdm(todo, desc="captions", disable=not progress or not todo, unit="batch"):
        for k, e in zip(chunk, clap.embed_text([captions[k] for k in chunk]).float().cpu()):
            if not whole[k]:  # the chunk's others are kept as they are
                save_tensors(cache_path(out, "clap_text", k), {"embedding": e},
                             {"clap_id": clap.id, "caption": captions[k]})

    # 3. the shard's record: SNR and every candidate's score per row
    records = []
    for i, it in mine:
        rec = {"row": i, "id": it.row.id, "audio": str(it.row.audio), "label": it.row.label, "video": it.video}
        if i in bad:
            records.append({**rec, "error": bad[i]})
            continue
        a = load_file(cache_path(out, "clap_audio", akeys[i]))
        text = {c: load_file(cache_path(out, "clap_text", clap_text_key(t, clap.id)))["embedding"]
                for c, t in it.captions}
        scores = {c: float(a["embedding"] @ e) for c, e in text.items()}  # cosine: both L2-normalised
        records.append({**rec, "snr_db": float(a["snr_db"]), "captions": dict(it.captions), "clap": scores})
    write_json(filter_shard_path(out, shard, num_shards),
               {**header(clap, audio, manifest, manifest_sha), "shard": shard, "num_shards": num_shards,
                "records": records})
    rep.seconds = time.perf_counter() - t0
    return rep


def manifest_path(cfg: FilterConfig) -> Path:
    if cfg.manifest == "demo":
        from siren.data.demo import make_demo

        return make_demo(Path(cfg.out) / "demo_source", seed=cfg.demo_seed)
    if not cfg.manifest:
        raise ConfigError("manifest=<path to .csv/.jsonl> (or manifest=demo) is required")
    return Path(cfg.manifest).expanduser().resolve()


def build_clap(cfg: FilterConfig):
    from siren.clap import Clap, ClapConfig

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    return Clap(ClapConfig(weights=cfg.weights, seed=cfg.clap_seed)).to(device)


def parse(argv: Sequence[str]) -> FilterConfig:
    args = list(argv)
    given = [a for a in args if a.split("=", 1)[0] == "preset"]
    if given:  # the name goes with the preset's values: preset=siren-3.1b alone labelled a selection at tau 0.4
        raise ConfigError(f"{given[0]}: preset is recorded by select=NAME ({', '.join(PRESETS['select'])}), which "
                          f"also sets that preset's tau, rl_top and train_n; give select={given[0].split('=', 1)[1]}")
    defaults = []
    if "manifest=demo" in args:
        from siren.data.demo import AUDIO

        defaults = [f"{k}={v}" for k, v in AUDIO.items()]  # explicit audio.* arguments still win
    cfg = load_config(FilterConfig, args, presets=PRESETS, defaults=defaults)
    for key in ("out", "select_out"):
        check_folder(getattr(cfg, key), key)
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    from siren import cli
    from siren.data.filter_select import run_select

    cfg = parse(cli.start(argv))
    if not cfg.out:
        raise ConfigError("out=<output directory> is required")
    t0 = time.perf_counter()
    manifest = manifest_path(cfg)
    if cfg.step == "all":
        items = read_items(manifest)
        clap = build_clap(cfg)
        if clap.weights_label == "random":
            log.warning("CLAP weights are RANDOM: the scores carry no signal (mechanics only)")
        sha = sha256(manifest.read_bytes())
        for s in [cfg.shard] if cfg.shard >= 0 else range(cfg.num_shards):
            rep = score_shard(items, cfg.out, clap=clap, audio=cfg.audio, num_shards=cfg.num_shards, shard=s,
                              batch_size=cfg.batch_size, manifest=manifest, manifest_sha=sha)
            print(f"shard {s} of {cfg.num_shards}: {rep}")
        if cfg.shard >= 0:
            print(f"after every shard: python -m siren.data.filter {shlex.quote('manifest=' + cfg.manifest)} "
                  f"{shlex.quote('out=' + cfg.out)} num_shards={cfg.num_shards} step=select [select=... tau=...]")
            return
    print(run_select(cfg, manifest))
    log.info("done in %.1f s", time.perf_counter() - t0)


if __name__ == "__main__":
    from siren import cli

    cli.run(main, FilterConfig, __doc__, presets=PRESETS)
