"""The `ckpt=` path of eval/audiocaps.py: generate one clip per reference caption with a trained run.

Batched and seeded (Algorithm 2 via siren.sample), resumable (clips already written are kept),
optionally with CLAP-score reject sampling (N candidates per caption, the best kept, as the paper
does following GenAU), and timed like Table 1's #Gen. Time (one batch, on the device named).
A model that cannot generate (non-finite logits, or most samples collapsing onto one code per
layer) is reported as `itg` with the reason, as the paper prints it, never written as audio.

A resumed run keeps only clips made as it would make them: ``<out_dir>/generation.json`` records the
model's weights, length, seed, sampling and candidates, and each id's caption and clip sha256; clips made
otherwise (another run, ``seconds=``, ``caption_index=``, a file replaced by hand, ...) are an error naming
the difference, never reused.
"""
from __future__ import annotations

import contextlib
import logging
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import siren
from siren.codec import FRAME_RATE, SAMPLE_RATE
from siren.data.manifest import child_path
from siren.demo_weights import mode_of, tensors_sha256
from siren.errors import ConfigError
from siren.frontends import run_frontends
from siren.io import atomic_path, read_json, sha256, sha256_file, write_json
from siren.model.continuous import ContinuousLM, decode_latent
from siren.run_dir import read_run_config, reward_model, trained_frames, warn_if_past_trained
from siren.runtime import code_version, derive_seed
from siren.sample import SampleConfig, generate_with_info

log = logging.getLogger(__name__)

RECORD = "generation.json"  # in the clips' folder: how they were made (check_record)
COLLAPSE_ITG = 0.5  # a set where at least this fraction of its samples collapsed cannot generate (itg)


class CannotGenerate(RuntimeError):
    """The paper's `itg`: the model produced no usable audio; the message says why."""


def write_clip(path: str | Path, wav) -> None:
    """A mono clip [samples] as a 32-bit float WAV at 16 kHz: soundfile's FLOAT subtype's chunks (fmt, fact, data)
    without the PEAK chunk libsndfile adds, whose time stamp gave the same samples other bytes (and another sha256
    in the record) on every run."""
    data = np.ascontiguousarray(np.asarray(wav, dtype=np.float32).reshape(-1), dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, SAMPLE_RATE, 4 * SAMPLE_RATE, 4, 32)  # IEEE float, 1 channel, 4-byte frames
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<II", 4, len(data) // 4)
            + b"data" + struct.pack("<I", len(data)) + data)
    Path(path).write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def made_with(run_dir: str | Path) -> dict[str, str]:
    """The weights modes of what made a run's clips besides the model itself: its codec and text encoder (the run
    config) and, for a stage-2 run, its reward model (alignment.json). Scored by pretrained metric networks, clips
    of a demo- or RANDOM-weights part are not a pretrained result (eval.card.weights_label)."""
    cfg = read_run_config(run_dir)
    modes = {k: w for k in ("codec", "text") if (w := (cfg.get(k) or {}).get("weights"))}
    align = Path(run_dir) / "alignment.json"
    if align.is_file():
        reward = (read_json(align, "run stage 2 again").get("weights_labels") or {}).get("reward")
        if reward and reward != "synthetic":  # a code-matching test reward has no weights
            modes["reward"] = reward
    return {k: mode_of(w) for k, w in modes.items()}


