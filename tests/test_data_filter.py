"""The data engine's filter (siren.data.filter, appendix A) and the stage-1 crop filter (siren.data.crops, appendix B).

Random CLAP weights for the mechanics: the scores carry no meaning, so those checks are each against an
independent computation (numpy percentiles, ``Clap.score`` on crops the test cuts itself). One test runs the
demo CLAP on held-out clips and checks the filter keeps matching captions and rejects mismatched ones.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import siren  # noqa: F401  (HF offline)
from siren.codec import HOP
from siren.config import ConfigError
from siren.data import DataError, PreparedDataset, activity, demo
from siren.data import filter as filt
from siren.data.audio import AudioConfig, load_audio, standardize
from siren.data.prepare import prepare
from siren.errors import ManifestError
from siren.io import sha256_file
from siren.text import TextConfig, TextEncoder
from tests.fixtures_clap import random_clap
from tests.fixtures_data import write_manifest, write_wav
from tests.fixtures_model import demo_codec

SR = 16_000


@pytest.fixture(scope="module")
def clap():
    return random_clap(0)


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- activity SNR

def test_snr_is_the_frame_energy_percentile_ratio():
    rng = np.random.default_rng(0)
    amps = rng.uniform(0.01, 0.5, 40)  # 40 frames of constant amplitude: frame energy = amp^2 exactly
    wav = torch.from_numpy(np.repeat(amps, HOP))
    e = amps ** 2
    expect = 10 * np.log10((np.percentile(e, 95) + 1e-10) / (np.percentile(e, 10) + 1e-10))
    assert activity.snr_db(wav) == pytest.approx(expect, rel=1e-9)
    noise = torch.from_numpy(rng.standard_normal(SR)).float() * 0.1
    burst = torch.cat([noise[:SR // 4], torch.zeros(3 * SR // 4)])
    assert activity.snr_db(noise) < 6 < activity.snr_db(burst)  # stationary noise: no activity; a burst: activity


@pytest.mark.parametrize("n", [3 * HOP + 1, 40 * HOP + 7, 5 * HOP])
def test_snr_of_a_steady_clip_is_zero_at_any_length(n):
    """Every frame of a constant signal has the same energy, the last partial one too (its real samples
    only): averaged with padding zeros, 3 frames + 1 sample read as 5.2 dB of activity."""
    assert activity.snr_db(torch.full((n,), 0.1, dtype=torch.float64)) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- the filter CLI

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """9 rows: 7 demo clips (6 with events, the steady engine; two with extra candidate captions), white noise
    and a missing file."""
    root = tmp_path_factory.mktemp("filter_src")
    rows = []
    for i in (0, 4, 5, 6, 7, 8, 2):
        x, caption = demo.clip(i, "train", 0)
        write_wav(root / f"{i}.wav", x[:SR])
        row = {"id": f"c{i}", "audio": f"{i}.wav", "caption": caption, "label": demo.CLASSES[i].name}
        if i in (4, 7):
            row.update(caption_2="a quiet room with nobody in it", caption_3=demo.clip(i + 1, "train", 0)[1])
        rows.append(row)
    write_wav(root / "noise.wav", 0.1 * np.random.default_rng(1).standard_normal(SR))
    rows += [{"id": "noise", "audio": "noise.wav", "caption": "static noise"},
             {"id": "gone", "audio": "missing.wav", "caption": "a file that is not there"}]
    return write_manifest(root / "clips.csv", rows, ("id", "audio", "caption", "label", "caption_2", "caption_3"))


def cli(clap, monkeypatch, *args):
    monkeypatch.setattr(filt, "build_clap", lambda cfg: clap)  # one random CLAP per module, not one per call
    filt.main(["weights=random", "audio.policy=crop", "audio.duration_s=1.0", *args])


@pytest.fixture(scope="module")
def scored(tmp_path_factory, clips, clap):
    out = tmp_path_factory.mktemp("filter_out")
    with pytest.MonkeyPatch.context() as mp:
        cli(clap, mp, f"manifest={clips}", f"out={out}", "tau=-1", "rl_top=2")
    return out


def test_scores_are_clap_cosines_of_the_cut_clip(scored, clips, clap):
    scores = {r["id"]: r for r in rows_of(scored / "scores.csv")}
    assert scores["gone"]["error"].startswith("unreadable") and scores["gone"]["clap"] == ""
    for r in rows_of(clips):
        if r["id"] == "gone":
            continue
        wav = load_audio(clips.parent / r["audio"])[:SR]
        s = scores[r["id"]]
        cands = {c: r[c] for c in ("caption", "caption_2", "caption_3") if r.get(c)}
        direct = {c: float(clap.score(wav[None], [t])[0]) for c, t in cands.items()}
        for c, v in direct.items():
            assert float(s[f"clap_{c}"]) == pytest.approx(v, abs=1e-5)
        best = max(direct, key=direct.get)
        assert s["caption_column"] == best and s["caption"] == cands[best]  # the best candidate is kept
        assert float(s["snr_db"]) == pytest.approx(activity.snr_db(wav), abs=1e-4)
    assert float(scores["noise"]["snr_db"]) < 6 < float(scores["c0"]["snr_db"])  # white noise vs barks


def test_counts_add_up_and_rl_is_the_top(scored, clips, clap, monkeypatch):
    scores = {r["id"]: r for r in rows_of(scored / "scores.csv")}
    clean = sorted(float(r["clap"]) for r in scores.values() if r["clap"] and float(r["snr_db"]) > 6)
    tau = clean[len(clean) // 3]  # a threshold inside the observed scores: some kept, some rejected
    cli(clap, monkeypatch, f"manifest={clips}", f"out={scored}", "step=select", f"tau={tau}", "rl_top=2",
        "train_n=1", "seed=3")
    rl, train, rej = (rows_of(scored / f) for f in ("rl_prompts.csv", "train.csv", "rejected.csv"))
    ids = [r["id"] for r in rl + train + rej]
    assert sorted(ids) == sorted(scores) and len(ids) == len(set(ids))  # each row in exactly one file
    kept = sorted((i for i, r in scores.items() if r["clap"] and float(r["snr_db"]) > 6 and float(r["clap"]) >= tau),
                  key=lambda i: -float(scores[i]["clap"]))
    assert [r["id"] for r in rl] == kept[:2] and len(train) == 1 and train[0]["id"] in kept[2:]
    reasons = {r["id"]: r["reason"] for r in rej}
    assert reasons["gone"].startswith("unreadable") and "snr" in reasons["noise"]
    assert sum(r.startswith("not drawn") for r in reasons.values()) == len(kept) - 3
    report = json.loads((scored / "report.json").read_text())
    counts = report["counts"]
    assert counts["input"] == len(scores) == counts["rl_prompts"] + counts["train"] + counts["rejected"]
    assert report["weights"] == "random" and (scored / "scores.png").stat().st_size > 0
    again = filt.read_items(scored / "train.csv")  # the outputs are manifests for prepare
    assert again[0].row.caption == train[0]["caption"]


def test_presets(scored, clips, clap, monkeypatch, tmp_path):
    active = sum(1 for r in rows_of(scored / "scores.csv") if r["snr_db"] and float(r["snr_db"]) > 6)
    for preset, expect_train_n in (("siren-1.6b", 100_000), ("siren-3.1b", 0)):
        cli(clap, monkeypatch, f"manifest={clips}", f"out={scored}", "step=select", f"select={preset}", "tau=-1",
            f"select_out={tmp_path / preset}")  # one folder per collection
        report = json.loads((tmp_path / preset / "report.json").read_text())
        assert report["preset"] == preset and report["selection"]["train_n"] == expect_train_n
        assert report["selection"]["tau"] == -1  # an explicit key after the preset wins
        # fewer kept pairs than either preset's RL top-1k: everything kept is an RL prompt, no one is "not drawn"
        assert report["counts"]["rl_prompts"] == active and report["counts"]["train"] == 0
    with pytest.raises(ConfigError, match="Valid select presets"):
        filt.parse(["select=siren-9b"])
    # preset= alone (a key --help lists) selected at tau 0.4 and report.json named the 3.1B collection (0.35)
    with pytest.raises(ConfigError, match=r"preset=siren-3.1b: preset is recorded by select=NAME .*; give "
                                          r"select=siren-3.1b"):
        filt.parse(["preset=siren-3.1b"])


def test_second_run_computes_nothing_and_reads_no_audio_file(scored, clips, clap, monkeypatch, capsys):
    """...nor reads an audio file it hashed before, unchanged since (each run read and hashed them all: hours over
    the data engine's millions of clips); the ledger of its first run says which (siren.data.cache.HashLedger)."""
    from siren.data import cache as layout

    reads = []

    def spy(path, mode="r", *args, **kwargs):
        if str(path).endswith(".wav"):
            reads.append(path)
        return open(path, mode, *args, **kwargs)

    read_bytes = Path.read_bytes

    def spy_path(self):
        if self.suffix == ".wav":
            reads.append(self)
        return read_bytes(self)

    monkeypatch.setattr(layout, "open", spy, raising=False)  # where sources are read
    monkeypatch.setattr(Path, "read_bytes", spy_path)  # how it read them before
    cli(clap, monkeypatch, f"manifest={clips}", f"out={scored}")
    out = capsys.readouterr().out
    assert "audio 0 embedded, 8 cached; captions 0 embedded," in out and "1 unreadable" in out
    assert reads == []


def test_a_run_stopped_part_way_scores_every_clip_as_the_uninterrupted_one(tmp_path, scored, clips, clap,
                                                                           monkeypatch):
    """CLAP's embedding of a clip moves in its last bits with its batch: a rerun after a kill embedded only the
    missing clips, batched anew, and scored them otherwise (1e-7), changing scores.csv's bytes. A cache entry cut
    short was a SafetensorError traceback. Now the batches are the shard's rows by position, each embedded whole."""
    import shutil

    out = tmp_path / "again"
    shutil.copytree(scored, out)
    audio = sorted((out / "clap_audio").rglob("*.safetensors"))
    for p in audio[:5]:  # as a kill part way through leaves them (which ones: any)
        p.unlink()
    audio[5].write_bytes(audio[5].read_bytes()[:100])  # and one cut short by a node crash
    text = sorted((out / "clap_text").rglob("*.safetensors"))
    text[0].unlink()
    text[1].write_bytes(b"")
    cli(clap, monkeypatch, f"manifest={clips}", f"out={out}", "tau=-1", "rl_top=2")
    for f in ("shards/shard-0-of-1.json", "scores.csv"):
        assert (out / f).read_bytes() == (scored / f).read_bytes(), f


def test_shards_then_select_equal_one_run(tmp_path, scored, clips, clap, monkeypatch):
    out = tmp_path / "sharded"
    for k in (0, 1, 2):
        cli(clap, monkeypatch, f"manifest={clips}", f"out={out}", "num_shards=3", f"shard={k}")
        if k == 0:
            with pytest.raises(DataError, match=r"shard\(s\) \[1, 2\] of 3 are not scored yet"):
                cli(clap, monkeypatch, f"manifest={clips}", f"out={out}", "num_shards=3", "step=select")
    # a second copy of a shard (a wrong shard= on an array), or of a selection into one folder: refused
    from siren.lock import LockHeld, hold

    with hold(out / "shards" / "shard-1-of-3.lock", "the filter's shard 1 of 3", "wait"):
        with pytest.raises(LockHeld, match=r"shard-1-of-3\.lock: held by the filter's shard 1 of 3 "):
            cli(clap, monkeypatch, f"manifest={clips}", f"out={out}", "num_shards=3", "shard=1")
    args = ["tau=-1", "rl_top=2", "train_n=2", "seed=5"]
    with hold(out / "select.lock", "the filter's select step", "wait"):
        with pytest.raises(LockHeld, match=r"select\.lock: held by the filter's select step .*give this one select_"):
            cli(clap, monkeypatch, f"manifest={clips}", f"out={out}", "num_shards=3", "step=select", *args)
    cli(clap, monkeypatch, f"manifest={clips}", f"out={out}", "num_shards=3", "step=select", *args)
    cli(clap, monkeypatch, f"manifest={clips}", f"out={scored}", "step=select", *args)
    for f in ("rl_prompts.csv", "train.csv", "rejected.csv", "scores.csv"):
        a, b = rows_of(out / f), rows_of(scored / f)
        assert [(r["id"], r.get("caption")) for r in a] == [(r["id"], r.get("caption")) for r in b]
        for ra, rb in zip(a, b):  # batches differ (3 shards vs 1): equal up to float rounding
            for k in ra:
                if k.startswith(("clap", "snr")) and ra[k]:
                    assert float(ra[k]) == pytest.approx(float(rb[k]), abs=1e-5)
    # a select killed part way leaves no report.json (the one there described the former selection's CSVs) and
    # the former four CSVs whole: they were written in turn, so a kill at the third left two new ones beside them
    from siren.data import filter_select

    real = filter_select.csv_text

    def killed_at_train_csv(rows, columns):  # the third table (train.csv, then rejected.csv) is not written
        if columns == [*filter_select.COLUMNS, "reason"]:
            raise KeyboardInterrupt
        return real(rows, columns)

    names = ("rl_prompts.csv", "train.csv", "rejected.csv", "scores.csv")
    former = {f: (out / f).read_bytes() for f in names}
    assert json.loads((out / "report.json").read_text())["sha256"] == {f: sha256_file(out / f) for f in names}
    monkeypatch.setattr(filter_select, "csv_text", killed_at_train_csv)
    with pytest.raises(KeyboardInterrupt):
        cli(clap, monkeypatch, f"manifest={clips}", f"out={out}", "num_shards=3", "step=select", "tau=0.99")
    assert not (out / "report.json").exists()
    assert {f: (out / f).read_bytes() for f in former} == former and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(filter_select, "csv_text", real)  # tau=0.99 selects otherwise: the test can tell
    cli(clap, monkeypatch, f"manifest={clips}", f"out={out}", "num_shards=3", "step=select", "tau=0.99")
    assert (out / "rl_prompts.csv").read_bytes() != former["rl_prompts.csv"]


def test_demo_clap_keeps_each_clips_own_caption_and_rejects_other_classes(tmp_path, capsys):
    """With the demo CLAP the filter does the data engine's job on held-out clips: offered another class's caption
    and its own, it keeps its own, and the other class's caption alone would fall under tau 0.4 (measured on
    2026-12-06: 14 of 15 and 15 of 15; the demo CLAP's class top-1 over all 15 captions is 0.90-0.94)."""
    rows, n = [], len(demo.CLASSES)
    for i in range(n):
        x, own = demo.clip(i, "test", 0)
        write_wav(tmp_path / f"{i}.wav", x)
        rows.append({"id": f"c{i}", "audio": f"{i}.wav", "caption": demo.clip((i + 1) % n, "test", 0)[1],
                     "caption_2": own})
    manifest = write_manifest(tmp_path / "pairs.csv", rows, ("id", "audio", "caption", "caption_2"))
    filt.main(["weights=demo", "audio.policy=crop", "audio.duration_s=1.0", f"manifest={manifest}",
               f"out={tmp_path / 'out'}", "min_snr_db=-100", "rl_top=0"])
    scores = rows_of(tmp_path / "out" / "scores.csv")
    picked_own = sum(r["caption_column"] == "caption_2" for r in scores)
    other_under_tau = sum(float(r["clap_caption"]) < 0.4 for r in scores)
    assert picked_own >= n - 2 and other_under_tau >= n - 2, (picked_own, other_under_tau)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["weights"] == "demo"
    assert "CLAP: demo weights (trained on the embedded set)" in capsys.readouterr().out  # the demo's full label
    assert report["counts"]["rejected_by"]["clap"] == sum(float(r["clap"]) < 0.4 for r in scores)


def test_a_nan_clap_score_is_rejected_not_ranked_among_the_rl_prompts():
    # `score < tau` is False for NaN: the pair was kept and broke the top-k sort (a 0.5 went to train)
    from siren.data.filter_select import select

    recs = [{"id": f"c{i}", "audio": f"{i}.wav", "label": "", "captions": {"caption": f"x{i}", "caption_2": "y"},
             "clap": {"caption": s, "caption_2": float("nan")}, "snr_db": 20.0}
            for i, s in enumerate([0.5, float("nan"), 0.45, 0.6])]
    rl, train, rejected = select(recs, tau=0.4, min_snr_db=6.0, rl_top=2, train_n=0, seed=0)
    assert [r["id"] for r in rl] == ["c3", "c0"] and [r["id"] for r in train] == ["c2"]
    assert [(r["id"], r["reason"]) for r in rejected] == [("c1", "clap score is not a number")]
    assert rl[1]["caption_column"] == "caption"  # the NaN column never wins over a number


def test_candidate_captions_csv_and_jsonl(tmp_path):
    rows = [{"id": "a", "audio": "a.wav", "caption": "one", "caption_10": "ten", "caption_2": "two"},
            {"id": "b", "audio": "b.wav", "caption": "only", "caption_10": "", "caption_2": ""}]
    csv_items = filt.read_items(write_manifest(tmp_path / "m.csv", rows, ("id", "audio", "caption_10", "caption",
                                                                          "caption_2")))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v}) + "\n" for r in rows))
    for items in (csv_items, filt.read_items(tmp_path / "m.jsonl")):
        assert [it.captions for it in items] == [(("caption", "one"), ("caption_2", "two"), ("caption_10", "ten")),
                                                 (("caption", "only"),)]


