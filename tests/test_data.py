"""siren.data: manifests, audio loading, the demo set, prepare (caching, resume, shards) and the loader."""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import siren  # noqa: F401  (HF offline)
from siren import demo_weights
from siren.codec import Codec, CodecConfig
from siren.config import ConfigError
from siren.data import DataError, PreparedDataset, demo, make_loader
from siren.data.audio import AudioConfig, AudioError, load_audio, standardize, to_mono
from siren.data.cache import cache_path, index_path
from siren.data.index import write_index
from siren.data.manifest import read_manifest
from siren.data.prepare import main as prepare_main
from siren.data.prepare import prepare
from siren.errors import ManifestError
from siren.io import open_append, version
from siren.text import TextConfig, TextEncoder
from tests.fixtures_data import Counting, tiny_set, write_manifest, write_wav
from tests.fixtures_model import demo_codec

TINY = AudioConfig("crop", 0.4)  # tiny items keep the codec cheap


@pytest.fixture(scope="module")
def codec():
    # test_codec_change_* (as a second codec) and test_cli (the random mode) still build the paper-size random DAC
    return demo_codec()


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder(TextConfig(weights="random", seed=0))


def run(manifest, out, codec, text_encoder, **kw):
    kw.setdefault("audio", TINY)
    return prepare(manifest, out, codec=codec, text_encoder=text_encoder, progress=False, **kw)


def tmp_files(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- manifests

def test_manifest_csv_and_jsonl(tmp_path):
    write_manifest(tmp_path / "m.csv", [{"id": "a", "audio": "sub/a.wav", "caption": " A dog barks "}],
                   columns=("id", "audio", "caption"))
    (r,) = read_manifest(tmp_path / "m.csv")
    assert (r.id, r.audio, r.caption, r.label) == ("a", tmp_path / "sub/a.wav", "A dog barks", None)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "b", "audio": "/abs/b.flac", "caption": "rain",
                                                  "label": "rain"}) + "\n\n")
    (r,) = read_manifest(tmp_path / "m.jsonl")
    assert (str(r.audio), r.label) == ("/abs/b.flac", "rain")


def test_a_jsonl_id_that_is_a_fraction_or_exponent_is_refused(tmp_path):
    # str() made 1e400 the id "inf" and 1.0 the id "1.0" (a CSV's 1 stays "1"); whole numbers stay ids
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": 7, "audio": "a.wav", "caption": "x"}) + "\n"
                                      + '{"id": 1e400, "audio": "b.wav", "caption": "y"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: id is the number Infinity; give ids as strings"):
        read_manifest(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": 7, "audio": "a.wav", "caption": "x"}) + "\n")
    assert read_manifest(tmp_path / "m.jsonl")[0].id == "7"


def test_manifest_errors_name_the_file(tmp_path):
    m = write_manifest(tmp_path / "m.csv", [{"id": "a", "caption": "x"}], columns=("id", "caption"))
    with pytest.raises(ManifestError,
                       match=r"m\.csv.*missing column\(s\) audio; required columns are id, audio, caption"):
        read_manifest(m)
    m = write_manifest(tmp_path / "d.csv", [{"id": i, "audio": "x.wav", "caption": "c"} for i in "abacc"])
    with pytest.raises(ManifestError, match=r"d\.csv: duplicate id\(s\) a \(lines 2, 4\), c \(lines 5, 6\)"):
        read_manifest(m)
    m = write_manifest(tmp_path / "b.csv", [{"id": i, "audio": "x.wav", "caption": c}
                                            for i, c in (("a", "x"), ("b", ""), ("a", "y"))])
    with pytest.raises(ManifestError, match=r"b\.csv: 1 row\(s\) with empty required values: line 3: empty "
                                            r"caption; and duplicate id\(s\) a \(lines 2, 4\)"):
        read_manifest(m)  # both problems in one message
    m = write_manifest(tmp_path / "e.csv", [])
    with pytest.raises(ManifestError, match=r"e\.csv: manifest is empty"):
        read_manifest(m)
    (tmp_path / "m.txt").write_text("id,audio,caption\n")
    with pytest.raises(ManifestError, match=r"m\.txt: unknown manifest extension '\.txt'"):
        read_manifest(tmp_path / "m.txt")
    (tmp_path / "j.jsonl").write_text('{"id": "a", "audio": "a.wav", "caption": "c"}\n{"id": "b", "caption": "c"}\n')
    with pytest.raises(ManifestError, match=r"j\.jsonl: 1 line\(s\) lack required key\(s\): line 2: no audio"):
        read_manifest(tmp_path / "j.jsonl")
    m = write_manifest(tmp_path / "b.csv", [{"id": "a", "audio": "a.wav", "caption": ""}])
    with pytest.raises(ManifestError, match=r"b\.csv: 1 row\(s\) with empty required values: line 2: empty caption"):
        read_manifest(m)


# ---------------------------------------------------------------- audio

def test_audio_errors_name_the_file(tmp_path):
    cases = {
        "missing.wav": (None, "audio file not found"),
        "garbage.wav": (b"RIFF\x00\x01garbage" * 50, "unreadable audio"),
        "empty.wav": (np.zeros(0, np.float32), "empty audio"),
        "silent.wav": (np.zeros(8000, np.float32), "all-silent audio"),
        "nan.wav": (np.r_[np.full(100, 0.1), np.nan, np.full(100, 0.1)].astype(np.float32), "1 NaN/inf sample"),
    }
    for name, (content, reason) in cases.items():
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif content is not None:
            write_wav(p, content, subtype="FLOAT")
        with pytest.raises(AudioError, match=f"{name}: {reason}") as e:
            load_audio(p)
        assert "0x" not in str(e.value)  # libsndfile named the in-memory buffer by address: other bytes each run
    write_wav(tmp_path / "lowrate.wav", np.full(400, 0.1), 4000)
    with pytest.raises(AudioError, match=r"lowrate\.wav: unsupported sample rate 4000 Hz"):
        load_audio(tmp_path / "lowrate.wav")
    with pytest.raises(AudioError, match=r"x\.wav: audio has no channels"):
        to_mono(np.zeros((10, 0), np.float32), "x.wav")


@pytest.mark.parametrize("channels", [2, 5])
def test_mono_is_the_channel_mean(tmp_path, channels):
    x = np.random.default_rng(channels).uniform(-0.5, 0.5, (1600, channels)).astype(np.float32)
    write_wav(tmp_path / "m.wav", x, subtype="FLOAT")
    expected = x.astype(np.float64).sum(1) / channels  # independent of the loader's float32 mean
    np.testing.assert_allclose(load_audio(tmp_path / "m.wav").numpy(), expected, atol=1e-7)


def test_resample_keeps_frequency_and_length(tmp_path):
    sr, f, n = 44_100, 1000.0, 22_057
    write_wav(tmp_path / "s.wav", 0.5 * np.sin(2 * np.pi * f * np.arange(n) / sr), sr, subtype="FLOAT")
    y = load_audio(tmp_path / "s.wav").numpy()
    assert len(y) == math.ceil(n * 16_000 / sr)
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.fft.rfftfreq(len(y), 1 / 16_000)[spec.argmax()] - f) < 16_000 / len(y)
    mid = y[1000:-1000]  # away from the edges: a sine of amplitude 0.5 has RMS 0.5/sqrt(2)
    assert abs(np.sqrt(np.mean(mid ** 2)) - 0.5 / np.sqrt(2)) < 0.005