def generate_set(run_dir: str | Path, ids: list[str], captions: list[str], out_dir: str | Path, *, seconds: float,
                 batch_size: int, seed: int, sample: SampleConfig, candidates: int = 1, clap=None,
                 device: str = "cpu", started: Callable[[], None] | None = None) -> dict:
    """Write <out_dir>/<id>.wav for every id; returns the generation card (what, how, how long).
    ``clap``: a built siren.clap.Clap that scores the candidates (``candidates > 1``) and serves as the
    text encoder's CLAP when it has the run's text weights. ``started``: called once the clips already there are
    found to be this call's own (check_record), before anything is written."""
    out_dir = Path(out_dir)
    paths = [child_path(out_dir, id_, ".wav") for id_ in ids]  # before anything is built or written
    out_dir.mkdir(parents=True, exist_ok=True)
    model = siren.load(run_dir, device)
    if isinstance(model, ContinuousLM) and (sample.top_k or sample.top_p):
        # they filter a distribution over codes; recorded on the card, they would claim a setting never applied
        raise ConfigError(f"sample.top_k={sample.top_k} / sample.top_p={sample.top_p}: {run_dir} is a "
                          f"continuous-token model (paper/003), whose diffusion head has no codes to filter; "
                          f"leave both 0 (sample.temperature scales its noise)")
    if not isinstance(model, ContinuousLM) and sample.diffusion_steps:
        raise ConfigError(f"sample.diffusion_steps={sample.diffusion_steps}: {run_dir} is an RVQ-code model; the "
                          f"key is for continuous-token models (paper/003); leave it 0")
    if isinstance(model, ContinuousLM) and sample.diffusion_steps > model.cfg.train_steps:
        raise ConfigError(f"sample.diffusion_steps={sample.diffusion_steps} exceeds the {model.cfg.train_steps} "
                          f"diffusion steps {run_dir} was trained with: sampling respaces them, it cannot add any")
    sampled = {k: v for k, v in vars(sample).items() if k != "diffusion_steps"}
    if isinstance(model, ContinuousLM):  # the steps it samples with: the model's own where the key is 0
        sampled["diffusion_steps"] = sample.diffusion_steps or model.cfg.sample_steps
    n_frames = max(1, round(seconds * FRAME_RATE))
    if candidates > 1 and clap is None:
        raise ConfigError("candidates > 1 (CLAP reject sampling) needs a CLAP model to score the candidates")
    # batch_size too: a batch shares one generator, seeded by its first row, so it decides the draws
    settings = {"weights_sha256": tensors_sha256(model.state_dict()), "n_frames": n_frames, "seed": seed,
                "sample": sampled, "candidates": candidates, "batch_size": batch_size,
                # a generator draws other numbers on another device type; the scorer picks among the candidates
                "device": torch.device(device).type, "scorer": clap.id if candidates > 1 else None}
    # The set's own batches: a clip's draws depend on its batch's first position (the seed) and on its companions
    # (one generator per batch), so a kept clip must have been made in the batch it is in now
    batches = [range(s, min(s + batch_size, len(ids))) for s in range(0, len(ids), batch_size)]
    batch_of = {}
    for rows in batches:  # [first position, size, digest of its ids]: a record line per clip stays short
        key = [rows[0], len(rows), sha256("\n".join(ids[j] for j in rows))[:16]]
        batch_of.update({ids[i]: key for i in rows})
    record = check_record(out_dir, run_dir, settings, dict(zip(ids, captions)),
                          {i: p for i, p in zip(ids, paths) if p.is_file()}, batch_of, started)
    # what made them, for a later gen_dir= evaluation of this folder (its card says so; the reward model marks
    # "reward = metric" even once the run is moved or deleted)
    record.update(frontends_weights=made_with(run_dir), reward_model=reward_model(run_dir), code_version=code_version())
    write_json(out_dir / RECORD, record)
    collapsed = record["collapsed"]  # written back with the record; may hold other sets' ids (counted below: not)
    in_set = set(ids)
    # itg once the samples collapsed reach COLLAPSE_ITG of the whole set's (counted with the clips written by an
    # earlier call): decided as soon as it is certain, so on the same samples whatever the batches' order
    samples = candidates * len(ids)

    def check_collapse() -> None:
        n = sum(v for i, v in collapsed.items() if i in in_set)
        if n >= COLLAPSE_ITG * samples:
            raise CannotGenerate(f"{n} of the set's {samples} samples collapsed (every RVQ "
                                 f"layer repeats one code for all {n_frames} frames)")

    check_collapse()
    warn_if_past_trained(run_dir, n_frames, "eval")
    # The set's own batches, not those of the clips still missing: a run stopped part way through a batch
    # draws that batch again whole, with the same seed and companions, so every clip is the one the
    # uninterrupted run writes (only the missing ones are written).
    todo = [rows for rows in batches if not all(paths[i].is_file() for i in rows)]
    if todo:  # a resumed set with every clip there builds no codec or text encoder
        text, codec = run_frontends(read_run_config(run_dir), device, where=str(run_dir), clap=clap)
    batch_times, written = [], 0
    for rows in tqdm(todo, desc="generate", unit="batch", disable=not todo):
        caps = [captions[i] for i in rows]
        states = text.encode(caps)
        t0 = time.perf_counter()
        best_wav, best_score, batch_collapsed = None, None, torch.zeros(len(rows), dtype=torch.long)
        for c in range(candidates):
            try:  # seeded by the batch's first row in the set (see ``batches``)
                if isinstance(model, ContinuousLM):  # paper/003: tokens -> DAC latent -> the same DAC decoder
                    tokens = model.generate(states.states, states.mask, n_frames, temperature=sample.temperature,
                                            steps=sampled["diffusion_steps"],
                                            seed=derive_seed(seed, c, rows[0]), cached=sample.cached)
                    wav = decode_latent(codec, model.decode(tokens)).float().cpu()
                else:
                    codes, info = generate_with_info(model, states, n_frames, sample,
                                                     seed=derive_seed(seed, c, rows[0]))
                    batch_collapsed += info.collapsed.cpu().long()
                    wav = codec.decode(codes).float().cpu()
            except FloatingPointError as e:
                raise CannotGenerate(str(e)) from None
            if candidates == 1:
                best_wav = wav
                break
            score = clap.score(wav, caps, sample_rate=SAMPLE_RATE).cpu()
            if best_wav is None:
                best_wav, best_score = wav, score
            else:
                better = score > best_score
                best_wav[better], best_score[better] = wav[better], score[better]
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        batch_times.append(time.perf_counter() - t0)
        collapsed.update({ids[i]: int(n) for i, n in zip(rows, batch_collapsed)})
        check_collapse()
        # the batch's clips are recorded before any is renamed into place: a job killed between the two leaves
        # recorded clips missing (their batch is drawn again whole, to the same bytes: write_clip has no time
        # stamp), never a clip there unrecorded. Once per batch: the record holds every clip's hash, and written
        # once per clip it was rewritten N times over (~110 s for 4.9k clips)
        fresh = [(i, w) for i, w in zip(rows, best_wav) if not paths[i].is_file()]
        with contextlib.ExitStack() as renames:
            for i, w in fresh:
                tmp = renames.enter_context(atomic_path(paths[i]))
                write_clip(tmp, w.numpy())
                record["sha256"][ids[i]] = sha256_file(tmp)
            write_json(out_dir / RECORD, record)  # with the collapse counts of this batch, for a resume
        written += len(fresh)
    return {"run_dir": str(Path(run_dir).resolve()), "weights_sha256": settings["weights_sha256"],
            "frontends_weights": record["frontends_weights"], "seconds": seconds, "n_frames": n_frames,
            "trained_frames": trained_frames(run_dir),
            "batch_size": batch_size, "seed": seed, "sample": sampled, "candidates": candidates,
            "reject_sampling": "CLAP score, best of candidates" if candidates > 1 else "none",
            "generated_now": written, "collapsed": sum(v for i, v in collapsed.items() if i in in_set),
            "device": _device_name(device),
            "gen_time_s_per_batch": (sum(batch_times) / len(batch_times)) if batch_times else None,
            # not Table 1's #Gen. Time when reranking: each batch is generated, decoded and scored N times
            "gen_time_includes": (f"{candidates} candidates each generated, decoded and CLAP-scored"
                                  if candidates > 1 else "generation and decoding")}