def test_the_activity_filter_applies_to_video_derived_rows_where_a_video_column_says_which(tmp_path):
    """Appendix A: "for video-derived audio ... SNR > 6 dB". It dropped every steady clip (rain, engines, sirens)
    of every source; a video column limits it to the rows marked true (without one, every row, as before)."""
    from siren.data.filter_select import select

    rows = [{"id": "yt", "audio": "a.wav", "caption": "rain", "video": "true"},
            {"id": "clotho", "audio": "b.wav", "caption": "rain", "video": "no"}]
    items = filt.read_items(write_manifest(tmp_path / "m.csv", rows, ("id", "audio", "caption", "video")))
    assert [it.video for it in items] == [True, False]
    assert [it.video for it in filt.read_items(write_manifest(tmp_path / "n.csv", rows, ("id", "audio", "caption")))
            ] == [True, True]
    recs = [{"id": it.row.id, "audio": "x.wav", "label": "", "captions": {"caption": "rain"}, "clap": {"caption": 0.5},
             "snr_db": 1.0, "video": it.video} for it in items]
    _, train, rejected = select(recs, tau=0.4, min_snr_db=6.0, rl_top=0, train_n=0, seed=0)
    assert [r["id"] for r in train] == ["clotho"] and [r["reason"] for r in rejected] == ["snr 1.00 dB <= 6"]
    write_manifest(tmp_path / "m.csv", [{**rows[0], "video": "maybe"}], ("id", "audio", "caption", "video"))
    with pytest.raises(ManifestError, match=r"m\.csv:2: video='maybe'; .* true/false, 1/0 or yes/no"):
        filt.read_items(tmp_path / "m.csv")
    (tmp_path / "m.jsonl").write_text(json.dumps({**rows[0], "caption_2": "a\nb"}) + "\n")  # broke train.csv
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: caption_2 'a\\nb' contains a line break"):
        filt.read_items(tmp_path / "m.jsonl")


