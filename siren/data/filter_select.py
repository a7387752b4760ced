"""Selection and outputs of the data engine's filter (siren/data/filter.py); builds no model.

Every manifest row ends in exactly one of three files:
  rl_prompts.csv  the ``rl_top`` kept pairs with the highest CLAP score, highest first (stage-2 prompts)
  train.csv       the other kept pairs, or ``train_n`` of them drawn at random with ``seed`` (stage 1)
  rejected.csv    the rest, with the reason: unreadable audio, activity SNR <= min_snr_db, CLAP score
                  < tau (both listed when both fail), or kept but not drawn (train_n)
A pair is kept when SNR > min_snr_db and its best candidate caption scores >= tau. ``scores.csv`` has every
row's SNR and every candidate's score (the four written under temp names, then renamed together); ``report.json``
(deleted first, written last: the selection is whole when it is there) the counts, thresholds, the CLAP card and
each CSV's sha256;
``scores.pdf/.png`` the score and SNR histograms with the thresholds.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
from pathlib import Path

import numpy as np

from siren import demo_weights
from siren.data.cache import filter_shard_path
from siren.errors import DataError
from siren.io import atomic_path, read_json, sha256, write_json, write_text
from siren.lock import hold

log = logging.getLogger(__name__)

COLUMNS = ["id", "audio", "caption", "label", "clap", "snr_db", "caption_column"]


def merge(out: str | Path, num_shards: int) -> tuple[dict, list[dict]]:
    """The shards' records as one list in manifest order, with the header they share."""

    parts, missing = [], []
    for s in range(num_shards):
        p = filter_shard_path(out, s, num_shards)
        (parts.append(read_json(p, f"delete it and score shard {s} again (shard={s} num_shards={num_shards})"))
         if p.is_file() else missing.append(s))
    if missing:
        raise DataError(f"{out}: shard(s) {missing} of {num_shards} are not scored yet (no "
                        f"{filter_shard_path(out, missing[0], num_shards).name}); run the filter with shard=<i> "
                        f"num_shards={num_shards} for each, then step=select again")
    head = {k: v for k, v in parts[0].items() if k not in ("shard", "records")}
    for p in parts[1:]:
        diff = sorted(k for k in head if head[k] != p.get(k))
        if diff:
            raise DataError(f"{out}: shard {p['shard']} was scored with a different {diff} than shard 0; "
                            f"re-run the shards with one config")
    return head, sorted((r for p in parts for r in p["records"]), key=lambda r: r["row"])


def best_caption(rec: dict) -> tuple[str, float]:
    """The candidate column with the highest score (the first such column on ties; a NaN score never wins)."""
    col = max(rec["clap"], key=lambda c: (rec["clap"][c] if rec["clap"][c] == rec["clap"][c] else -math.inf,
                                          -list(rec["clap"]).index(c)))
    return col, rec["clap"][col]