def not_as_recorded(record: dict, clips: dict[str, Path]) -> list[str]:
    """The ids of ``clips`` whose file is not the bytes ``record`` (a generation.json) lists for them."""
    return [i for i, p in clips.items() if record["sha256"].get(i) != sha256_file(p)]


def record_card(gen_dir: Path, clips: dict[str, Path]) -> dict:
    """A gen_dir= folder's card entries from the record the harness's generation left there (none for clips made
    otherwise): the run, its weights' hash and the modes of its codec, text encoder and reward; or, where a clip
    scored (``clips``, by id) is not the bytes the record lists (replaced, edited, or put there by hand since),
    a note saying the record does not apply: it credited a run with clips that were no longer its own."""
    if not (gen_dir / RECORD).is_file():
        return {}
    record = read_json(gen_dir / RECORD, f"delete it if {gen_dir}'s clips were not made by this harness")
    if "sha256" in record:  # a record before 2026-12-06 has none: its clips are taken as found (as check_record)
        other = not_as_recorded(record, clips)
        if other:
            note = (f"{len(other)} of {len(clips)} clip(s) are not the bytes {RECORD} records (e.g. {other[0]}): "
                    f"replaced or edited since, or not made by {record.get('run_dir')}; its run is not credited")
            log.warning("%s: %s", gen_dir, note)
            return {"record": note}
    settings = record.get("settings") or {}
    picked = (settings.get("candidates") or 1) > 1  # reject-sampled: by which model, for the reward = metric mark
    return {k: v for k, v in {"run_dir": record.get("run_dir"), "made_by": record.get("made_by"),
                              "weights_sha256": settings.get("weights_sha256"),
                              "candidates": settings.get("candidates") if picked else None,
                              "scorer": settings.get("scorer") if picked else None,
                              "frontends_weights": record.get("frontends_weights"),
                              "code_version": record.get("code_version")}.items() if v} | (
        {"reward_model": record["reward_model"]} if "reward_model" in record else {})  # {}: a stage-1 run's clips