def test_config_errors():
    with pytest.raises(ConfigError, match="segment"):
        filt.parse(["manifest=x.csv", "audio.policy=segment"])
    with pytest.raises(ConfigError, match="unknown config key 'threshold'"):
        filt.parse(["threshold=0.3"])


# ---------------------------------------------------------------- crop filter (appendix B)

@pytest.fixture(scope="module")
def half_silent(tmp_path_factory, clap):
    """One 2 s item: 1 s of sound, then 1 s of digital silence; prepared with 0.5 s crops every 0.24 s."""
    root = tmp_path_factory.mktemp("crops")
    x, caption = demo.clip(2, "train", 0)  # the engine: sound throughout its first second
    sound = np.resize(x, SR)
    write_wav(root / "half.wav", np.concatenate([sound, np.zeros(SR)]))
    m = write_manifest(root / "train.csv", [{"id": "half", "audio": "half.wav", "caption": caption}])
    codec = demo_codec()
    text = TextEncoder(TextConfig(weights="random", seed=0), clap=clap)
    prepare(m, root / "out", codec=codec, text_encoder=text, audio=AudioConfig("crop", 2.0), progress=False,
            crop_s=0.5, crop_step_s=0.24)
    return root, caption


def crop_energy(root, start: int) -> float:
    wav, _, _ = standardize(load_audio(root / "half.wav"), AudioConfig("crop", 2.0))
    return float(wav[0, start * HOP:(start + 25) * HOP].pow(2).mean())