def select(records: list[dict], *, tau: float, min_snr_db: float, rl_top: int, train_n: int, seed: int
           ) -> tuple[list[dict], list[dict], list[dict]]:
    """(rl, train, rejected) rows; every record lands in exactly one (module docstring)."""
    kept, rejected = [], []
    for r in records:
        row = {"id": r["id"], "audio": r["audio"], "label": r["label"] or ""}
        if "error" in r:
            rejected.append({**row, "caption": "", "clap": "", "snr_db": "", "caption_column": "",
                             "reason": r["error"]})
            continue
        col, score = best_caption(r)
        row.update(caption=r["captions"][col], clap=score, snr_db=r["snr_db"], caption_column=col)
        # `not x >= t`: a NaN score (an embedding that overflowed) fails the test instead of passing it and
        # breaking the top-k sort
        active = r["snr_db"] > min_snr_db or not r.get("video", True)  # appendix A: video-derived audio only
        why = ([f"snr {r['snr_db']:.2f} dB <= {min_snr_db:g}"] if not active else []) + \
              ([f"clap {score:.6f} < tau {tau:g}" if score == score else "clap score is not a number"]
               if not score >= tau else [])
        (rejected.append({**row, "reason": "; ".join(why)}) if why else kept.append(row))
    kept.sort(key=lambda r: -r["clap"])  # stable: manifest order among equal scores
    rl, rest = kept[:rl_top], kept[rl_top:]
    if train_n and len(rest) > train_n:
        pick = set(np.random.default_rng(seed).choice(len(rest), train_n, replace=False).tolist())
        rejected += [{**r, "reason": f"not drawn (train_n={train_n} of {len(rest)} kept, seed {seed})"}
                     for j, r in enumerate(rest) if j not in pick]
        rest = [r for j, r in enumerate(rest) if j in pick]
    elif train_n and len(rest) < train_n:
        log.warning("train_n=%d asked for, only %d kept pairs left after the %d RL prompts: train.csv has %d",
                    train_n, len(rest), len(rl), len(rest))
    order = {r["id"]: i for i, r in enumerate(records)}
    rest.sort(key=lambda r: order[r["id"]])
    rejected.sort(key=lambda r: order[r["id"]])
    return rl, rest, rejected


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_csv(dest: Path, rows: list[dict], columns: list[str]) -> None:
    write_text(dest, csv_text(rows, columns))


def scores_table(records: list[dict]) -> tuple[list[dict], list[str]]:
    cols = list(dict.fromkeys(c for r in records for c in r.get("clap", {})))
    rows = []
    for r in records:
        row = {"id": r["id"], "audio": r["audio"], "label": r["label"] or "", "error": r.get("error", "")}
        if "error" not in r:
            col, score = best_caption(r)
            row.update(snr_db=r["snr_db"], clap=score, caption_column=col, caption=r["captions"][col],
                       **{f"clap_{c}": r["clap"][c] for c in r["clap"]})
        rows.append(row)
    return rows, ["id", "audio", "label", "snr_db", "clap", "caption_column", "caption",
                  *(f"clap_{c}" for c in cols), "error"]


def figure(dest_dir: Path, records: list[dict], tau: float, min_snr_db: float, note: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "error" not in r]
    scores, snr = [best_caption(r)[1] for r in ok], [r["snr_db"] for r in ok]
    # one paper column (3.3 in), 7 pt text: the size analysis/style.py gives every figure
    with plt.rc_context({"font.size": 7, "axes.spines.top": False, "axes.spines.right": False,
                         "savefig.bbox": "tight", "pdf.fonttype": 42}):
        fig, (a, b) = plt.subplots(1, 2, figsize=(3.3, 1.6), layout="constrained")
        a.hist(scores, bins=40, color="0.4")
        a.axvline(tau, color="C3", lw=1, label=f"tau = {tau:g}")
        a.set(xlabel="CLAP score (best caption)", ylabel="clips")
        a.legend(frameon=False, fontsize=6)
        b.hist(snr, bins=40, color="0.4")
        b.axvline(min_snr_db, color="C3", lw=1, label=f"{min_snr_db:g} dB")
        b.set(xlabel="activity SNR (dB)")
        b.legend(frameon=False, fontsize=6)
        fig.text(0.005, -0.02, note, ha="left", va="top", fontsize=5, color="0.35", style="italic")
        out = []
        for ext in ("pdf", "png"):
            with atomic_path(dest_dir / f"scores.{ext}") as tmp:
                fig.savefig(tmp, format=ext, dpi=300)
            out.append(dest_dir / f"scores.{ext}")
        plt.close(fig)
    return out


def run_select(cfg, manifest: Path) -> str:
    """Merge the shards, select, write every output; returns the summary line."""
    out = Path(cfg.select_out or cfg.out)
    # two selections into one folder (say two tau=) wrote their CSVs in turn: a train.csv of one beside the other's
    with hold(out / "select.lock", "the filter's select step", "wait for it to finish, or give this one select_out="):
        return _select(cfg, manifest, out)