LATER_KEYS = ("device", "scorer")  # recorded since 2026-12-06: a record without them is taken to match


def check_record(out_dir: Path, run_dir: str | Path, settings: dict, captions: dict[str, str],
                 existing: dict[str, Path], batch_of: dict[str, list] | None = None,
                 started: Callable[[], None] | None = None) -> dict:
    """Refuse to resume into ``out_dir`` when clips there were made otherwise (module docstring) or are not the
    bytes written (replaced or edited since: each clip's sha256 is recorded); then record how this call makes
    them (before any clip is written), and return that record. ``existing``: the clips there, by id; the record's
    "collapsed": how many of each one's candidates collapsed, as recorded when it was written. ``batch_of``: each
    id's batch now (its first position in the set, its size, a digest of its ids): a clip made in another batch
    (a ``subset=`` run, or a manifest reordered or extended since) was drawn with another seed or companions.
    ``started``: called once the check has passed, before the record is written."""
    path = out_dir / RECORD
    fix = f"delete {out_dir} (or the clips in it) to generate again, or choose another out="
    record = read_json(path, fix) if path.is_file() and existing else None
    if record is None and existing:
        raise ConfigError(f"{out_dir} holds {len(existing)} clip(s) (e.g. {next(iter(existing.values()))}) but no "
                          f"{RECORD}, so how they were made is unknown; {fix}")
    if record is not None:
        had = {k: v for k, v in settings.items() if k in LATER_KEYS} | record["settings"]  # older records lack them
        diff = [f"{k}={had.get(k)!r} there, {v!r} now" for k, v in settings.items() if had.get(k) != v]
        changed = [i for i in existing if record["captions"].get(i) != captions[i]]
        if changed:
            diff.append(f"{len(changed)} clip(s) made for another caption (e.g. {changed[0]}: "
                        f"{record['captions'].get(changed[0])!r} there, {captions[changed[0]]!r} now)")
        moved = [i for i in existing if batch_of and i in record.get("batch_of", {})
                 and record["batch_of"][i] != batch_of[i]]
        if moved:  # a record before 2026-12-07 has no batch_of: nothing moved
            was, now = record["batch_of"][moved[0]], batch_of[moved[0]]
            diff.append(f"{len(moved)} clip(s) made in another batch of the set (e.g. {moved[0]}: in the batch at "
                        f"position {was[0]} of {was[1]} clip(s) there, at {now[0]} of {now[1]} now, or with other "
                        f"companions: another subset= or order)")
        if "sha256" in record:  # a record before 2026-12-06 has none: its clips are taken as found
            edited = not_as_recorded(record, existing)
            if edited:
                diff.append(f"{len(edited)} clip(s) not the bytes generated (e.g. {existing[edited[0]]}: replaced or "
                            f"edited since, or put there by hand)")
        if diff:
            raise ConfigError(f"{out_dir} holds clips generated otherwise (by {record.get('run_dir')}): "
                              f"{'; '.join(diff)}; {fix}")
    # what is recorded of this set's clips that are gone is dropped (they are made again); other ids' entries stay,
    # for a later call on them (a subset= run into the folder of a whole set)
    def still(entries: dict) -> dict:
        return {i: v for i, v in entries.items() if i in existing or i not in captions}

    old = record or {}
    kept = old.get("sha256") or {i: sha256_file(p) for i, p in existing.items()}  # older records: as found
    record = {"run_dir": str(Path(run_dir).resolve()), "settings": settings,
              "captions": {**old.get("captions", {}), **captions}, "collapsed": still(old.get("collapsed", {})),
              "sha256": still(kept), "batch_of": {**still(old.get("batch_of", {})), **(batch_of or {})}}
    if started:  # the clips there are this call's own: from here on it writes
        started()
    write_json(path, record)
    return record


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"