def test_crop_table_is_clap_of_the_crops(half_silent, clap):
    root, caption = half_silent
    ds = PreparedDataset(root / "out", "train", crop_s=0.5)
    table = ds.items[0]["crop_filter"]
    assert table["offsets"] == [0, 12, 24, 36, 48, 60, 72, 75]  # 100 frames, crops of 25, grid of 12, last flush
    wav = load_audio(root / "half.wav")
    crops = torch.stack([wav[o * HOP:(o + 25) * HOP] for o in table["offsets"]])
    np.testing.assert_allclose(table["clap"], clap.score(crops, [caption] * len(crops)).numpy(), atol=1e-5)


def test_half_silent_item_never_yields_a_silent_crop(half_silent):
    root, _ = half_silent
    starts = {PreparedDataset(root / "out", "train", crop_s=0.5).crop_start(e, 0) for e in range(200)}
    assert any(crop_energy(root, s) == 0 for s in starts)  # unfiltered: silent crops do occur
    table = PreparedDataset(root / "out", "train", crop_s=0.5).items[0]["crop_filter"]
    for thr in (1e-6, float(np.median(table["clap"])), 0.99):  # some, about half, or no offsets pass CLAP
        ds = PreparedDataset(root / "out", "train", crop_s=0.5, crop_min_clap=thr)
        starts = [ds.crop_start(e, 0) for e in range(200)]
        assert all(crop_energy(root, s) > 0 for s in starts)
        passing = {o for o, c in zip(table["offsets"], table["clap"]) if c > thr and crop_energy(root, o) > 0}
        if passing:  # 1e-6 and the median: every draw among the passing offsets, none a fallback
            assert set(starts) <= passing and ds.fallbacks == 0, thr
        else:  # 0.99: every draw falls back
            assert thr == 0.99 and ds.fallbacks == 200