def _select(cfg, manifest: Path, out: Path) -> str:
    head, records = merge(cfg.out, cfg.num_shards)
    # the shards hold each row's caption and score: selected for a manifest edited since (a caption fixed) they
    # wrote the former captions and scores under the new file's name
    now = sha256(manifest.read_bytes())
    if head.get("manifest_sha256") != now:
        raise DataError(f"{cfg.out}: its shards were scored from another manifest ({head.get('manifest')}, sha256 "
                        f"{str(head.get('manifest_sha256'))[:12]}) than {manifest} as it is now ({now[:12]}); run "
                        f"the filter on it without step=select to score it again (audio already embedded is not)")
    rl, train, rejected = select(records, tau=cfg.tau, min_snr_db=cfg.min_snr_db, rl_top=cfg.rl_top,
                                 train_n=cfg.train_n, seed=cfg.seed)
    assert len(rl) + len(train) + len(rejected) == len(records)
    # report.json is written last and vouches for the CSVs beside it: gone while they are rewritten, so a kill
    # part way leaves no report that describes the former selection beside a new train.csv
    (out / "report.json").unlink(missing_ok=True)
    tables = {"rl_prompts.csv": (rl, COLUMNS), "train.csv": (train, COLUMNS),
              "rejected.csv": (rejected, [*COLUMNS, "reason"]), "scores.csv": scores_table(records)}
    # each written under a temp name, then the four renamed together on leaving: written in turn, a kill part way
    # left a new train.csv beside the former selection's rl_prompts.csv for seconds at AudioSet's size
    digests = {}
    with contextlib.ExitStack() as renames:
        for name, (rows, columns) in tables.items():
            text = csv_text(rows, columns)
            renames.enter_context(atomic_path(out / name)).write_text(text, encoding="utf-8")
            digests[name] = sha256(text)
    weights = head["weights"]
    words = demo_weights.mode_words(weights)
    note = (f"CLAP {head['clap']['id']}, " + ("RANDOM weights: scores carry no signal" if weights == "random"
                                                else words) + f"; {len(records)} clips")
    figs = figure(out, records, cfg.tau, cfg.min_snr_db, note)
    reasons = {"unreadable": sum(r["reason"].startswith(("unreadable", "unusable")) for r in rejected),
               "snr": sum("snr " in r["reason"] for r in rejected),
               "clap": sum("clap " in r["reason"] for r in rejected),
               "not_drawn": sum(r["reason"].startswith("not drawn") for r in rejected)}
    write_json(out / "report.json", {
        **head, "manifest_used": str(manifest), "preset": cfg.preset, "num_shards": cfg.num_shards,
        "selection": {"tau": cfg.tau, "min_snr_db": cfg.min_snr_db, "rl_top": cfg.rl_top, "train_n": cfg.train_n,
                      "seed": cfg.seed},
        "counts": {"input": len(records), "rl_prompts": len(rl), "train": len(train), "rejected": len(rejected),
                   "kept": len(rl) + len(train) + reasons["not_drawn"], "rejected_by": reasons},
        "files": {k: str(out / f) for k, f in (("train", "train.csv"), ("rl_prompts", "rl_prompts.csv"),
                                               ("rejected", "rejected.csv"), ("scores", "scores.csv"))},
        "sha256": digests,  # of the CSVs this report vouches for
        "figure": [str(p) for p in figs]})
    warn = " (CLAP weights are RANDOM: the selection is mechanics only)" if weights == "random" else ""
    return (f"{out}: {len(records)} clips -> {len(rl)} RL prompts, {len(train)} train, {len(rejected)} rejected "
            f"(unreadable {reasons['unreadable']}, snr {reasons['snr']}, clap {reasons['clap']}, not drawn "
            f"{reasons['not_drawn']}); tau {cfg.tau:g}, min_snr_db {cfg.min_snr_db:g}, CLAP: {words}{warn}")