def test_standardize_policies():
    wav = torch.linspace(0.1, 1.0, 20_800)  # 1.3 s
    items, real, chunks = standardize(wav, AudioConfig("pad", 0.5))
    assert items.shape == (1, 8000) and real == [8000] and chunks == [-1] and torch.equal(items[0], wav[:8000])
    items, real, chunks = standardize(wav, AudioConfig("segment", 0.5))  # 2 chunks, the 0.3 s residual dropped
    assert items.shape == (2, 8000) and real == [8000, 8000] and chunks == [0, 1]
    assert torch.equal(items.flatten(), wav[:16000])
    items, real, chunks = standardize(wav, AudioConfig("pad", 2.0))  # shorter: zero-padded to 2 s
    assert items.shape == (1, 32000) and real == [20800] and items[0, 20800:].abs().sum() == 0
    items, real, chunks = standardize(wav, AudioConfig("segment", 2.0))  # shorter: zero-padded, not split
    assert items.shape == (1, 32000) and chunks == [-1]
    items, real, chunks = standardize(wav, AudioConfig("crop", 2.0))  # shorter: kept as is
    assert items.shape == (1, 20800) and real == [20800]
    quiet_start = torch.cat([torch.zeros(8000), wav])
    with pytest.raises(AudioError, match="q.wav: the first 0.5 s are silent"):
        standardize(quiet_start, AudioConfig("pad", 0.5), "q.wav")
    items, _, chunks = standardize(quiet_start, AudioConfig("segment", 0.5))  # the silent chunk 0 dropped
    assert chunks == [1, 2] and torch.equal(items.flatten(), wav[:16000])


# ---------------------------------------------------------------- demo set