def test_fallback_is_counted_and_logged(half_silent, caplog):
    root, _ = half_silent
    with caplog.at_level(logging.WARNING, logger="siren.data.dataset"):
        ds = PreparedDataset(root / "out", "train", crop_s=0.5, crop_min_clap=0.99)  # random CLAP's cosines: none pass
        table = ds.items[0]["crop_filter"]
        starts = {ds.crop_start(e, 0) for e in range(5)}
    loud = [(c, o) for o, c in zip(table["offsets"], table["clap"]) if crop_energy(root, o) > 0]
    assert starts == {max(loud)[1]} and ds.fallbacks == 5
    # logged once, when the dataset is built: a per-draw warning came back every epoch (workers made anew)
    assert [r.message for r in caplog.records if "best offset" in r.message] == [
        f"crop filter (CLAP > 0.99, not silent): 0 of {sum(len(it['crop_filter']['offsets']) for it in ds.items)} "
        f"crop offsets pass; {len(ds.items)} of {len(ds.items)} items have none and use their best offset"]


def test_crop_filter_needs_prepared_scores(half_silent):
    root, _ = half_silent
    with pytest.raises(DataError, match="crop_s=0.3"):
        PreparedDataset(root / "out", "train", crop_s=0.3, crop_min_clap=0.2)


def test_crop_filter_reaches_the_continuous_family_and_needs_crops(half_silent):
    """family=continuous dropped train.crop_min_clap (its dataset was built without it), and crop_s=0 (whole
    clips) left it unused: the filter asked for was not applied, and nothing said so."""
    from siren.data.latents import LatentDataset
    from siren.train_config import TrainConfig

    root, _ = half_silent
    with pytest.raises(DataError, match="crop_s=0.3"):  # it checks the prepared scores like the codes' dataset
        LatentDataset(root / "out", "train", 0.3, 0, "pca-x", crop_min_clap=0.2)
    ds = LatentDataset(root / "out", "train", 0.5, 0, "pca-x", crop_min_clap=0.99)
    table = ds.items[0]["crop_filter"]
    best = max((c, o) for o, c in zip(table["offsets"], table["clap"]) if crop_energy(root, o) > 0)[1]
    assert [ds.crop_start(e, 0) for e in range(3)] == [best] * 3 and ds.fallbacks == 3  # nothing passes 0.99
    with pytest.raises(ConfigError, match="crop_min_clap=0.2 filters crops, but train.crop_s=0"):
        TrainConfig(crop_s=0, crop_min_clap=0.2)


def test_filtered_crops_of_a_padded_item_end_in_its_real_audio(caplog):
    # policy=pad: the crop table's offsets run over the whole padded item; a crop drawn past the real frames
    # trained on fewer than crop_s frames (the zeros are masked), and the fallback could pick one there
    from siren.data import PreparedDataset

    ds = PreparedDataset.__new__(PreparedDataset)  # the drawing alone, on a hand-made index entry
    offsets = list(range(0, 401, 25))
    table = {"crop_frames": 100, "offsets": offsets, "clap": [0.5] * len(offsets), "energy_db": [0.0] * len(offsets)}
    ds.items = [{"id": "a", "frames": 500, "real_frames": 200, "crop_filter": table}]
    ds._real_frames = np.array([200])  # as the constructor reads it from the items
    ds.crop, ds.seed, ds.crop_min_clap, ds.fallbacks = 100, 0, 0.2, 0
    assert {ds.crop_start(e, 0) for e in range(60)} == {0, 25, 50, 75, 100}  # room: 200 real - 100 = 100
    table["clap"] = [0.1] * len(offsets)
    table["clap"][12] = 0.15  # the best offset (300) lies in the padding
    table["clap"][2] = 0.12
    assert ds.crop_start(0, 0) == 50 and ds.fallbacks == 1  # the best of those inside
    # the log at build counts the offsets crop_start can draw: with every passing one in the padding, the item has
    # none (it said "0 items have none", and the item fell back every epoch)
    table["clap"] = [0.1] * 5 + [0.5] * (len(offsets) - 5)  # pass only from offset 125 on, past the room of 100
    with caplog.at_level(logging.WARNING, logger="siren.data.dataset"):
        ds._check_crop_filter(ds.items, "prep", "train")
    assert "0 of 5 crop offsets pass; 1 of 1 items have none" in caplog.text