def test_demo_is_deterministic_and_idempotent(tmp_path):
    a = demo.make_demo(tmp_path / "a", seed=0, n_train=1, n_test=1)
    demo.make_demo(tmp_path / "b", seed=0, n_train=1, n_test=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    wav = tmp_path / "a" / "audio" / "train" / "siren_00.wav"
    before = {f: (tmp_path / "a" / f).stat().st_mtime_ns for f in files}
    wav.write_bytes(b"edited")
    demo.make_demo(tmp_path / "a", seed=0, n_train=1, n_test=1)
    assert wav.read_bytes() == (tmp_path / "b" / "audio" / "train" / "siren_00.wav").read_bytes()
    assert all((tmp_path / "a" / f).stat().st_mtime_ns == before[f] for f in files if tmp_path / "a" / f != wav)
    rows = read_manifest(a)
    assert len({r.label for r in rows}) >= 15 and len(read_manifest(a.with_name("test.csv"))) == len(rows)
    assert all(r.caption and r.audio.is_file() for r in rows)
    other = demo.make_demo(tmp_path / "c", seed=1, n_train=1, n_test=1)
    assert (other.parent / "audio/train/siren_00.wav").read_bytes() != wav.read_bytes()


def test_demo_classes_are_distinct():
    """A nearest-class-mean probe on z-scored log-spectrum statistics separates the 15 classes of held-out clips."""
    def feat(x):
        frames = np.lib.stride_tricks.sliding_window_view(x, 512)[::256] * np.hanning(512)
        spec = np.log(np.abs(np.fft.rfft(frames)) ** 2 + 1e-8)
        spec -= spec.max()  # clip levels are random
        return np.concatenate([spec.mean(0), spec.std(0)])

    n = len(demo.CLASSES)
    train = np.stack([[feat(demo.clip(c, "train", k)[0]) for k in range(2)] for c in range(n)])
    mu, sd = train.mean((0, 1)), train.std((0, 1)) + 1e-6
    means = ((train - mu) / sd).mean(1)
    pred = [np.argmin(((means - (feat(demo.clip(c, "test", k)[0]) - mu) / sd) ** 2).sum(1))
            for c in range(n) for k in range(2)]
    acc = np.mean(np.array(pred) == np.repeat(np.arange(n), 2))
    assert acc >= 0.9, acc  # chance: 1/15


# ---------------------------------------------------------------- prepare

def test_changed_sources_names_an_audio_file_replaced_since_prepare(tmp_path, codec, text_encoder, monkeypatch):
    # prepare's caches are keyed by content, but a finished grid does not run prepare again: the check is
    # what stops a file replaced under the same path from keeping the former audio's codes (ablations.plan)
    from siren.data.index import changed_sources

    m = tiny_set(tmp_path / "src", n=3)
    run(m, tmp_path / "out", codec, text_encoder)
    assert changed_sources(tmp_path / "out", "manifest") == ([], [])
    a0 = tmp_path / "src/a0.wav"
    a0.write_bytes(a0.read_bytes())  # rewritten with the same bytes (a copy, a restore): another mtime only
    x, _ = sf.read(tmp_path / "src/a2.wav")
    write_wav(tmp_path / "src/a2.wav", 0.5 * x)
    (tmp_path / "src/a1.wav").unlink()
    assert changed_sources(tmp_path / "out", "manifest") == ([str(tmp_path / "src/a2.wav")],
                                                              [str(tmp_path / "src/a1.wav")])
    # the copy with the same bytes had its new mtime recorded: it is not hashed again, the changed file is
    import siren.data.index as P

    hashed = []
    monkeypatch.setattr(P, "sha256_file", lambda p: hashed.append(str(p)) or "other")
    assert changed_sources(tmp_path / "out", "manifest")[0] == [str(tmp_path / "src/a2.wav")]
    assert hashed == [str(tmp_path / "src/a2.wav")]


def test_the_source_check_runs_in_threads_and_keeps_each_files_answer(tmp_path):
    # the launcher checks every source of a training set from the login node, one call at a time before (a
    # network filesystem's latency each; a chmod -R hashed them all in one thread); files of every outcome,
    # more than one task's worth, in the order given
    import os

    from siren.data.index import changed_files
    from siren.io import sha256_file, version

    paths = [tmp_path / f"f{i:03d}.wav" for i in range(150)]
    for i, p in enumerate(paths):
        p.write_bytes(bytes([i]) * 100)
    records = [{"source": str(p), "source_sha256": sha256_file(p), "source_stat": version(p.stat())} for p in paths]
    records.append(dict(records[1]))  # a file two items came from (its ctime moved below): one answer for both
    for i, p in enumerate(paths):
        if i % 3 == 1:
            os.chmod(p, 0o600)  # the same bytes, a moved ctime: hashed, its new version recorded
        elif i % 3 == 2 and i % 2:
            p.write_bytes(b"other")
        elif i % 3 == 2:
            p.unlink()
    changed, gone, restated = changed_files(records, threads=4)
    assert changed == [str(p) for i, p in enumerate(paths) if i % 3 == 2 and i % 2]
    assert gone == [str(p) for i, p in enumerate(paths) if i % 3 == 2 and not i % 2] and restated
    assert all(r["source_stat"] == version(paths[i].stat()) for i, r in enumerate(records[:150]) if i % 3 == 1)
    assert records[-1]["source_stat"] == records[1]["source_stat"] == version(paths[1].stat())


def test_crop_tables_are_scored_from_the_bytes_whose_codes_they_filter(tmp_path):
    # the crop filter read the file again unchecked: one changed after its codes were made got a table of other
    # audio, cached under the former codes' key
    from siren.data.encode import score_crop_tables
    from siren.data.manifest import Row
    from siren.io import sha256_file

    m = tiny_set(tmp_path / "src", n=1)
    wav = tmp_path / "src/a0.wav"
    checked = sha256_file(wav)
    x, _ = sf.read(wav)
    write_wav(wav, 0.5 * x)  # changed after the check pass hashed it
    todo = {"k": (Row("a0", wav, "a dog barks"), "codes-key", checked)}
    with pytest.raises(DataError, match="a0.wav: file changed while prepare was running"):
        score_crop_tables(todo, tmp_path / "out", None, TINY, 10, 5, progress=False)
    assert m.is_file() and not (tmp_path / "out").exists()


def test_changed_sources_sees_a_same_size_file_put_in_place_with_the_old_mtime(tmp_path, codec, text_encoder):
    # what `cp -p` or `rsync -a` of another recording does: same size, the old mtime; only the ctime tells
    import os

    from siren.data.index import changed_sources

    m = tiny_set(tmp_path / "src", n=2)
    run(m, tmp_path / "out", codec, text_encoder)
    a1 = tmp_path / "src/a1.wav"
    before = os.stat(a1)
    x, _ = sf.read(a1)
    write_wav(a1, 0.5 * x)
    os.utime(a1, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(a1).st_size == before.st_size and os.stat(a1).st_mtime_ns == before.st_mtime_ns
    assert changed_sources(tmp_path / "out", "manifest") == ([str(a1)], [])


def test_a_grid_refuses_to_go_on_from_data_whose_audio_changed(tmp_path, codec, text_encoder, caplog):
    from ablations.grid import load_grid
    from ablations.plan import cells_of, check_sources, parse, plan
    from ablations.run import main
    from siren import io

    m = tiny_set(tmp_path / "src", n=2)
    args = ["grid=table6", "scale=paper", "rows=6-2", f"out={tmp_path / 'out'}", "executor=local",
            *(f"set.data.{k}={m}" for k in ("train", "test", "prompts"))]
    run_cfg = parse(args)
    jobs = plan(cells_of(load_grid("table6"), run_cfg), run_cfg)
    (prep,) = [j for j in jobs if j.key.startswith("data-")]
    run(m, prep.kwargs["data_dir"], codec, text_encoder)  # what the prepare job did, then its done marker
    io.write_json(prep.done, {})
    check_sources(jobs)
    x, _ = sf.read(tmp_path / "src/a0.wav")
    write_wav(tmp_path / "src/a0.wav", 0.5 * x)
    with pytest.raises(DataError, match=r"1 audio file\(s\) changed since they were prepared, e\.g\. .*a0\.wav\. "
                                        r".*copy the manifest to a new name"):
        main(args)  # before any job starts: the cells' folders are not even written
    assert not list((tmp_path / "out").rglob("cell.json"))
    # a file no longer there (moved, deleted) does not stop the grid: training reads the prepared codes
    (tmp_path / "src/a0.wav").unlink()
    with caplog.at_level("WARNING", logger="ablations.plan"):
        check_sources(jobs)
    assert "1 audio file(s) prepared there are no longer where they were" in caplog.text


def test_a_grid_refuses_to_evaluate_on_clips_its_model_trained_on(tmp_path, codec, text_encoder):
    """AudioSet holds AudioCaps' test clips: a training set gathered from it trained on the test audio, and the
    table printed the better FD and KL that gives. The eval job compares the audio bytes first."""
    from ablations.grid import load_grid
    from ablations.plan import cells_of, parse, plan
    from ablations.steps import eval_step
    from siren.data.index import clips_shared_with_training, reference_sources

    m = tiny_set(tmp_path / "src", n=2)
    other = tiny_set(tmp_path / "other", n=2)
    for wav in ("a0.wav", "a1.wav"):  # the same captions and ids, other audio
        x, sr = sf.read(tmp_path / "other" / wav)
        write_wav(tmp_path / "other" / wav, 0.5 * x, sr)
    run_cfg = parse(["grid=table6", "scale=paper", "rows=6-2", f"out={tmp_path / 'out'}", "executor=local",
                     *(f"set.data.{k}={m}" for k in ("train", "test", "prompts"))])
    jobs = plan(cells_of(load_grid("table6"), run_cfg), run_cfg)
    (prep,) = [j for j in jobs if j.key.startswith("data-")]
    run(m, prep.kwargs["data_dir"], codec, text_encoder, split="train")  # as the prepare job does
    (ev,) = [j for j in jobs if j.key.endswith("/eval")]
    with pytest.raises(DataError, match=r"2 test clip\(s\) of .*manifest.csv have the same audio bytes as training "
                                        r"items .*\(test id -> train id: c0 -> c0, c1 -> c1\)"):
        eval_step(**ev.kwargs)  # before any weights are looked for
    assert clips_shared_with_training(prep.kwargs["data_dir"], reference_sources(other)) == []


def test_a_grid_refuses_to_go_on_from_evaluations_whose_reference_audio_changed(tmp_path, caplog):
    """A finished evaluation is not run again, so a test clip replaced under the same path (a re-download, a
    fixed resampling) left the table showing scores against the former audio. The eval job records the files it
    scored; the grid checks them before anything is submitted."""
    from ablations.grid import load_grid
    from ablations.plan import cells_of, check_sources, parse, plan
    from ablations.run import main
    from ablations.steps import REFERENCES, record_references
    from siren import io

    m = tiny_set(tmp_path / "src", n=2)
    test = tiny_set(tmp_path / "test", n=2)
    args = ["grid=table6", "scale=paper", "rows=6-2", f"out={tmp_path / 'out'}", "executor=local",
            f"set.data.train={m}", f"set.data.test={test}", f"set.data.prompts={m}"]
    run_cfg = parse(args)
    jobs = plan(cells_of(load_grid("table6"), run_cfg), run_cfg)
    (ev,) = [j for j in jobs if j.key.endswith("/eval")]
    recorded = record_references(ev.kwargs["ref"], ev.kwargs["out"])  # what the eval job does first
    assert sorted(recorded) == ["c0", "c1"]
    io.write_json(ev.done, {})
    check_sources(jobs)
    a0 = tmp_path / "test/a0.wav"
    x, sr = sf.read(a0)
    write_wav(a0, x, sr)  # the same bytes written again: a new mtime, not hashed again next time
    check_sources(jobs)
    assert io.read_json(ev.done.parent / "eval" / REFERENCES, "")[0]["source_stat"] == io.version(a0.stat())
    write_wav(a0, 0.5 * x, sr)
    with pytest.raises(DataError, match=r"eval: 1 audio file\(s\) changed since they were scored as references, "
                                        r"e\.g\. .*a0\.wav\. The results there are of the former audio\. .*copy the "
                                        r"test manifest to a new name and point set\.data\.test at it"):
        main(args)
    a0.unlink()
    with caplog.at_level("WARNING", logger="ablations.plan"):
        check_sources(jobs)
    assert "1 audio file(s) scored as references there are no longer where they were" in caplog.text


def test_a_grid_prepares_its_training_manifest_as_the_split_training_reads(tmp_path):
    # prepare names a split after its manifest's file; training reads split 'train': a paper-scale grid given
    # set.data.train=.../audiocaps_train.csv failed in its first training job ("no prepared split 'train'")
    from ablations.steps import prepare_step

    m = tiny_set(tmp_path / "src", n=2)
    named = m.rename(m.with_name("audiocaps_train.csv"))
    prepare_step(str(tmp_path / "data"), {"data.source": "manifest", "data.train": str(named), "weights": "demo"})
    assert PreparedDataset(tmp_path / "data", "train", crop_s=None).info["num_items"] == 2


def test_a_grid_prepares_a_user_training_set_in_shard_jobs_then_indexes_it(tmp_path):
    # prepare_shards=N: N encoding jobs (one SLURM job array), then the index, which training waits for; the
    # items are those of one prepare job. A folder already prepared, and the demo set, stay one job.
    import json

    from ablations.grid import load_grid
    from ablations.plan import cells_of, parse, plan
    from ablations.steps import prepare_step

    m = tiny_set(tmp_path / "src", n=3)
    args = ["grid=table6", "scale=paper", "rows=6-2", f"out={tmp_path / 'out'}", "set.weights=demo",
            *(f"set.data.{k}={m}" for k in ("train", "test", "prompts"))]
    run_cfg = parse([*args, "prepare_shards=2"])
    jobs = {j.key: j for j in plan(cells_of(load_grid("table6"), run_cfg), run_cfg)}
    prep = next(k for k in jobs if k.startswith("data-") and "/" not in k)
    parts = [f"{prep}/shard_0_of_2", f"{prep}/shard_1_of_2"]
    assert jobs[prep].deps == parts and {jobs[k].array for k in parts} == {f"{prep}/shards"}
    assert all(prep in j.deps for k, j in jobs.items() if "/expert_" in k) and jobs[prep].gpus == 0
    for key in [*parts, prep]:  # as the jobs run them
        prepare_step(**jobs[key].kwargs)
        jobs[key].done.write_text("{}")
    one = tmp_path / "one"
    prepare_step(str(one), jobs[prep].kwargs["cfg"])
    items = lambda d: json.loads((Path(d) / "splits" / "train.json").read_text())["items"]
    assert items(jobs[prep].kwargs["data_dir"]) == items(one) and len(items(one)) == 3
    again = plan(cells_of(load_grid("table6"), run_cfg), run_cfg)  # prepared: nothing more to shard
    assert not [j for j in again if j.key.startswith(f"{prep}/")]
    demo = parse(["grid=table6", "scale=demo", "rows=6-2", f"out={tmp_path / 'out'}", "prepare_shards=2"])
    assert len([j for j in plan(cells_of(load_grid("table6"), demo), demo) if j.key.startswith("data-")]) == 1


def test_prepare_caches_by_content(tmp_path, codec, text_encoder):
    m = tiny_set(tmp_path / "src", n=3)
    c, t = Counting(codec), Counting(text_encoder)
    r = run(m, tmp_path / "out", c, t)
    n_captions = len({row.caption for row in read_manifest(m)})
    assert (r.codes_encoded, c.items, r.text_encoded, t.items) == (3, 3, n_captions, n_captions)
    r = run(m, tmp_path / "out", c, t)  # second run: nothing to do
    assert (r.codes_encoded, r.codes_cached, r.text_encoded, c.items, t.items) == (0, 3, 0, 3, n_captions)
    (tmp_path / "src/a0.wav").write_bytes((tmp_path / "src/a0.wav").read_bytes())  # rewritten, same bytes
    x, _ = sf.read(tmp_path / "src/a2.wav")
    write_wav(tmp_path / "src/a2.wav", 0.5 * x)  # changed content
    r = run(m, tmp_path / "out", c, t)
    assert (r.codes_encoded, c.items, r.text_encoded) == (1, 4, 0)
    rows = list(csv.DictReader(m.open()))
    rows[0]["caption"] = "A completely new caption"
    write_manifest(m, rows)
    r = run(m, tmp_path / "out", c, t)
    assert (r.codes_encoded, r.text_encoded, c.items, t.items) == (0, 1, 4, n_captions + 1)
    index = json.loads(index_path(tmp_path / "out", "manifest").read_text())
    assert [it["id"] for it in index["items"]] == ["c0", "c1", "c2"]
    assert index["codec"] == {"id": codec.id, "weights": demo_weights.LABEL} and index["text"]["weights"] == "random"
    assert not tmp_files(tmp_path / "out")


def test_a_prepare_reads_again_only_the_files_changed_or_still_to_encode(tmp_path, codec, text_encoder, monkeypatch):
    """Every prepare read and hashed every source file again (0.2-2 h at 436k files on a local disk); now a file
    hashed at its version (size, mtime, ctime) by an earlier run, finished or killed, is read again only when it
    changed or its codes are still to be encoded."""
    from siren.data import cache as layout

    m, out = tiny_set(tmp_path / "src", n=3), tmp_path / "out"
    reads = []

    def spy(path, mode="r", *args, **kwargs):
        if str(path).endswith(".wav"):
            reads.append(Path(path).name)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(layout, "open", spy, raising=False)  # where sources are read
    with pytest.raises(KeyboardInterrupt):
        run(m, out, Counting(codec, fail_after=1), text_encoder)  # killed after the first file's codes
    assert sorted(reads) == ["a0.wav", "a1.wav", "a2.wav"]
    reads.clear()
    r = run(m, out, codec, text_encoder)
    assert (r.codes_encoded, r.codes_cached) == (2, 1) and len(reads) == 2  # the two to encode
    reads.clear()
    r = run(m, out, codec, text_encoder)
    assert r.codes_cached == 3 and reads == []
    (tmp_path / "src/a0.wav").write_bytes((tmp_path / "src/a0.wav").read_bytes())  # rewritten, same bytes
    x, _ = sf.read(tmp_path / "src/a2.wav")
    write_wav(tmp_path / "src/a2.wav", 0.5 * x)  # changed content
    r = run(m, out, codec, text_encoder)
    assert sorted(reads) == ["a0.wav", "a2.wav"] and (r.codes_encoded, r.codes_cached) == (1, 2)
    index = json.loads(index_path(out, "manifest").read_text())
    for it in index["items"]:  # the hashes recorded are the files' own, at their versions
        assert it["source_sha256"] == hashlib.sha256(Path(it["source"]).read_bytes()).hexdigest()
        assert it["source_stat"] == version(os.stat(it["source"]))
    reads.clear()
    assert run(m, out, codec, text_encoder).codes_cached == 3 and reads == []


def test_a_file_rewritten_as_prepare_reads_it_is_read_again_and_a_full_disk_is_not_bad_audio(tmp_path, codec,
                                                                                                text_encoder,
                                                                                                monkeypatch):
    """The ledger keeps a file's hash under the version it had before the read: recorded under the version after
    it, a file rewritten in between kept the former bytes' hash, trusted by every later prepare. And a ledger line
    that cannot be written (a full disk) was reported as each audio file being unreadable."""
    from siren.data import cache as layout

    m, out = tiny_set(tmp_path / "src", n=2), tmp_path / "out"
    x, _ = sf.read(tmp_path / "src/a0.wav")

    class RewrittenAfterRead:  # the file object prepare reads a0.wav through; a writer replaces it meanwhile
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def read(self):
            data = self.f.read()
            time.sleep(0.01)  # a tick of the file system's clock
            write_wav(tmp_path / "src/a0.wav", 0.5 * x)  # same length, other samples
            return data

    assert run(m, out, codec, text_encoder).codes_encoded == 2
    (tmp_path / "src/a0.wav").write_bytes((tmp_path / "src/a0.wav").read_bytes())  # same bytes: read to hash again
    wrapped = []

    def spy(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if str(path).endswith("a0.wav") and not wrapped:
            wrapped.append(path)
            return RewrittenAfterRead(f)
        return f

    monkeypatch.setattr(layout, "open", spy, raising=False)  # where sources are read
    r = run(m, out, codec, text_encoder)
    assert wrapped and (r.codes_encoded, r.codes_cached) == (0, 2)  # the bytes it read are the ones encoded before
    monkeypatch.undo()
    r = run(m, out, codec, text_encoder)
    assert (r.codes_encoded, r.codes_cached) == (1, 1)  # the rewritten file read and encoded

    class Full:  # the ledger's file on a full disk
        def __init__(self, f):
            self.f = f

        def write(self, line):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()

    def full(path, mode="a", **kwargs):
        f = open_append(path, mode, **kwargs)
        return Full(f) if str(path).endswith(".jsonl") and mode == "a" else f

    monkeypatch.setattr(layout, "open_append", full)  # where the ledger is opened
    write_wav(tmp_path / "src/a1.wav", 0.25 * x)  # to hash again
    with pytest.raises(OSError, match="No space left on device"):
        run(m, out, codec, text_encoder, on_error="skip")


def test_the_hash_ledger_skips_a_line_cut_by_a_kill_and_records_a_file_once(tmp_path):
    from siren.data.cache import HashLedger

    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF")
    st = os.stat(audio)
    folder = tmp_path / "shards"
    folder.mkdir()
    good = {"source": str(audio), "version": version(st), "sha256": "ab" * 32}
    (folder / "sources-0-of-2.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good)[:30])  # a kill mid-line
    (folder / "sources-1-of-2.jsonl").write_text("\0\0\0\n{not json}\n[1, 2]\n")  # a page lost, other junk
    with HashLedger(folder, 0, 1, {str(audio)}) as ledger:
        assert ledger.get(audio, st) == "ab" * 32 and ledger.get(tmp_path / "other.wav", st) is None
        ledger.put(audio, st, "ab" * 32)  # known: not written again
        ledger.put(tmp_path / "b.wav", st, "cd" * 32)
        ledger.put(tmp_path / "b.wav", st, "cd" * 32)  # the same file in two rows: one line
    assert (folder / "sources-0-of-1.jsonl").read_text().count("\n") == 1
    with HashLedger(folder, 0, 1, {str(tmp_path / "b.wav")}) as ledger:  # only the paths asked for are kept
        assert ledger.get(tmp_path / "b.wav", st) == "cd" * 32 and ledger.get(audio, st) is None
    with HashLedger(folder, 0, 2, {str(audio)}) as ledger:  # shard 0 of 2 again, after the kill: its next line
        ledger.put(tmp_path / "c.wav", st, "ef" * 32)       # does not run on from the cut one
    with HashLedger(folder, 0, 2, {str(tmp_path / "c.wav")}) as ledger:
        assert ledger.get(tmp_path / "c.wav", st) == "ef" * 32


def test_a_damaged_cache_entry_is_encoded_again_and_named_where_read(tmp_path, codec, text_encoder, caplog):
    """A cached file cut short (a node lost after the rename, a half-copied cache) counted as cached because it
    existed; the next read failed with safetensors' own error, naming no file. Now prepare encodes it again, and
    a dataset reading one names it and the fix."""
    m = tiny_set(tmp_path / "src", n=2)
    c, t = Counting(codec), Counting(text_encoder)
    run(m, tmp_path / "out", c, t)
    index = json.loads(index_path(tmp_path / "out", "manifest").read_text())
    codes, text = (cache_path(tmp_path / "out", kind, index["items"][0][kind]) for kind in ("codes", "text"))
    whole = codes.read_bytes(), text.read_bytes()
    tensors = load_file(codes), load_file(text)
    codes.write_bytes(whole[0][: len(whole[0]) // 2])
    text.write_bytes(b"")
    with caplog.at_level("WARNING", logger="siren.data.cache"):
        r = run(m, tmp_path / "out", c, t)
    assert (r.codes_encoded, r.codes_cached, r.text_encoded) == (1, 1, 1) and (c.items, t.items) == (3, 3)
    assert f"{codes}: a damaged cache entry" in caplog.text and f"{text}: a damaged cache entry" in caplog.text
    for path, want in zip((codes, text), tensors):  # whole again (encoded alone, not in a batch of 2: other bits)
        got = load_file(path)
        assert got.keys() == want.keys() and all(got[k].shape == want[k].shape for k in want)
    text.write_bytes(whole[1][:100])
    ds = PreparedDataset(tmp_path / "out", "manifest", crop_s=None)
    with pytest.raises(DataError, match=rf"{re.escape(str(text))}: a damaged or missing prepared file .*run prepare "
                                        r"again"):
        ds.text(0)


def test_a_second_prepare_of_one_shard_is_refused(tmp_path, codec, text_encoder):
    """Two prepares of one shard (the same job submitted twice, a wrong shard= on an array) each deleted and
    rewrote the shard's record under the other; now the second is refused, naming the first."""
    from siren.lock import LockHeld, hold

    m = tiny_set(tmp_path / "src", n=2)
    lock = tmp_path / "out" / "splits" / "manifest.shards" / "shard-0-of-1.lock"
    with hold(lock, "prepare of manifest shard 0 of 1", "wait"):
        with pytest.raises(LockHeld, match=r"shard-0-of-1\.lock: held by prepare of manifest shard 0 of 1 "):
            run(m, tmp_path / "out", codec, text_encoder)
    assert run(m, tmp_path / "out", codec, text_encoder).codes_encoded == 2  # then it runs


def test_codec_change_reencodes_everything(tmp_path, codec, text_encoder):
    m = tiny_set(tmp_path / "src", n=2)
    run(m, tmp_path / "out", codec, text_encoder)
    other = Counting(Codec(CodecConfig(weights="random", seed=1)))
    t = Counting(text_encoder)
    assert other.id != codec.id
    r = run(m, tmp_path / "out", other, t)
    assert (r.codes_encoded, other.items, r.text_encoded, t.items) == (2, 2, 0, 0)
    r = run(m, tmp_path / "out", codec, t, audio=AudioConfig("pad", 0.4))  # a changed policy is a new key too
    assert r.codes_encoded == 2


def test_cache_holds_what_the_models_compute(tmp_path, codec, text_encoder):
    m = tiny_set(tmp_path / "src", n=2)
    run(m, tmp_path / "out", codec, text_encoder)
    ds = PreparedDataset(tmp_path / "out", "manifest", crop_s=None)
    for i, row in enumerate(read_manifest(m)):
        items, _, _ = standardize(load_audio(row.audio), TINY)
        assert torch.equal(ds.codes(i), codec.encode(items)[0])
        ref = text_encoder.encode([row.caption])
        n = int(ref.mask[0].sum())
        got = ds.text(i)
        assert got["states"].shape == (n, 768) and got["mask"].all()
        torch.testing.assert_close(got["states"], ref.states[0, :n], atol=2e-3, rtol=1e-3)  # stored as float16
        torch.testing.assert_close(got["pooled"], ref.pooled[0])


def test_killed_prepare_resumes(tmp_path, codec, text_encoder):
    m = tiny_set(tmp_path / "src", n=3)
    with pytest.raises(KeyboardInterrupt):
        run(m, tmp_path / "out", Counting(codec, fail_after=1), text_encoder)
    assert len(list((tmp_path / "out/codes").rglob("*.safetensors"))) == 1
    assert not tmp_files(tmp_path / "out") and not index_path(tmp_path / "out", "manifest").exists()
    c = Counting(codec)
    r = run(m, tmp_path / "out", c, text_encoder)
    assert (r.codes_encoded, r.codes_cached, c.items) == (2, 1, 2)
    assert json.loads(index_path(tmp_path / "out", "manifest").read_text())["num_items"] == 3


def test_bad_files_reported_together_before_encoding(tmp_path, codec, text_encoder):
    src = tiny_set(tmp_path / "src", n=1).parent
    (src / "garbage.wav").write_bytes(b"not audio at all" * 100)
    write_wav(src / "silent.wav", np.zeros(4000))
    rows = [{"id": "good", "audio": "a0.wav", "caption": "a"}, {"id": "g", "audio": "garbage.wav", "caption": "b"},
            {"id": "s", "audio": "silent.wav", "caption": "c"}, {"id": "m", "audio": "missing.wav", "caption": "d"}]
    m = write_manifest(src / "bad.csv", rows)
    c = Counting(codec)
    with pytest.raises(DataError) as e:
        run(m, tmp_path / "out", c, text_encoder)
    msg = str(e.value)
    assert "3 bad audio file(s)" in msg and c.items == 0 and not index_path(tmp_path / "out", "bad").exists()
    for name, reason in [("garbage.wav", "unreadable"), ("silent.wav", "all-silent"), ("missing.wav", "not found")]:
        assert f"{src / name}: " in msg and reason in msg
    r = run(m, tmp_path / "out", c, text_encoder, on_error="skip")
    index = json.loads(index_path(tmp_path / "out", "bad").read_text())
    assert r.codes_encoded == 1 and [it["id"] for it in index["items"]] == ["good"]
    assert [s["id"] for s in index["skipped"]] == ["g", "s", "m"]
    with pytest.raises(DataError):  # a failed run leaves no shard record for a later index step to merge
        run(m, tmp_path / "out", c, text_encoder)
    with pytest.raises(DataError, match="not prepared yet"):
        write_index(tmp_path / "out", "bad")


def test_sharded_prepare_equals_single_process(tmp_path, codec, text_encoder):
    m = tiny_set(tmp_path / "src", n=3)
    run(m, tmp_path / "a", codec, text_encoder, num_shards=2, shard=0)
    with pytest.raises(DataError, match=r"shard\(s\) \[1\] of 2 are not prepared yet"):
        write_index(tmp_path / "a", "manifest", 2)
    run(m, tmp_path / "a", codec, text_encoder, num_shards=2, shard=1)
    write_index(tmp_path / "a", "manifest", 2)
    run(m, tmp_path / "b", codec, text_encoder)
    ia, ib = (json.loads(index_path(tmp_path / d, "manifest").read_text()) for d in "ab")
    assert ia["items"] == ib["items"] and len(ia["items"]) == 3
    for it in ia["items"]:
        ca, cb = (load_file(cache_path(tmp_path / d, "codes", it["codes"])) for d in "ab")
        assert all(torch.equal(ca[k], cb[k]) for k in ("codes", "real_frames", "chunks"))
        ta, tb = (load_file(cache_path(tmp_path / d, "text", it["text"])) for d in "ab")
        # captions were batched differently (per shard): equal up to float16 rounding of ~1e-6 differences
        assert torch.equal(ta["mask"], tb["mask"])
        torch.testing.assert_close(ta["states"], tb["states"], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(ta["pooled"], tb["pooled"], atol=1e-5, rtol=1e-4)


def test_segment_policy_gives_one_item_per_chunk(tmp_path, codec, text_encoder):
    x, caption = demo.clip(0, "train", 0)
    write_wav(tmp_path / "long.wav", np.tile(x, 2)[:20_800])  # 1.3 s -> two 0.5 s items
    m = write_manifest(tmp_path / "m.csv", [{"id": "x", "audio": "long.wav", "caption": caption}])
    run(m, tmp_path / "out", codec, text_encoder, audio=AudioConfig("segment", 0.5))
    ds = PreparedDataset(tmp_path / "out", "m", crop_s=None)
    assert ds.ids == ["x#0", "x#1"]
    chunks, _, _ = standardize(load_audio(tmp_path / "long.wav"), AudioConfig("segment", 0.5))
    direct = codec.encode(chunks)
    assert all(torch.equal(ds.codes(i), direct[i]) for i in range(2)) and direct.shape[-1] == 25


def test_segments_left_out_ids_clashing_and_captions_cut_are_said(tmp_path, codec, text_encoder, caplog):
    # a silent chunk was dropped, a caption over text.max_length tokens cut, without a word; a duplicate item id
    # was said without naming it
    x, caption = demo.clip(0, "train", 0)
    gap = np.tile(x, 3)[:24_000].copy()
    gap[8_000:16_000] = 0  # 1.5 s -> three 0.5 s chunks, the middle one silent
    write_wav(tmp_path / "gap.wav", gap)
    long_caption = " ".join(["a dog barks"] * 60)  # > 128 tokens
    write_wav(tmp_path / "gap2.wav", gap[::-1].copy())
    m = write_manifest(tmp_path / "m.csv", [{"id": "g", "audio": "gap.wav", "caption": long_caption},
                                            {"id": "h", "audio": "gap2.wav", "caption": caption}])
    with caplog.at_level("WARNING"):
        run(m, tmp_path / "out", codec, text_encoder, audio=AudioConfig("segment", 0.5))
    # one line for the shard (thousands on a large set when each file had its own), with examples
    assert "m shard 0 of 1: 2 silent 0.5 s segment(s) of 2 file(s) left out, e.g. " in caplog.text
    assert "gap.wav: #1; " in caplog.text and "gap2.wav: #1" in caplog.text and caplog.text.count("silent") == 1
    assert "1 caption(s) are longer than text.max_length=128 tokens and were cut" in caplog.text
    assert PreparedDataset(tmp_path / "out", "m", crop_s=None).ids == ["g#0", "g#2", "h#0", "h#2"]
    write_wav(tmp_path / "short.wav", x[:4_000])  # one item, not split: its id is the row's
    m = write_manifest(tmp_path / "d.csv", [{"id": "g#0", "audio": "short.wav", "caption": caption},
                                            {"id": "g", "audio": "gap.wav", "caption": caption}])
    with pytest.raises(DataError, match=r"1 duplicate item id\(s\) after segmentation .*: g#0 from rows g#0, g; "
                                        r"rename those manifest ids"):
        run(m, tmp_path / "out", codec, text_encoder, audio=AudioConfig("segment", 0.5))


@pytest.mark.parametrize("seconds", ["0.00001", "0.01", "inf"])
def test_an_item_shorter_than_a_codec_frame_is_refused_before_the_models_load(tmp_path, seconds, monkeypatch):
    """0.00001 s built the models, then a traceback; 0.01 s made 160-sample items (segment: 100 a second)."""
    from siren import frontends

    monkeypatch.setattr(frontends, "build_codec", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(DataError, match=rf"audio.duration_s must be at least one codec frame \(0.02 s\) and finite, "
                                        rf"got {seconds.replace('0.00001', '1e-05')}"):
        prepare_main([f"manifest={tiny_set(tmp_path / 'src', n=1)}", f"out={tmp_path / 'out'}",
                      f"audio.duration_s={seconds}"])


def test_demo_prepare_refuses_a_split_name(tmp_path, monkeypatch):
    # manifest=demo split=mytrain wrote train.json and test.json, exit 0
    from siren import frontends

    monkeypatch.setattr(frontends, "build_codec", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(DataError, match="split=mytrain: manifest=demo prepares the splits train and test"):
        prepare_main(["manifest=demo", "split=mytrain", f"out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, capsys):
    m = tiny_set(tmp_path / "src", n=2)
    args = [f"manifest={m}", f"out={tmp_path / 'out'}", "codec.weights=random", "text.weights=random",
            "audio.policy=crop", "audio.duration_s=0.3", "num_shards=2"]
    prepare_main(args)
    out = capsys.readouterr().out
    assert "manifest.json: 2 items, 0 skipped" in out and "codec weights are RANDOM; text weights are RANDOM" in out
    prepare_main(args + ["step=index"])  # the merge step alone builds no model
    with open(m, "a") as f:  # the manifest edited after its shards were prepared: the index would be stale
        f.write("c9,a0.wav,a new row\n")
    with pytest.raises(DataError, match="prepared from another version of .*manifest.csv"):
        prepare_main(args + ["step=index"])
    m.write_text("".join(m.read_text().splitlines(keepends=True)[:-1]))
    demo = [a for a in args if not a.startswith(("codec.", "text.", "out="))]
    prepare_main(demo + [f"out={tmp_path / 'demo'}", "codec.weights=demo", "text.weights=demo"])
    # each part's own label, though a text entry records just "demo"; the text encoder's trunk is not trained
    assert ("codec weights are DEMO WEIGHTS (TRAINED ON THE EMBEDDED SET); text weights are DEMO WEIGHTS (THE DEMO "
            "CLAP'S ROBERTA AT ITS SEEDED RANDOM INIT: UNTRAINED TEXT STATES)") in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown config key 'shards'"):
        prepare_main(args + ["shards=3"])
    # a bad manifest is named before any model loads: here the pretrained codec is not there either
    for bad, what in [(tmp_path / "nowhere.csv", "manifest file does not exist"),
                      (write_manifest(tmp_path / "e.csv", []), "manifest is empty")]:
        with pytest.raises(ManifestError, match=what):
            prepare_main([f"manifest={bad}", f"out={tmp_path / 'bad'}", "codec.weights=/missing/codec.pth"])


# ---------------------------------------------------------------- loader

@pytest.fixture(scope="module")
def prepared(tmp_path_factory, codec, text_encoder):
    root = tmp_path_factory.mktemp("prepared")
    rows = []
    for i, seconds in enumerate([0.3, 0.5, 0.6, 0.6, 0.42, 0.6]):  # 15, 25, 30, 30, 21, 30 frames
        x, caption = demo.clip(i, "train", 0)
        write_wav(root / f"{i}.wav", x[: int(seconds * 16000)])
        rows.append({"id": f"i{i}", "audio": f"{i}.wav", "caption": caption, "label": demo.CLASSES[i].name})
    m = write_manifest(root / "train.csv", rows)
    run(m, root / "out", codec, text_encoder, audio=AudioConfig("crop", 0.6))
    return root / "out"


def test_batch_format_and_masks(prepared):
    ds = PreparedDataset(prepared, "train", crop_s=None)
    batch = next(iter(make_loader(prepared, "train", batch_size=6, crop_s=0.4, shuffle=False)))
    assert set(batch) == {"codes", "frame_mask", "text", "text_mask", "ids", "captions"}
    assert batch["codes"].dtype == torch.long and batch["codes"].shape == (6, 12, 20)
    assert batch["frame_mask"].dtype == torch.bool and batch["text"].dtype == torch.float32
    assert batch["ids"] == ds.ids and batch["captions"] == ds.captions
    assert batch["frame_mask"].sum(1).tolist() == [15, 20, 20, 20, 20, 20]  # the 0.3 s item is padded
    assert (batch["codes"][~batch["frame_mask"][:, None].expand(-1, 12, -1)] == 0).all()
    lengths = [ds.text(i)["states"].shape[0] for i in range(6)]
    assert batch["text"].shape == (6, max(lengths), 768) and batch["text_mask"].sum(1).tolist() == lengths
    assert (batch["text"][~batch["text_mask"]] == 0).all()
    for b in range(6):  # each crop is a window of the item's codes
        full, t = ds.codes(b), int(batch["frame_mask"][b].sum())
        assert any(torch.equal(batch["codes"][b, :, :t], full[:, s:s + t]) for s in range(full.shape[-1] - t + 1))
    full = next(iter(make_loader(prepared, "train", batch_size=6, crop_s=None, shuffle=False)))
    assert full["codes"].shape[-1] == 30 and full["frame_mask"].sum(1).tolist() == [15, 25, 30, 30, 21, 30]


def test_the_dataset_holds_its_items_as_json_and_reads_them_as_the_index_has_them(prepared):
    # held as Python objects, 450k items took 590 MB per training process, and loader workers copied what
    # they touched; the digest a resumed run checks must stay the one computed from the index's dicts
    import json

    from siren.data.dataset import PreparedDataset
    from siren.io import sha256

    raw = json.loads((prepared / "splits" / "train.json").read_text())["items"]
    ds = PreparedDataset(prepared, "train", crop_s=None)
    assert [ds.items[i] for i in range(len(raw))] == list(ds.items) == raw and ds.items[-1] == raw[-1]
    with pytest.raises(IndexError):
        ds.items[len(raw)]
    assert ds.digest == sha256(json.dumps([{k: it.get(k) for k in ds.READ} for it in raw], sort_keys=True))[:16]
    assert [ds.real_frames(i) for i in range(len(raw))] == [15, 25, 30, 30, 21, 30] and ds.longest == 30


def test_the_index_memory_benchmark_runs(capsys):
    from benchmarks.index_memory import main

    main(["items=300", "workers=1"])
    assert "300 items" in capsys.readouterr().out


def test_a_short_clip_under_pad_is_encoded_at_its_own_length(tmp_path, codec, text_encoder):
    # DAC's encoder is not causal: the 10 s pad's zeros changed the codes of a short clip's last frames; the
    # authors' code encodes each clip at its own length. Its real frames are now those codes; the pad frames 0.
    x, caption = demo.clip(0, "train", 0)
    clip = x[: int(0.3 * 16000)]
    write_wav(tmp_path / "a.wav", clip)
    m = write_manifest(tmp_path / "m.csv", [{"id": "a", "audio": "a.wav", "caption": caption, "label": "x"}])
    run(m, tmp_path / "out", codec, text_encoder, audio=AudioConfig("pad", 0.6))
    ds = PreparedDataset(tmp_path / "out", "m", crop_s=None)
    stored, real = ds.codes(0), ds.real_frames(0)
    own = codec.encode(torch.as_tensor(load_audio(tmp_path / "a.wav"))[None]).cpu()[0]
    assert stored.shape[-1] == 30 and real == own.shape[-1] == 15
    assert torch.equal(stored[:, :real].long(), own.long()) and not stored[:, real:].any()
    padded = codec.encode(torch.nn.functional.pad(torch.as_tensor(load_audio(tmp_path / "a.wav")), (0, 4800))[None])
    assert not torch.equal(padded.cpu()[0, :, :real].long(), own.long())  # the zeros did change the last frames


def test_validation_reads_whole_items_while_training_crops(prepared, tmp_path):
    # the test split was cut with the training crop: each validation scored one random window of every item
    # (at the CLI's 6 s crops never positions 300-499); the authors' code validates on whole items
    import shutil

    from siren.data.stage1 import Stage1Data

    data_dir = tmp_path / "data"
    shutil.copytree(prepared, data_dir)
    shutil.copy(data_dir / "splits" / "train.json", data_dir / "splits" / "test.json")
    data = Stage1Data.from_prepared(data_dir, 0.2, 0, CodecConfig(weights="demo"))
    whole = PreparedDataset(data_dir, "test", crop_s=None)
    assert [data.val[i]["codes"].shape[-1] for i in range(6)] == [whole.real_frames(i) for i in range(6)] \
        == [15, 25, 30, 30, 21, 30]
    assert {data.train[i]["codes"].shape[-1] for i in range(6)} == {10}


def test_an_empty_test_split_is_no_validation_said_so(prepared, tmp_path, caplog):
    # every validation logged {"val": true, "frames": 0}: no loss and no word
    import json
    import shutil

    from siren.data.stage1 import Stage1Data

    data_dir = tmp_path / "data"
    shutil.copytree(prepared, data_dir)
    index = json.loads((data_dir / "splits" / "train.json").read_text())
    (data_dir / "splits" / "test.json").write_text(json.dumps({**index, "split": "test", "num_items": 0, "items": []}))
    with caplog.at_level("WARNING", logger="siren.data.stage1"):
        data = Stage1Data.from_prepared(data_dir, 0.2, 0, CodecConfig(weights="demo"))
    assert data.val is None and "no validation: the test split of" in caplog.text and "holds no item" in caplog.text
    # a crop longer than every item: the positions past the longest are never trained, and the run records that
    train = PreparedDataset(data_dir, "train", crop_s=3.0)
    assert (train.crop, train.longest, train.max_frames) == (150, 30, 30)


def test_a_test_split_of_another_codec_or_text_encoder_is_refused(prepared, tmp_path):
    # validation CE was logged on codes of another codec (or captions of another text encoder) without a word
    import json
    import shutil

    from siren.data.stage1 import Stage1Data

    data_dir = tmp_path / "data"
    shutil.copytree(prepared, data_dir)
    index = json.loads((data_dir / "splits" / "train.json").read_text())
    other = {**index, "split": "test", "codec": {**index["codec"], "id": "dac16k-random-seed0"},
             "text": {**index["text"], "id": "clap-random"}}
    (data_dir / "splits" / "test.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"test split was prepared with another codec and text .*dac16k-random-seed0 "
                                          r"vs dac16k-.*prepare the test manifest again"):
        Stage1Data.from_prepared(data_dir, 0.2, 0, CodecConfig(weights="demo"))


def test_a_run_resumed_on_another_train_split_is_refused(prepared, tmp_path):
    # the checkpoint recorded no data: a resume on a split prepared again (or another data_dir) trained on other
    # items from the old position in the epoch; the same items in another folder are the same data
    import json
    import shutil

    from siren.train import train
    from tests.fixtures_train import tiny_config

    moved, cut = tmp_path / "moved", tmp_path / "cut"
    shutil.copytree(prepared, moved)
    shutil.copytree(prepared, cut)
    index = json.loads((cut / "splits" / "train.json").read_text())
    index["items"], index["num_items"] = index["items"][:-1], index["num_items"] - 1
    (cut / "splits" / "train.json").write_text(json.dumps(index))
    args = ("codec.weights=demo", "train.steps=2", "train.ckpt_every=1", "train.batch_size=2")
    edir = tmp_path / "run" / "expert_0"
    assert train(tiny_config(tmp_path / "run", f"data_dir={prepared}", *args), handle_signals=False).step == 2
    for data_dir, ok in ((cut, False), (moved, True)):
        shutil.rmtree(edir / "step_00000002", ignore_errors=True)  # stopped after step 1
        (edir / "latest").write_text("step_00000001\n")
        cfg = tiny_config(tmp_path / "run", f"data_dir={data_dir}", *args)
        if ok:
            assert train(cfg, handle_signals=False).step == 2
        else:
            with pytest.raises(ConfigError, match="trained on another train split"):
                train(cfg, handle_signals=False)


def test_padding_of_policy_pad_is_not_trained_on(tmp_path, codec, text_encoder):
    """policy=pad zero-pads a short clip to the item length, and its codes were batched as real frames (crops
    could lie wholly in the padding). As the authors' code (each clip encoded at its own length, the batch's
    padding masked), only real frames are targets now."""
    x, caption = demo.clip(0, "train", 0)
    write_wav(tmp_path / "a.wav", x[: int(0.3 * 16000)])  # 15 real frames of a 30-frame item
    run(write_manifest(tmp_path / "m.csv", [{"id": "a", "audio": "a.wav", "caption": caption}]), tmp_path / "out",
        codec, text_encoder, audio=AudioConfig("pad", 0.6))
    ds = PreparedDataset(tmp_path / "out", "m", crop_s=None)
    assert ds.items[0]["frames"] == 30 and ds.items[0]["real_frames"] == 15
    whole = ds.collate([ds[0]])
    assert whole["frame_mask"].sum().item() == 15 and torch.equal(whole["codes"][0], ds.codes(0)[:, :15])
    for crop_s, real in ((0.2, 10), (0.4, 15)):  # a crop inside the real frames; one longer than them
        crops = PreparedDataset(tmp_path / "out", "m", crop_s=crop_s)
        starts = {crops.crop_start(e, 0) for e in range(50)}
        assert max(starts) <= max(0, 15 - round(crop_s * 50))
        batch = crops.collate([crops[(e, 0)] for e in range(4)])
        assert batch["frame_mask"].sum(1).tolist() == [real] * 4


def test_crops_and_order_are_deterministic(prepared):
    def epoch(loader):
        return [(b["ids"], b["codes"]) for b in loader]

    def same(x, y):
        return len(x) == len(y) and all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(x, y))

    a, b = (make_loader(prepared, "train", batch_size=2, crop_s=0.2, seed=3) for _ in range(2))
    a0, a1 = epoch(a), epoch(a)
    assert same(a0, epoch(b)) and not same(a0, a1)  # same seed: same epoch 0; the epoch advances per pass
    assert not same(a0, epoch(make_loader(prepared, "train", batch_size=2, crop_s=0.2, seed=4)))
    a.batch_sampler.set_epoch(1, skip=2)  # resume inside epoch 1 after one batch of 2
    assert same(epoch(a), a1[1:])
    w = make_loader(prepared, "train", batch_size=2, crop_s=0.2, seed=3, num_workers=1)
    assert same(epoch(w), a0)


def test_missing_split_names_the_prepare_command(prepared):
    # the split named: prepare names a split after its manifest's file unless split= is given
    with pytest.raises(DataError, match=r"no prepared split 'test'.*python -m siren\.data\.prepare .* split=test"):
        make_loader(prepared, "test", batch_size=2)