# ---------------------------------------------------------------- segments as files (appendix A, first step)

def test_segments_are_the_recording_cut_in_place(tmp_path, caplog):
    from siren.data.segment import segment

    rng = np.random.default_rng(0)
    sound = (0.3 * rng.standard_normal((3, SR))).clip(-1, 1)
    x = np.concatenate([sound[0], np.zeros(SR), sound[2], sound[1][:SR // 2]])  # 3.5 s: sound, silence, sound, half
    write_wav(tmp_path / "long.wav", x)
    write_wav(tmp_path / "silent.wav", np.zeros(SR))
    write_wav(tmp_path / "short.wav", sound[0][: SR * 3 // 10])  # 0.3 s: shorter than one segment
    m = write_manifest(tmp_path / "raw.csv", [{"id": "rec1", "audio": "long.wav", "caption": "noise"},
                                              {"id": "quiet", "audio": "silent.wav", "caption": "nothing"},
                                              {"id": "brief", "audio": "short.wav", "caption": "a blip"}])
    dest, written, skipped = segment(m, tmp_path / "seg", duration_s=1.0, progress=False)
    rows = rows_of(dest)
    assert [r["id"] for r in rows] == ["rec1#0", "rec1#2", "brief"]  # the silent second, the 0.5 s residual dropped
    # the short file at its own length: padded with zeros, it passed the activity filter and trained on the zeros
    brief, _ = sf_read(dest.parent / rows[2]["audio"])
    assert np.array_equal(brief, sf_read(tmp_path / "short.wav")[0])
    rows = rows[:2]
    original, _ = sf_read(tmp_path / "long.wav")
    for r, k in zip(rows, (0, 2)):
        seg, sr = sf_read(dest.parent / r["audio"])
        assert sr == SR and np.array_equal(seg, original[k * SR:(k + 1) * SR])
    # the silent second was left out without a word: it is listed beside the unusable file
    assert written == 3 and [(s["id"], s["reason"]) for s in skipped][0] == ("rec1#1", "silent segment (left out)")
    assert [s["id"] for s in skipped][1:] == ["quiet"]
    assert segment(m, tmp_path / "seg", duration_s=1.0, progress=False)[1] == 0  # a re-run writes nothing
    # another duration_s into the same folder: the first run's files stay in audio/ beside the new ones, said
    with caplog.at_level(logging.WARNING):
        segment(m, tmp_path / "seg", duration_s=0.5, progress=False)
    # (the 1 s run's rec1#2: at 0.5 s segment 2 is silent, left out; files of ids in both are rewritten)
    assert "1 file(s) in " in caplog.text and "not in this run's segments.csv (an earlier run's, e.g. rec1_2-" \
        in caplog.text
    segment(m, tmp_path / "seg", duration_s=1.0, progress=False)  # back: the 0.5 s ones are the stale ones now
    assert [it.row.id for it in filt.read_items(dest)] == ["rec1#0", "rec1#2", "brief"]  # a manifest the filter reads
    # a row id that is another row's segment id: the second overwrote the first's file, in silence
    first = (dest.parent / rows[0]["audio"]).read_bytes()
    m2 = write_manifest(tmp_path / "raw2.csv", [{"id": "rec1", "audio": "long.wav", "caption": "noise"},
                                                {"id": "rec1#0", "audio": "short.wav", "caption": "a blip"}])
    with pytest.raises(DataError, match="segment id rec1#0 is both segment 0 of row rec1 and row rec1#0"):
        segment(m2, tmp_path / "seg", duration_s=1.0, progress=False)
    assert (dest.parent / rows[0]["audio"]).read_bytes() == first
    # a rerun with nothing to list: the former run's skipped.csv named files since mended
    mended = write_manifest(tmp_path / "mended.csv", [{"id": "brief", "audio": "short.wav", "caption": "a blip"}])
    assert (tmp_path / "seg" / "skipped.csv").is_file()
    assert segment(mended, tmp_path / "seg", duration_s=1.0, progress=False)[2] == []
    assert not (tmp_path / "seg" / "skipped.csv").exists()


def sf_read(path):
    import soundfile as sf

    return sf.read(str(path), dtype="int16")


def test_select_refuses_shards_scored_from_another_manifest_and_names_a_damaged_one(tmp_path, clips, clap,
                                                                                    monkeypatch):
    """step=select wrote the shards' captions and scores under an edited manifest's name (a caption fixed after
    scoring came out as the former one); a damaged shard record was a traceback."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(clips.parent, src)
    manifest, out = src / clips.name, tmp_path / "out"
    cli(clap, monkeypatch, f"manifest={manifest}", f"out={out}", "tau=-1", "rl_top=2")
    manifest.write_text(manifest.read_text().replace("static noise", "static hiss"))
    with pytest.raises(DataError, match=r"shards were scored from another manifest .* run the filter on it without "
                                        r"step=select"):
        cli(clap, monkeypatch, f"manifest={manifest}", f"out={out}", "step=select", "tau=-1", "rl_top=2")
    cli(clap, monkeypatch, f"manifest={manifest}", f"out={out}", "tau=-1", "rl_top=2")  # scored again: selected
    assert "static hiss" in (out / "rejected.csv").read_text() + (out / "train.csv").read_text()
    shard = out / "shards" / "shard-0-of-1.json"
    shard.write_text(shard.read_text()[:200])
    with pytest.raises(DataError, match=r"shard-0-of-1\.json: not readable JSON .*score shard 0 again"):
        cli(clap, monkeypatch, f"manifest={manifest}", f"out={out}", "step=select", "tau=-1", "rl_top=2")


def test_segment_names_its_own_duration_key():
    # "audio.duration_s must be ..." named prepare's key, which segment refuses as unknown
    from siren.config import load_config
    from siren.data.segment import SegmentConfig

    with pytest.raises(ConfigError, match=r"^duration_s must be at least one codec frame \(0.02 s\)"):
        load_config(SegmentConfig, ["duration_s=0"])
