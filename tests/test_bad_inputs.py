"""Bad inputs and faults a new user meets (issue #13), as regression tests on tiny data: ids that would
write outside their folder, malformed manifests, truncated and too-short audio, long files under
``audio.policy=segment``, and two launchers on one output folder (real processes, real locks)."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ablations import ledger, pipeline
from eval.audio import load_clips
from siren.codec import HOP
from siren.data.audio import AudioConfig, AudioError, load_audio, standardize
from siren.data.cache import cache_path, sha256
from siren.data.encode import encode_codes as _encode_codes
from siren.data.manifest import Row, child_path, read_captions, read_manifest
from siren.errors import ConfigError, DataError, ManifestError, SirenError
from siren.lock import LockHeld, hold
from tests.fixtures_data import Counting, write_wav
from tests.fixtures_model import demo_codec

ROOT = Path(__file__).resolve().parents[1]


def tone(n: int, sr: int = 16_000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / sr)).astype(np.float32)


def csv_file(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- ids and paths built from them

BAD_IDS = ["../../ESCAPED", "a/b", "a\\b", "..", "x..y", "bell\x07", "tab\tid", "nul\x00",
           ".hidden", "."]  # a hidden file: written, then never matched as a generated clip ("missing .hidden")


@pytest.mark.parametrize("bad", BAD_IDS)
def test_an_unsafe_id_is_an_error_naming_file_and_line(tmp_path, bad):
    m = tmp_path / "m.jsonl"  # JSON carries every character; CSV below
    m.write_text("".join(json.dumps({"id": i, "audio": "a.wav", "caption": "c"}) + "\n" for i in ["ok", bad]))
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: id .* contains"):
        read_manifest(m)


def test_an_id_too_long_for_a_file_name_is_refused_where_read(tmp_path):
    """A 245-character id passed the check, and the write of <id>.wav failed after the models were built
    ("File name too long": atomic_path's temp name adds 14 characters)."""
    m = csv_file(tmp_path / "m.csv", f"id,audio,caption\nok,a.wav,c\n{'x' * 201},b.wav,d\n{'y' * 200},c.wav,e\n")
    with pytest.raises(ManifestError, match=r"m\.csv:3: id 'x{40}'\.\.\. is 201 bytes.*at most 200 bytes"):
        read_manifest(m)


def test_an_unsafe_id_in_a_csv_names_the_line(tmp_path):
    m = csv_file(tmp_path / "m.csv", "id,audio,caption\nok,a.wav,c\n../../ESCAPED,b.wav,d\n")
    with pytest.raises(ManifestError, match=r"m\.csv:3: id '\.\./\.\./ESCAPED' contains '/' and '\.\.'"):
        read_manifest(m)


def test_child_path_stays_in_its_folder(tmp_path):
    assert child_path(tmp_path, "clip-1#2", ".wav") == tmp_path / "clip-1#2.wav"
    for bad in ["../x", "a/b", ".", "..", "/etc/passwd"]:
        with pytest.raises(DataError, match="outside"):
            child_path(tmp_path / "out", bad, "" if bad in (".", "..") else ".wav")


def test_eval_with_an_escaping_reference_id_writes_nothing(tmp_path, capsys):
    """The reported case: `eval/audiocaps.py ckpt=RUN ref=R.csv out=O` with id ../../ESCAPED wrote
    O/../../ESCAPED.wav before failing; now the manifest is refused before anything is built."""
    from eval.audiocaps import main

    write_wav(tmp_path / "ref" / "a.wav", tone(8000))
    write_wav(tmp_path / "ref" / "b.wav", tone(8000))
    ref = csv_file(tmp_path / "ref" / "R.csv", "id,audio,caption\n../../ESCAPED,a.wav,a\nok,b.wav,b\n")
    out = tmp_path / "deep" / "er" / "O"
    assert main([f"ckpt={tmp_path / 'run'}", f"ref={ref}", f"out={out}", "weights=random", "metrics=fd"]) == 2
    assert f"{ref}:2: id '../../ESCAPED'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*.wav")) == ["a.wav", "b.wav"] and not out.exists()


def test_generate_checks_every_output_path_before_loading_anything(tmp_path):
    from eval.generate import generate_set
    from siren.sample import SampleConfig

    with pytest.raises(DataError, match=r"id '\.\./\.\./ESCAPED' would write .*ESCAPED\.wav, outside"):
        generate_set(tmp_path / "no-such-run", ["ok", "../../ESCAPED"], ["a", "b"], tmp_path / "gen", seconds=0.1,
                     batch_size=2, seed=0, sample=SampleConfig())
    assert not (tmp_path / "gen").exists()


# ---------------------------------------------------------------- strict CSV

@pytest.mark.parametrize("text, line, words", [
    ('id,audio,caption\na,a.wav,"a dog barks\nb,b.wav,rain\nc,c.wav,wind\n', 2, "never closed"),
    ('id,audio,caption\na,a.wav,ok\nb,b.wav,"two\nlines"\n', 3, r"runs over lines 3-4"),
    ('id,audio,caption\na,a.wav,"quoted"tail\n', 2, "malformed CSV"),
    ("id,audio,caption\na,a.wav,a dog, barking\n", 2, "4 fields, the header has 3"),
    ("id,audio,caption,label\na,a.wav,rain\n", 2, "3 fields, the header has 4"),
])
def test_malformed_csv_is_an_error_naming_the_line(tmp_path, text, line, words):
    m = csv_file(tmp_path / "m.csv", text)
    with pytest.raises(ManifestError, match=rf"m\.csv:{line}: .*{words}"):
        read_manifest(m)


def test_well_formed_csv_quirks_still_parse(tmp_path):
    """Already fine, kept fine: a BOM, blank lines, quoted commas and doubled quotes, CRLF line ends."""
    m = tmp_path / "m.csv"
    m.write_bytes('\ufeffid,audio,caption\r\n\r\na,a.wav,"a dog, then ""rain"""\r\nb,b.wav,wind\r\n'.encode())
    rows = read_manifest(m)
    assert [(r.id, r.caption) for r in rows] == [("a", 'a dog, then "rain"'), ("b", "wind")]


def test_a_jsonl_line_lacking_a_key_is_named(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "audio": "a.wav", "caption": "c"}\n{"id": "b", "audio": "b.wav"}\n')
    with pytest.raises(ManifestError, match=r"line 2: no caption"):
        read_manifest(m)


def test_eval_reference_manifest_is_parsed_as_strictly(tmp_path):
    def read_reference(path):  # how eval reads a reference set: the one reader, ids may repeat
        return read_manifest(path, unique_ids=False)

    m = csv_file(tmp_path / "R.csv", 'id,audio,caption\na,a.wav,"unclosed\nb,b.wav,x\n')
    with pytest.raises(ManifestError, match=r"R\.csv:2: .*never closed"):
        read_reference(m)
    m = csv_file(tmp_path / "S.csv", "id,audio,caption\na,a.wav,x\na,a.wav,y\n")  # 5 captions per clip: allowed
    assert [r.caption for r in read_reference(m)] == ["x", "y"]


def test_eval_names_a_bad_reference_before_looking_for_weights(tmp_path, monkeypatch, capsys):
    """A malformed reference manifest is the error, not the pretrained files an empty cache lacks."""
    from eval.audiocaps import main

    monkeypatch.setenv("SIREN_CACHE", str(tmp_path / "empty_cache"))
    ref = csv_file(tmp_path / "R.csv", 'id,audio,caption\na,a.wav,"unclosed\nb,b.wav,x\n')
    assert main([f"gen_dir={tmp_path}", f"ref={ref}", f"out={tmp_path / 'O'}", "weights=pretrained"]) == 2
    err = capsys.readouterr().err
    assert "R.csv:2:" in err and "never closed" in err and "pretrained weights" not in err


def test_eval_names_a_wrong_gen_dir_before_it_writes_anything(tmp_path, monkeypatch, capsys):
    """A typo in gen_dir= made <gen_dir>_eval/ (its lock) or, with out= an earlier evaluation's folder, set its
    results.json aside as results.previous.json, and with the default pretrained weights the error was three
    paragraphs about missing weight files, not the folder."""
    from eval.audiocaps import main

    monkeypatch.setenv("SIREN_CACHE", str(tmp_path / "empty_cache"))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    for out in ([], [f"out={earlier}"]):
        assert main(["ref=demo", f"gen_dir={tmp_path / 'typo'}", *out]) == 2
        err = capsys.readouterr().err
        assert f"gen_dir {tmp_path / 'typo'} is not a folder" in err and "pretrained weights" not in err
    assert not (tmp_path / "typo_eval").exists() and (earlier / "results.json").is_file()  # (the demo set: cached)
    assert not (earlier / "results.previous.json").exists()
    with pytest.raises(SirenError, match=r"cannot make this folder \(.*\); give one you can write to"):
        from siren.lock import hold

        with hold(Path("/proc/siren-test/x.lock"), "a test", "none"):
            pass


def test_a_calibration_row_names_a_bad_reference_before_looking_for_weights(tmp_path, monkeypatch):
    # the calibration job built the codec first: an empty cache's missing DAC hid the manifest's own error
    from ablations.steps import calibration_step

    monkeypatch.setenv("SIREN_CACHE", str(tmp_path / "empty_cache"))
    ref = csv_file(tmp_path / "R.csv", 'id,audio,caption\na,a.wav,"unclosed\nb,b.wav,x\n')
    with pytest.raises(ManifestError, match=r"R\.csv:2:.*never closed"):
        calibration_step({"weights": "pretrained"}, "oracle", str(ref), str(tmp_path / "O"))


@pytest.mark.parametrize("unique", [True, False])
def test_ids_that_name_one_file_on_a_case_insensitive_file_system_are_refused(tmp_path, unique):
    """'Dog1' and 'dog1' (or 'café' composed and decomposed) are one file on macOS, SMB or exFAT: generation found
    the second's clip already there and never wrote it, a calibration row overwrote the first's."""
    m = tmp_path / "m.jsonl"
    ids = ["Dog1", "x", "dog1", "caf\u00e9", "cafe\u0301"]
    m.write_text("".join(json.dumps({"id": i, "audio": "a.wav", "caption": "c"}) + "\n" for i in ids))
    words = f"differ only in letter case or Unicode form: 'Dog1' (line 1) and 'dog1' (line 3); {ids[3]!r} (line 4) and "
    with pytest.raises(ManifestError, match=re.escape(words + f"{ids[4]!r} (line 5)")):
        read_manifest(m, unique_ids=unique)


@pytest.mark.parametrize("name, text, words", [
    # what json.dumps writes for a missing pandas value: read as the caption "nan"
    ("m.jsonl", '{"id": "a", "audio": "a.wav", "caption": NaN}\n', r"m\.jsonl:1: a value is NaN"),
    ("m.jsonl", '{"id": "a", "audio": "a.wav", "caption": "x", "label": Infinity}\n', r"m\.jsonl:1: a value is Inf"),
    # passed here, then broke segments.csv / train.csv written from it (and the segment count)
    ("m.jsonl", '{"id": "a", "audio": "a.wav", "caption": "x"}\n{"id": "b", "audio": "a.wav", "caption": "a\\nb"}\n',
     r"m\.jsonl:2: caption 'a\\nb' contains a line break"),
])
def test_a_missing_value_or_a_line_break_in_a_caption_is_named(tmp_path, name, text, words):
    (tmp_path / name).write_text(text)
    with pytest.raises(ManifestError, match=words):
        read_manifest(tmp_path / name)
    with pytest.raises(ManifestError, match=words):
        read_captions(tmp_path / name)


def test_a_jsonl_key_given_twice_and_a_prompts_file_of_another_suffix_are_named(tmp_path):
    # json kept the last of a repeated key: 'a dog barks' became 'a cat meows' and an id another id, in silence;
    # a prompts file named .CSV or .json was read one prompt per line, its header and brackets prompts
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "audio": "a.wav", "caption": "a dog barks"}\n'
                 '{"id": "b", "audio": "b.wav", "caption": "rain", "caption": "a cat meows"}\n')
    for read in (read_manifest, read_captions):
        with pytest.raises(ManifestError, match=r"m\.jsonl:2: caption given more than once in this record"):
            read(m)
    for name in ("prompts.CSV", "prompts.json", "prompts"):
        (tmp_path / name).write_text("id,audio,caption\na,a.wav,a dog barks\n")
        with pytest.raises(ManifestError, match=rf"{re.escape(name)}: captions are read by suffix from a \.txt"):
            read_captions(tmp_path / name)


def test_a_prompts_file_has_the_lines_wc_counts(tmp_path):
    """str.splitlines broke a line at U+2028 (text copied from a web page or PDF): 2 prompts became 4."""
    txt = tmp_path / "p.txt"
    txt.write_text("a dog barks\u2028loudly\r\nrain on a roof\n", encoding="utf-8")
    assert read_captions(txt) == ["a dog barks\u2028loudly", "rain on a roof"]
    txt.write_text("a dog barks\nrain\x85at night\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"p\.txt:2: caption 'rain\\x85at night' contains a line break"):
        read_captions(txt)


@pytest.mark.parametrize("rows, words", [  # cases that already gave a clear error
    ("id,caption\na,x\n", r"missing column\(s\) audio"),
    ("id,audio,caption\na,a.wav,x\na,b.wav,y\n", r"duplicate id\(s\) a"),
    ("id,audio,caption\na,a.wav,\n", "line 2: empty caption"),
    ("id,audio,caption\n", "manifest is empty"),
])
def test_manifest_errors_that_already_behaved_well(tmp_path, rows, words):
    with pytest.raises(ManifestError, match=words):
        read_manifest(csv_file(tmp_path / "m.csv", rows))


@pytest.mark.parametrize("name, text, words", [
    # the last of two same-named columns was used without a word
    ("m.csv", "id,audio,caption,audio\na,a.wav,x,other.wav\n", r"m\.csv:1: column\(s\) audio appear more than once"),
    # str() made these captions "['a', 'dog']" and "{'k': 1}"
    ("m.jsonl", '{"id": "a", "audio": "a.wav", "caption": ["a", "dog"]}\n', r'm\.jsonl:1: caption is \["a", "dog"\]'),
    ("m.jsonl", '{"id": "a", "audio": "a.wav", "caption": "x"}\n{"id": "b", "audio": {"k": 1}, "caption": "y"}\n',
     r'm\.jsonl:2: audio is \{"k": 1\}')])
def test_a_manifest_with_a_repeated_column_or_a_nested_value_is_named(tmp_path, name, text, words):
    (tmp_path / name).write_text(text)
    with pytest.raises(ManifestError, match=words):
        read_manifest(tmp_path / name)


@pytest.mark.parametrize("name, data, words", [
    # a UnicodeDecodeError traceback (exit 1) for each, from the manifest, subset and captions readers alike
    ("m.csv", "id,audio,caption\na,a.wav,caf\u00e9 noise\n".encode("latin-1"), r"m\.csv:2: not UTF-8 text"),
    ("m.jsonl", '{"id": "a", "audio": "a.wav", "caption": "x"}\n{"id": "b", "audio": "b.wav", "caption": "\u00e9"}\n'
     .encode("latin-1"), r"m\.jsonl:2: not UTF-8 text"),
    ("m.csv", "id,audio,caption\na,a.wav,x\n".encode("utf-16"), r"m\.csv:1: not UTF-8 text.*save the file as UTF-8"),
])
def test_a_manifest_in_another_encoding_names_the_line(tmp_path, name, data, words):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ManifestError, match=words):
        read_manifest(tmp_path / name)


def test_a_bom_is_not_part_of_a_jsonl_manifest_or_a_subset_file(tmp_path):
    # CSV took a BOM and JSONL refused it; a subset file kept it in its first id ("not in the reference: \ufeffa")
    from eval.reference import select

    m = tmp_path / "m.jsonl"
    m.write_bytes(b'\xef\xbb\xbf{"id": "a", "audio": "a.wav", "caption": "x"}\r\n{"id": "b", "audio": "b.wav", '
                  b'"caption": "y"}\r\n')
    rows = read_manifest(m)
    assert [r.id for r in rows] == ["a", "b"]
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"\xef\xbb\xbfb\r\n")
    assert [it.id for it in select(rows, m, subset=ids)] == ["b"]


# ---------------------------------------------------------------- audio files

def truncated_wav(path: Path, n: int = 16_000) -> Path:
    write_wav(path, tone(n))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header still declares n frames
    return path


def test_a_truncated_wav_is_a_warning_naming_the_file(tmp_path, caplog):
    p = truncated_wav(tmp_path / "cut.wav")
    with caplog.at_level(logging.WARNING):
        wav = load_audio(p)
    assert 0 < wav.shape[-1] < 8000  # the frames present
    assert f"{p}: truncated file" in caplog.text and "declares 32000 bytes" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        (clip,) = load_clips({"cut": p}, workers=1)
    assert clip.wav.size == wav.shape[-1] and f"{p}: truncated file" in caplog.text


def test_a_clip_shorter_than_one_codec_frame_is_a_warning(tmp_path, caplog):
    p = write_wav(tmp_path / "one.wav", np.full(1, 0.5, np.float32))
    with caplog.at_level(logging.WARNING):
        assert load_audio(p).shape[-1] == 1
        load_clips({"one": p}, workers=1)
    assert caplog.text.count(f"{p}") == 2 and f"shorter than one codec frame ({HOP} samples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a whole frame: no warning
        load_audio(write_wav(tmp_path / "frame.wav", tone(HOP)))
    assert not caplog.text


@pytest.mark.parametrize("content, words", [  # cases that already gave a clear error
    (b"RIFF\x00\x01garbage" * 50, "unreadable audio"),
    (np.zeros(8000, np.float32), "all-silent audio"),
    (np.zeros(0, np.float32), "empty audio"),
])
def test_audio_errors_that_already_behaved_well(tmp_path, content, words):
    p = tmp_path / "bad.wav"
    p.write_bytes(content) if isinstance(content, bytes) else write_wav(p, content, subtype="FLOAT")
    with pytest.raises(AudioError, match=f"bad.wav: {words}"):
        load_audio(p)


def test_stereo_whose_channels_cancel_is_said_to(tmp_path):
    # refused as "all-silent" only: the user opened the file and heard a loud tone
    x = tone(8000)
    p = tmp_path / "antiphase.wav"
    write_wav(p, np.stack([x, -x], 1), subtype="FLOAT")
    with pytest.raises(AudioError, match=r"all-silent audio \(peak -inf dBFS < -80 dBFS\); its 2 channels cancel in "
                                         r"the mono mix \(their own peak -\d+\.\d dBFS\): one channel is inverted"):
        load_audio(p)
    # one quiet channel beside a silent one: the mean is half of it, nothing cancels, nothing is inverted
    write_wav(p, np.stack([1.4e-4 * np.sign(x), 0 * x], 1), subtype="FLOAT")
    with pytest.raises(AudioError) as e:
        load_audio(p)
    assert str(e.value).endswith("all-silent audio (peak -83.1 dBFS < -80 dBFS)")


# ---------------------------------------------------------------- long files: memory bounded by the batch

def test_a_long_file_is_encoded_batch_by_batch(tmp_path):
    """audio.policy=segment put every segment of a file in one codec call (8.1 GB for 5 minutes).
    Now no call holds more than batch_size items, and the codes equal one call per segment."""
    cfg = AudioConfig("segment", 0.1)  # 1600-sample segments: 7 of them and a dropped residual
    p = write_wav(tmp_path / "long.wav", tone(7 * 1600 + 500) + 0.01)
    codec = Counting(demo_codec())
    row = Row("long", p, "a tone")
    _encode_codes({"k": row}, {"k": sha256(p.read_bytes())}, tmp_path / "out", codec, cfg, 3, progress=False)
    assert codec.sizes == [3, 3, 1]
    got = load_file(cache_path(tmp_path / "out", "codes", "k"))
    items, _, chunks = standardize(load_audio(p), cfg)
    assert got["chunks"].tolist() == chunks == list(range(7))
    for k in range(7):
        assert torch.equal(got["codes"][k], codec.inner.encode(items[k:k + 1])[0].to(torch.int16))


# ---------------------------------------------------------------- two launchers, one output folder

def slow_job(log: str, name: str, seconds: float) -> dict:
    """A job of the fake graph: says when it starts and ends (with its pid) and sleeps in between."""
    with open(log, "a") as f:
        f.write(f"start {name} {os.getpid()}\n")
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(f"end {name} {os.getpid()}\n")
    return {"name": name}


def launch(root: str, seconds: float) -> None:
    """A launcher of a two-job graph (b after a) in the debug executor (jobs run in this process)."""
    root = Path(root)
    log = str(root / "log.txt")
    jobs = [pipeline.Job("a", slow_job, {"log": log, "name": "a", "seconds": seconds}, root / "a.done"),
            pipeline.Job("b", slow_job, {"log": log, "name": "b", "seconds": 0}, root / "b.done", deps=["a"])]
    states = pipeline.run_local(jobs, root, "debug", retry=False, max_parallel=1)
    print(json.dumps({k: s.state for k, s in states.items()}))


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.time()
    while not (path.is_file() and text in path.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{text!r} never appeared in {path}"
        time.sleep(0.1)


def test_a_second_launcher_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    root, log = tmp_path / "out", tmp_path / "out" / "log.txt"
    first = _start(f"from tests.test_bad_inputs import launch; launch({str(root)!r}, 120)")
    _wait_for(log, "start a", first)
    second = _start(f"from tests.test_bad_inputs import launch; launch({str(root)!r}, 0)")
    _, err = second.communicate(timeout=60)
    assert second.returncode != 0 and "LockHeld" in err
    assert f"held by ablations launcher (pid {first.pid} on host {socket.gethostname()}, since" in err

    os.killpg(first.pid, signal.SIGKILL)  # kill -9: no chance to release anything
    first.wait()
    third = _start(f"from tests.test_bad_inputs import launch; launch({str(root)!r}, 0)")
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == {"a": "DONE", "b": "DONE"}
    assert f"taking over the lock of ablations launcher (pid {first.pid}" in err
    # a ran twice (the first run killed), never at the same time as another copy; b once; the refused launcher never
    assert log.read_text().split("\n")[:-1] == [f"start a {first.pid}", f"start a {third.pid}", f"end a {third.pid}",
                                               f"start b {third.pid}", f"end b {third.pid}"]


def test_a_stop_waits_for_the_submission_and_its_record():
    """A launcher stopped between sbatch and the ledger's record left jobs SLURM runs that no one knew of: the next
    launcher submitted them again. The signal now acts once the record is written."""
    from ablations.pipeline import held_signals

    seen = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with held_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            seen.append("recorded")
        assert seen == ["recorded", signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_waiting_lock_waits_for_its_holder_and_says_who(tmp_path, monkeypatch, caplog):
    """The probes' one-time preparation of the demo set (analysis.prepared.resolve) waits for another probe
    preparing it, rather than preparing into the same folder at once or refusing."""
    import threading

    from siren import lock

    monkeypatch.setattr(lock, "PROBE_GRACE_S", 0.1)
    path, order = tmp_path / "prepare.lock", []
    held = threading.Event()

    def other_probe():
        with hold(path, "another probe", ""):
            held.set()
            time.sleep(0.5)
            order.append("other done")

    t = threading.Thread(target=other_probe)
    t.start()
    held.wait()
    with caplog.at_level("INFO", logger="siren.lock"):
        with hold(path, "this probe", "", wait=True):
            order.append("this one")
    t.join()
    assert order == ["other done", "this one"] and "waiting for another probe (pid" in caplog.text


def test_a_job_starting_while_its_lock_is_probed_waits_for_the_probe(tmp_path, monkeypatch):
    """`action=status` asks who holds a job's lock with a brief shared lock: a job starting at that moment
    found the lock taken with no holder's details and died (no failure marker, its dependents stuck)."""
    import fcntl
    import threading

    from siren import lock

    path = tmp_path / "job.lock"
    probe = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(probe, fcntl.LOCK_SH)  # what lock.holder() takes for a moment
    threading.Timer(0.3, os.close, [probe]).start()
    with lock.hold(path, "job x", "wait"):
        assert lock.holder(path)["what"] == "job x"
    probe = os.open(path, os.O_RDWR)
    fcntl.flock(probe, fcntl.LOCK_SH)
    monkeypatch.setattr(lock, "PROBE_GRACE_S", 0.2)
    with pytest.raises(lock.LockHeld), lock.hold(path, "job x", "wait"):  # a lock that stays: still refused
        pass
    os.close(probe)
    # the same probe on a lock file that still names a dead holder (kill -9 leaves its details): the job was refused
    # at once, "held by ... pid 999999", instead of waiting the probe out
    path.write_text(json.dumps({"what": "job x", "pid": 999999, "host": "othernode", "started": "then"}))
    probe = os.open(path, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.1, os.close, [probe]).start()
    with lock.hold(path, "job x", "wait"):
        assert lock.holder(path)["pid"] == os.getpid()


def quick_job() -> None:
    pass


def test_a_job_a_killed_launcher_left_running_is_reported_running_not_failed(tmp_path, caplog, monkeypatch):
    # a launcher killed and run again at once started a second copy of a job whose first copy (the killed
    # launcher's, still starting) took the lock first: the copy refused its lock was reported FAILED
    from siren import lock

    job = pipeline.Job("x", quick_job, {}, tmp_path / "x.done")
    real, asked = lock.holder, []

    def holder(path):  # the launcher's first look: the other copy had not taken its lock yet
        asked.append(path)
        return None if len(asked) <= 2 else real(path)

    monkeypatch.setattr(lock, "PROBE_GRACE_S", 0.1)
    monkeypatch.setattr(lock, "holder", holder)
    with lock.hold(ledger.job_lock(job.done), "job x.done", "wait"), \
            caplog.at_level(logging.INFO, logger="ablations.pipeline"):
        states = pipeline.run_local([job], tmp_path, "debug", retry=False, max_parallel=1)
    assert states["x"].state == "RUNNING" and f"pid {os.getpid()}" in states["x"].log
    assert "is already running" in caplog.text and "failed" not in caplog.text
    assert not ledger.failed_marker(job.done).exists()


def test_a_done_marker_whose_output_is_gone_is_not_done(tmp_path):
    # results.json deleted, eval.done kept: DONE for good, and the table's row "pending" forever
    job = pipeline.Job("e", quick_job, {}, tmp_path / "eval.done", output=tmp_path / "eval" / "results.json")
    job.done.write_text("{}")
    st = ledger.Ledger(tmp_path).state(job)
    assert st.state == "FAILED" and f"delete {job.done} and run the grid again" in st.log


def failing_job(value: int) -> None:
    raise ValueError(f"value {value} is out of range\nsecond line")


def test_a_failed_local_job_is_reported_when_it_ends_with_its_own_error(tmp_path, caplog):
    """A real local job (its own process) fails: the launcher says so as it ends, with the step's error (not
    submitit's, whose last line is a log path), names its log, and the job that needs it does not start."""
    root = tmp_path / "out"
    jobs = [pipeline.Job("bad", failing_job, {"value": 7}, root / "bad.done"),
            pipeline.Job("after", failing_job, {"value": 8}, root / "after.done", deps=["bad"])]
    with caplog.at_level(logging.INFO, logger="ablations.pipeline"):
        states = pipeline.run_local(jobs, root, "local", retry=False, max_parallel=1, warm=False)
    assert states["bad"].state == "FAILED" and states["after"].state == "BLOCKED"
    assert states["bad"].log.endswith("_log.err (ValueError: value 7 is out of range second line)")
    line = next(r for r in caplog.records if "failed after" in r.getMessage())
    assert line.levelname == "ERROR" and "[1/2] bad failed" in line.getMessage()
    assert "the jobs that need it will not start; retry=true runs it again" in line.getMessage()
    assert states["bad"].log in line.getMessage() and Path(states["bad"].log.split(" (")[0]).is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ablations.pipeline"):  # without retry=true nothing is to run
        states = pipeline.run_local(jobs, root, "local", retry=False, max_parallel=1, warm=False)
    assert states["bad"].state == "FAILED" and not caplog.messages


def fails_while(flag: str, name: str) -> None:
    if Path(flag).exists():
        raise ValueError(f"{name}: {flag} is there")


def test_retry_runs_the_failed_job_and_the_jobs_that_waited_on_it(tmp_path):
    root, flag = tmp_path / "out", tmp_path / "broken"
    flag.touch()
    jobs = [pipeline.Job("bad", fails_while, {"flag": str(flag), "name": "bad"}, root / "bad.done"),
            pipeline.Job("after", fails_while, {"flag": str(tmp_path / "never"), "name": "after"}, root / "after.done",
                         deps=["bad"])]
    states = pipeline.run_local(jobs, root, "local", retry=False, max_parallel=1, warm=False)
    assert (states["bad"].state, states["after"].state) == ("FAILED", "BLOCKED")
    flag.unlink()  # the cause fixed
    states = pipeline.run_local(jobs, root, "local", retry=True, max_parallel=1, warm=False)
    assert (states["bad"].state, states["after"].state) == ("DONE", "DONE")


def test_a_grid_with_a_failed_job_writes_its_table_and_exits_1(tmp_path, monkeypatch, capsys):
    from ablations.run import main
    from siren import assets
    from siren.cli import call
    from tests.fixtures_data import tiny_set

    monkeypatch.setenv("SIREN_CACHE", str(tmp_path / "cache"))  # prepare's job fails: a DAC file that is not one
    for a in assets.ASSETS.values():
        assets.path(a.name).parent.mkdir(parents=True, exist_ok=True)
        assets.path(a.name).write_bytes(b"not a checkpoint")
    m = tiny_set(tmp_path / "src", n=2)
    args = ["grid=table6", "scale=paper", "rows=6-2", f"out={tmp_path / 'out'}", "executor=local", "calibration=false",
            *(f"set.data.{k}={m}" for k in ("train", "test", "prompts"))]
    assert call(main, args) == 1
    out = capsys.readouterr().out
    assert "1 job(s) failed; see the logs above; `retry=true` resubmits them" in out
    assert (tmp_path / "out" / "paper" / "tables" / "table6.md").is_file()


def test_a_running_job_is_not_started_again(tmp_path):
    """A job left running (e.g. by a killed launcher) holds its lock: a new launcher reports it as
    RUNNING with its pid and does not start a second copy, nor anything after it."""
    root, log = tmp_path / "out", tmp_path / "out" / "log.txt"
    root.mkdir()
    job = _start("from ablations.pipeline import run_marked; from tests.test_bad_inputs import slow_job; "
                 f"run_marked(slow_job, {str(root / 'a.done')!r}, dict(log={str(log)!r}, name='a', seconds=120), 1, "
                 "'.')")
    try:
        _wait_for(log, "start a", job)
        jobs = [pipeline.Job("a", slow_job, {"log": str(log), "name": "a", "seconds": 0}, root / "a.done"),
                pipeline.Job("b", slow_job, {"log": str(log), "name": "b", "seconds": 0}, root / "b.done", deps=["a"])]
        states = pipeline.run_local(jobs, root, "debug", retry=True, max_parallel=1)
        assert states["a"].state == "RUNNING" and f"pid {job.pid}" in states["a"].log
        assert states["b"].state == "BLOCKED" and log.read_text() == f"start a {job.pid}\n"
        with pytest.raises(LockHeld, match=rf"a\.done\.lock: held by job .*a\.done \(pid {job.pid}"):
            with hold(root / "a.done.lock", "test", "wait"):
                pass
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def test_the_grid_cli_goes_through_the_launcher_lock(tmp_path):
    """`ablations/run.py grid=...` on a folder whose lock is held submits nothing and names the holder."""
    from ablations.run import main

    with hold(tmp_path / "demo" / "launcher.lock", "ablations launcher", "wait"):
        with pytest.raises(LockHeld, match=rf"held by ablations launcher \(pid {os.getpid()} on host"):
            main(["grid=table6", "rows=6-2", f"out={tmp_path}", "executor=local"])
    assert not (tmp_path / "demo" / "jobs").exists()


def _fake_slurm(folder: Path) -> None:
    """sbatch and srun that exist but refuse every job, as on a login node whose controller is down."""
    folder.mkdir()
    for name in ("sbatch", "srun"):
        (folder / name).write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\n"
                                   "exit 1\n")
        (folder / name).chmod(0o755)


def test_slurm_problems_end_in_one_error_line(tmp_path, monkeypatch, capsys):
    """A missing or malformed profile, no sbatch on PATH and an sbatch that refuses the jobs each ended in a
    traceback (FileNotFoundError, yaml's ScannerError, RuntimeError, submitit's FailedJobError); now each is one
    error line naming the profile or quoting sbatch, exit code 2, and nothing is recorded as submitted."""
    from ablations.run import main
    from siren.cli import call

    bad_yaml, twice = tmp_path / "broken.yaml", tmp_path / "twice.yaml"
    bad_yaml.write_text("partition: [gpu\n")
    twice.write_text("partition: gpu\ntimeout_min: 30\npartition: cpu\n")  # YAML keeps the last, in silence
    grid = ["grid=table6", "rows=6-2", f"out={tmp_path / 'out'}", "executor=slurm"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for extra, words in [(["profile=nope"], "no SLURM profile 'nope'"),
                         ([f"profile={bad_yaml}"], f"{bad_yaml}: not valid YAML"),
                         ([f"profile={twice}"], f"{twice}: not valid YAML (key(s) partition given twice"),
                         (["profile=local"], "executor=slurm needs sbatch and srun on PATH")]:
        assert call(main, [*grid, *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"error: {words}" in err, err
    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert call(main, [*grid, "profile=local"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: sbatch refused data-" in err, err
    assert "Invalid account" in err and "the same command submits only the rest" in err
    assert not list((tmp_path / "out" / "demo").glob("jobs/*.json"))


def test_jobs_submitted_before_sbatch_refuses_are_recorded(tmp_path, monkeypatch, capsys):
    # a controller that takes the first job and then refuses (a QOS limit reached part way): the job it took is
    # in the ledger, so the next launch does not submit it a second time
    from ablations.run import main
    from siren.cli import call

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(f"""#!/bin/sh
if [ -e {tmp_path}/took ]; then echo 'sbatch: error: QOSMaxSubmitJobPerUserLimit' >&2; exit 1; fi
touch {tmp_path}/took; echo 'Submitted batch job 4242'
""")
    (bin_ / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    assert call(main, ["grid=table6", "rows=6-2", f"out={tmp_path / 'out'}", "executor=slurm", "profile=local"]) == 2
    err = capsys.readouterr().err
    assert "error: sbatch refused" in err and "QOSMaxSubmitJobPerUserLimit" in err
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "demo").glob("jobs/*.json")]
    assert len(records) == 1 and records[0]["executor"] == "slurm" and str(records[0]["job_id"]) == "4242"


def test_cancel_without_a_working_scancel_is_one_error_line(tmp_path, monkeypatch, capsys):
    """action=cancel ran scancel with check=True: with no scancel on PATH (the outputs copied off the cluster) it
    ended in FileNotFoundError's traceback, with one that fails in CalledProcessError's; now one error line each.
    Without sacct, action=status says so on each job's line instead of three warnings per job."""
    from ablations.run import main
    from siren.cli import call

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in [("sbatch", "echo 'Submitted batch job 4242'"), ("srun", "exit 0")]:
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))  # no sacct either: a job SLURM does not describe may still run
    grid = ["grid=table6", "rows=6-2", f"out={tmp_path / 'out'}", "executor=slurm", "profile=local"]
    assert call(main, grid) == 0 and "submitted" in capsys.readouterr().out
    assert call(main, [*grid, "action=status"]) == 0  # submitit warned about sacct three times per job
    out, err = capsys.readouterr()
    assert "sacct" not in err and out.splitlines()[-1].endswith(" UNKNOWN") and "no sacct on PATH" in out, (out, err)
    assert call(main, [*grid, "action=cancel"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: action=cancel needs scancel on PATH" in err, err
    (bin_ / "scancel").write_text("#!/bin/sh\necho 'scancel: error: Unable to contact slurm controller' >&2\nexit 1\n")
    (bin_ / "scancel").chmod(0o755)
    assert call(main, [*grid, "action=cancel"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: scancel refused to cancel" in err and "Unable to contact" in err, err


def test_a_wrong_metric_weights_file_is_named(tmp_path, monkeypatch):
    """A file put by hand into the assets cache that is not the published one (an HTML error page, another
    checkpoint, another network) ended in UnpicklingError, ValueError or load_state_dict's RuntimeError
    tracebacks; each is now an error of the project's own naming the file."""
    from eval.backbones import PannsCnn14
    from siren import assets
    from siren.errors import CheckpointError, WeightsMismatchError

    monkeypatch.setenv("SIREN_CACHE", str(tmp_path))
    dest = assets.path("panns_cnn14_16k")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match=r"Cnn14_16k_mAP=0\.438\.pth: not a readable torch file"):
        PannsCnn14("pretrained").net
    torch.save({"state_dict": {}}, dest)
    with pytest.raises(WeightsMismatchError, match="is not a PANNs checkpoint"):
        PannsCnn14("pretrained").net
    torch.save({"model": {"fc1.weight": torch.zeros(3, 3)}}, dest)
    with pytest.raises(WeightsMismatchError, match=r"does not fit PannsCnn14 \(.*prefetch panns_cnn14_16k"):
        PannsCnn14("pretrained").net
    # the file hashed into the backbone's id (feature cache keys) at __init__, replaced before its first use
    backbone = PannsCnn14("pretrained")
    torch.save({"model": {}}, dest)
    with pytest.raises(CheckpointError, match="changed while this run was using it"):
        backbone.net


def test_damaged_grid_records_are_named_and_a_damaged_result_fails_only_its_row(tmp_path, capsys):
    """The launcher's own files are written atomically, but a hand edit or a damaged disk can still break one: a
    results.json that does not parse ended the table in a JSONDecodeError traceback, and so did a ledger record.
    Now the row says failed with the file and the fix (the other rows and the table are written), and a damaged
    ledger record is one error line naming it."""
    from ablations.grid import load_grid
    from ablations.plan import cells_of, parse
    from ablations.run import main
    from siren.cli import call

    grid = ["grid=table6", "rows=1-12", f"out={tmp_path}", "calibration=false"]
    cell = cells_of(load_grid("table6"), parse(grid))[0].dir
    (cell / "eval").mkdir(parents=True)
    (cell / "eval" / "results.json").write_text('{"metrics": {"fd": 1.0')  # cut off
    (cell / "eval.done").write_text("{}")  # a finished evaluation's file, damaged since
    assert call(main, [*grid, "action=table"]) == 0
    row = next(l for l in (tmp_path / "demo" / "tables" / "table6.md").read_text().splitlines() if "| 1-12 | ours" in l)
    assert "failed" in row
    csv = (tmp_path / "demo" / "tables" / "table6.csv").read_text()
    assert "results.json: not readable JSON" in csv and f"delete {cell / 'eval.done'} and run the grid again" in csv
    # valid JSON that is no results.json (no metrics): the row fails, not a KeyError traceback
    (cell / "eval" / "results.json").write_text('{"status": "ok"}')
    assert call(main, [*grid, "action=table"]) == 0
    csv = (tmp_path / "demo" / "tables" / "table6.csv").read_text()
    assert "results.json: not an evaluation's results.json" in csv
    from ablations.ledger import Ledger

    ledger = Ledger(tmp_path / "demo")
    ledger._path("some/job").parent.mkdir(parents=True)
    ledger._path("some/job").write_text('{"executor": "local"')
    with pytest.raises(DataError, match=r"some__job\.json: not readable JSON .*delete it and run again"):
        ledger.get("some/job")
    for damaged in ('[]', '{"job_id": "1", "folder": "f"}', '{"executor": "slurm", "job_id": "--me", "folder": "f"}'):
        ledger._path("some/job").write_text(damaged)  # a KeyError; the last went to scancel as an option
        with pytest.raises(DataError, match=r"some__job\.json: not a job record .*delete it and run again"):
            ledger.get("some/job")


def test_a_damaged_training_log_leaves_the_figure_out_not_the_table(tmp_path, capsys, caplog):
    # the figure is drawn after the tables; a corrupt log ended the command in an error, exit 2
    from ablations.grid import load_grid
    from ablations.plan import cells_of, parse, stage1_dir
    from ablations.run import main
    from siren.cli import call

    grid = ["grid=table6", "rows=1-12", f"out={tmp_path}", "calibration=false"]
    run_cfg = parse(grid)
    (cell,) = cells_of(load_grid("table6"), run_cfg)
    expert = stage1_dir(cell, run_cfg) / "expert_0"
    expert.mkdir(parents=True)
    (expert / "log.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    (expert.parent / "expert_0.done").write_text("{}")
    with caplog.at_level("WARNING", logger="ablations.figures"):
        assert call(main, [*grid, "action=table"]) == 0
    assert (tmp_path / "demo" / "tables" / "table6.md").is_file()
    assert "the table6 figure is not drawn" in caplog.text and "log.jsonl:2: not a JSON object" in caplog.text


def test_a_damaged_prepared_index_is_named(tmp_path):
    """Training, evaluation and the probes read a prepared split's index first; one that does not parse was a
    JSONDecodeError traceback."""
    from siren.data.cache import index_path
    from siren.data.dataset import load_index

    path = index_path(tmp_path, "train")
    path.parent.mkdir(parents=True)
    path.write_text('{"items": [')
    with pytest.raises(DataError, match=r"train\.json: not readable JSON .*siren\.data\.prepare for split 'train'"):
        load_index(tmp_path, "train")
    # the index step reads each shard's record: a damaged one is named with the shard to prepare again
    from siren.data.cache import shard_path
    from siren.data.index import write_index

    shard = shard_path(tmp_path, "train", 1, 2)
    shard.parent.mkdir(parents=True)
    shard_path(tmp_path, "train", 0, 2).write_text("{}")
    shard.write_text('{"entries": [')
    with pytest.raises(DataError, match=r"shard-1-of-2\.json: not readable JSON .*run prepare for shard 1 again"):
        write_index(tmp_path, "train", num_shards=2)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_an_unreadable_torch_file_is_one_line_without_torchs_advice(tmp_path):
    """torch.load(weights_only=True)'s refusal is a page that advises weights_only=False (which would run code from
    the file); the error names the file and the cause in one line and passes no such advice on."""
    from siren.errors import CheckpointError
    from siren.io import load_torch_file

    torch.save({"w": torch.ones(3)}, tmp_path / "good.pt")
    whole = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "page.pt").write_text("<html>404 Not Found</html>")
    torch.save({"x": _RunsCode()}, tmp_path / "code.pt")
    torch.save({"x": np.zeros(3)}, tmp_path / "numpy.pt")
    assert torch.equal(load_torch_file(tmp_path / "good.pt")["w"], torch.ones(3))
    for name, cause in [("truncated", "failed reading zip archive"), ("page", "Unsupported operand 60"),
                        ("code", "unsupported GLOBAL posix.system"), ("numpy", "Unsupported global: GLOBAL numpy")]:
        with pytest.raises(CheckpointError) as e:
            load_torch_file(tmp_path / f"{name}.pt")
        message = str(e.value)
        assert message.startswith(f"{tmp_path / name}.pt: not a readable torch file (") and cause in message
        assert "\n" not in message and "weights_only` set to `False`" not in message and "trust" not in message


# ---------------------------------------------------------------- non-finite training, config values (issue 13)

@pytest.mark.parametrize("arg, key", [("train.lr=nan", "train.lr"), ("train.lr=-1", "train.lr"),
                                      ("train.grad_clip=-1", "train.grad_clip"), ("train.crop_s=-3", "train.crop_s"),
                                      ("train.device=tpu", "train.device"), ("train.min_lr=inf", "train.min_lr"),
                                      ("train.schedule=linear", "train.schedule"),
                                      ("train.decay_frac=0", "train.decay_frac")])
def test_bad_train_values_fail_when_parsed(arg, key):
    from siren.errors import ConfigError
    from siren.train import parse

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse([arg])


@pytest.mark.parametrize("module, schema, arg", [
    ("benchmarks.train", "BenchConfig", "steps=-1"), ("benchmarks.eval", "BenchConfig", "n=-1"),
    ("benchmarks.sample", "BenchConfig", "probes=0"), ("benchmarks.clap", "ClapBenchConfig", "clips=0"),
    ("benchmarks.prepare_memory", "MemoryConfig", "minutes=0"),
    ("benchmarks.index_memory", "IndexMemoryConfig", "items=0")])
def test_bad_benchmark_values_fail_when_parsed(module, schema, arg):
    """benchmarks.train steps=-1 ended in a StatisticsError traceback, benchmarks.eval n=-1 in a ValueError."""
    import importlib

    from siren.config import load_config
    from siren.errors import ConfigError

    with pytest.raises(ConfigError, match=arg.split("=")[0]):
        load_config(getattr(importlib.import_module(module), schema), [arg])


@pytest.mark.parametrize("arg, words", [("metrics=fd,isk", r"unknown \['isk'\]"), ("metrics=,", "no metric"),
                                        ("is_seed=-1", "is_seed must be >= 0"), ("is_seed=4294967296", "2\\*\\*32")])
def test_bad_eval_values_fail_when_parsed(tmp_path, arg, words):
    """metrics= was checked only when evaluating (a grid's set.eval.metrics=fd,isk after every cell had trained),
    is_seed=-1 not at all (numpy's ValueError traceback after the embeddings); both are refused when parsed."""
    from ablations.grid import load_grid
    from ablations.plan import cells_of, parse
    from eval.config import EvalConfig
    from siren.config import load_config
    from siren.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        load_config(EvalConfig, [arg])
    with pytest.raises(ConfigError, match=words):
        cells_of(load_grid("table5"), parse(["grid=table5", f"out={tmp_path}", f"set.eval.{arg}"]))
    assert not any(tmp_path.iterdir())


def test_a_grid_refuses_an_unknown_set_key_before_submitting(tmp_path):
    from ablations.grid import load_grid
    from ablations.plan import cells_of, parse
    from siren.errors import ConfigError

    run = parse(["grid=table5", f"out={tmp_path}", "set.train.stepz=5"])
    with pytest.raises(ConfigError, match=r"train\.stepz.*Did you mean train\.steps"):
        cells_of(load_grid("table5"), run)
    assert not any(tmp_path.iterdir())  # nothing planned, written or submitted


@pytest.mark.parametrize("arg", ["set.eval.out=/elsewhere", "set.eval.ref=other.csv", "set.eval.weights=random",
                                 "set.rl.run_dir=/another/run", "set.rl.out=/elsewhere", "set.rl.codec.weights=random"])
def test_a_grid_refuses_set_keys_its_steps_set_themselves(tmp_path, arg):
    """set.eval.out= / set.rl.run_dir= came after the step's own keys and won: results written outside the cell's
    folder (and looked for in it), another run aligned under this row."""
    from ablations.grid import load_grid
    from ablations.plan import cells_of, parse
    from siren.errors import ConfigError

    key = arg[len("set."):].split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: set by the grid for each cell"):
        cells_of(load_grid("table7"), parse(["grid=table7", f"out={tmp_path}", arg]))
    with pytest.raises(ConfigError, match="set.train.steps: expected set.KEY=VALUE"):  # was dropped without a word
        parse(["grid=table7", f"out={tmp_path}", "set.train.steps"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arg, words", [
    ("set.data.demo_train=abc", "demo_train"), ("set.data.demo_test=0", "demo_test must be > 0"),
    ("set.data.source=frob", "data.source must be demo or manifest"),
    # 15 test clips: IS splits of one clip score exactly 1, refused by the eval jobs after training
    ("set.data.demo_test=1", r"gives 15 test clips: IS with eval.is_splits=10 needs 2 a split; set "
                             r"set.eval.is_splits=K \(K <= 7\)"),
    # the demo source evaluates on the embedded test split whatever set.data.test says: the table was the demo
    # set's, after every cell was prepared and trained again (the key is part of their ids)
    ("set.data.test=/my/test.csv", r"data.test: data.source=demo does not read it; leave it out, or "
                                   r"set.data.source=manifest"),
    ("set.data.subset=/my/ids.txt", "data.subset: data.source=demo does not read it")])
def test_a_grid_refuses_bad_data_keys_before_submitting(tmp_path, arg, words):
    # these were accepted, then failed inside the prepare job (data.source=frob: "scale=paper needs your manifests")
    from ablations.grid import load_grid
    from ablations.plan import cells_of, parse
    from siren.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        cells_of(load_grid("table6"), parse(["grid=table6", f"out={tmp_path}", arg]))
    assert not any(tmp_path.iterdir())


def test_a_paper_grid_names_a_missing_manifest_before_submitting(tmp_path):
    # a typo in set.data.test surfaced in the eval job, after every expert had trained
    from ablations.run import main
    from siren.errors import ConfigError

    for name in ("train.csv", "prompts.csv"):
        (tmp_path / name).write_text("id,audio,caption\n")
    args = ["grid=table6", "scale=paper", "rows=6-2", f"out={tmp_path / 'out'}", "executor=local",
            f"set.data.train={tmp_path / 'train.csv'}", f"set.data.test={tmp_path / 'tset.csv'}",
            f"set.data.prompts={tmp_path / 'prompts.csv'}"]
    with pytest.raises(ConfigError, match=r"no such file: set\.data\.test=.*tset\.csv; give"):
        main(args)
    assert not (tmp_path / "out").exists()
    # manifests asked for at scale=demo: the error said "scale=paper needs your manifests"
    with pytest.raises(ConfigError, match=r"^data\.source=manifest \(scale=paper's\) needs your manifests: "
                                          r"set\.data\.train=FILE"):
        main(["grid=table6", "rows=6-2", f"out={tmp_path / 'out'}", "set.data.source=manifest"])
    assert main([*args, "action=status"]) == 0  # status reads no manifest


def test_a_pretrained_grid_names_missing_weights_before_submitting(tmp_path, monkeypatch):
    # every job failed on its node after the queue wait, and the cells' ids hashed the files as missing, so a
    # grid launched again after the prefetch had other ids
    from ablations.run import main
    from siren import assets
    from siren.errors import MissingWeightsError

    monkeypatch.setenv("SIREN_CACHE", str(tmp_path / "cache"))
    assets.path("clap").parent.mkdir(parents=True)
    assets.path("clap").write_bytes(b"x")
    for name in ("train.csv", "test.csv", "prompts.csv"):
        (tmp_path / name).write_text("id,audio,caption\n")
    args = ["grid=table6", "scale=paper", "rows=6-2", f"out={tmp_path / 'out'}", "executor=local",
            *(f"set.data.{k}={tmp_path / k}.csv" for k in ("train", "test", "prompts"))]
    with pytest.raises(MissingWeightsError) as e:
        main(args)
    assert "prefetch dac_16khz panns_cnn14_16k roberta_merges roberta_vocab vggish`" in str(e.value)
    assert "clap (" not in str(e.value) and not (tmp_path / "out").exists()
    assert main([*args, "action=status"]) == 0  # status and table need no weights
    # the metric networks only where the evaluation's metrics= reads them (CLAP's file is the text encoder's)
    from ablations.grid import load_grid
    from ablations.plan import cells_of, check_assets, parse

    for name in ("dac_16khz", "roberta_vocab", "roberta_merges"):
        assets.path(name).parent.mkdir(parents=True, exist_ok=True)
        assets.path(name).write_bytes(b"x")
    check_assets(cells_of(load_grid("table6"), parse([*args, "set.eval.metrics=clap"])))
    with pytest.raises(MissingWeightsError, match=r"2 file\(s\) .*prefetch panns_cnn14_16k vggish`"):
        check_assets(cells_of(load_grid("table6"), parse(args)))


def test_a_set_override_equal_to_the_default_is_the_same_cell(tmp_path):
    # `set.` values are command-line strings; hashed as such, "300" made a new cell beside the default's 300
    # and the grid retrained every cell it already had
    from ablations.grid import load_grid
    from ablations.plan import cells_of, parse

    def ids(*sets):
        return [c.id for c in cells_of(load_grid("table6"), parse(["grid=table6", f"out={tmp_path}", *sets]))]

    default = ids()
    assert ids("set.train.steps=300", "set.train.lr=3e-3", "set.data.demo_train=20", "set.model.dropout=0") == default
    assert ids("set.train.lr=0.0030") == default
    # keys the scale leaves to the stage's own default: spelled out, they made new cells (everything retrained)
    assert ids("set.train.grad_clip=1.0", "set.train.seed=0", "set.eval.candidates=1") == default
    assert ids("set.train.grad_clip=1") == default and ids("set.train.grad_clip=2") != default
    # a model key at the preset's value (d=64 in the demo's tiny preset) made a new cell; judged against the preset
    # the overrides end with, in any order (the legacy arch has head biases); other values keep their former ids
    assert ids("set.model.dim=64", "set.model.head_bias=false") == default != ids("set.model.head_bias=true")
    assert ids("set.model.arch=legacy", "set.model.head_bias=false") == \
        ids("set.model.head_bias=false", "set.model.arch=legacy") != ids("set.model.arch=legacy")
    # a boolean in the spellings the stages read alike (OmegaConf's) is one cell: five spellings trained five models
    on = ids("set.model.head_bias=true")
    assert all(ids(f"set.model.head_bias={v}") == on for v in ("True", "yes", "1", "on"))
    assert all(ids(f"set.model.head_bias={v}") == default for v in ("False", "no", "0", "off"))
    with pytest.raises(ConfigError, match=r"bad value for 'model.head_bias': '\+-1'"):  # a typo: named, not a traceback
        ids("set.model.head_bias=+-1")
    off = ids("set.eval.cache=false")
    assert off != default and all(ids(f"set.eval.cache={v}") == off for v in ("no", "0", "OFF"))
    # ... but a key the grid sets itself is refused at any value (at its stage default it was dropped in silence)
    from ablations.plan import parse

    with pytest.raises(ConfigError, match=r"eval\.weights: set by the grid for each cell"):
        ids("set.eval.weights=pretrained")
    with pytest.raises(ConfigError, match=r"'set\.train\.steps' given twice, as '3' and as '4'"):
        parse(["grid=table6", f"out={tmp_path}", "set.train.steps=3", "set.train.steps=4"])
    assert ids("set.train.steps=301") != default


def test_a_non_finite_loss_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path):
    import re

    from siren import checkpoint as ckpt
    from siren.train import NonFiniteError, train
    from tests.fixtures_train import synthetic_data, tiny_config

    run, data = tmp_path / "run", synthetic_data()
    data.train.items[4]["text"] = data.train.items[4]["text"] * float("nan")  # NaN loss whenever item 4 is drawn
    with pytest.raises(NonFiniteError, match=r"expert 0, step \d+: non-finite loss") as e:
        train(tiny_config(run, "train.steps=12", "train.ckpt_every=1"), data, handle_signals=False)
    failed = int(re.search(r"step (\d+)", str(e.value)).group(1))
    assert failed == 3  # item 4 is first drawn at step 3 with this seed: checkpoints of steps 1 and 2 before it
    last = ckpt.load_latest(run / "expert_0")
    assert last.step == failed - 1  # every step before it saved, nothing after
    assert all(t.isfinite().all() for t in last.model_state().values())


def test_non_finite_weights_are_never_saved_nor_resumed(tmp_path):
    import shutil

    from siren import checkpoint as ckpt
    from siren.errors import CheckpointError
    from siren.io import save_tensors, write_text
    from siren.train import train
    from tests.fixtures_train import synthetic_data, tiny_config

    run = tmp_path / "run"
    train(tiny_config(run, "train.steps=8", "train.ckpt_every=4"), synthetic_data(), handle_signals=False)
    edir = run / "expert_0"
    weights = ckpt.load_latest(edir).model_state()
    name = next(k for k, v in weights.items() if v.is_floating_point())
    bad = {k: v.clone() for k, v in weights.items()}
    bad[name][...] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        ckpt.save(edir, 9, bad, {}, {}, keep_last=3)
    assert ckpt.load_latest(edir).step == 8  # nothing written
    # an unfinished run whose newest checkpoint holds NaN (as an older version could leave): refused, with the fix
    shutil.rmtree(edir / "step_00000008")
    write_text(edir / "latest", "step_00000004\n")
    save_tensors(edir / "step_00000004" / "model.safetensors", bad)
    state = json.loads((edir / "step_00000004" / "state.json").read_text())
    del state["sha256"]  # an older version recorded no digests (with them, the replaced file is refused as such)
    write_text(edir / "step_00000004" / "state.json", json.dumps(state))
    with pytest.raises(CheckpointError, match=r"step_00000004.*non-finite values.*start this expert again"):
        train(tiny_config(run, "train.steps=8", "train.ckpt_every=4"), synthetic_data(), handle_signals=False)


def test_params_names_an_unknown_model_family():
    """family=frob was "unknown config key 'family'", for a key the docstring shows."""
    from siren.errors import ConfigError
    from siren.model.params import main

    with pytest.raises(ConfigError, match="family=frob: discrete"):
        main(["family=frob"])


# ---------------------------------------------------------------- a resumed generation reuses only its own clips

def test_generation_into_a_folder_of_other_clips_is_refused(tmp_path):
    """`eval/audiocaps.py ckpt=A out=O`, then `ckpt=B out=O` (or another seconds=, caption_index=): the
    second evaluated A's clips under B's name; now the clips' record (generation.json) names the difference."""
    import soundfile as sf

    from eval.generate import generate_set
    from siren.config import to_dict
    from siren.errors import ConfigError
    from siren.sample import SampleConfig
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_rl import make_stage1_run

    codec, text = demo_codec(), TextEncoder(TextConfig(weights="random"))
    runs = [make_stage1_run(tmp_path / f"run{s}", "12-1", seed=s, tables=codec.code_tables(), codec_id=codec.id,
                            text_id=text.id, frontends={"codec": to_dict(codec.cfg), "text": to_dict(text.cfg)})
            for s in (0, 1)]
    gen, ids = tmp_path / "gen", ["a", "b"]

    def generate(run, seconds=0.1, captions=("a dog barks", "rain")):
        return generate_set(run, ids, list(captions), gen, seconds=seconds, batch_size=2, seed=0,
                            sample=SampleConfig())

    assert generate(runs[0])["generated_now"] == 2
    made = {p.name: p.read_bytes() for p in gen.glob("*.wav")}
    for args, words in [((runs[1],), "weights_sha256="), ((runs[0], 0.2), "n_frames=5 there, 10 now"),
                        ((runs[0], 0.1, ("a dog barks", "wind")), "1 clip.* another caption .*'rain' there")]:
        with pytest.raises(ConfigError, match=words):
            generate(*args)
    assert {p.name: p.read_bytes() for p in gen.glob("*.wav")} == made  # nothing overwritten
    record = json.loads((gen / "generation.json").read_text())
    (gen / "generation.json").write_text(json.dumps({**record, "settings": {**record["settings"], "device": "cuda"}}))
    with pytest.raises(ConfigError, match="device='cuda' there, 'cpu' now"):  # another device draws other clips
        generate(runs[0])
    older = {k: v for k, v in record["settings"].items() if k not in ("device", "scorer")}
    (gen / "generation.json").write_text(json.dumps({**record, "settings": older}))  # recorded before 2026-12-06
    with mock.patch("eval.generate.run_frontends", side_effect=AssertionError("frontends built for nothing")):
        assert generate(runs[0])["generated_now"] == 0  # the same settings resume, with nothing to build
    # a clip replaced by hand (other bytes, same name): it was scored as the model's own
    a = (gen / "a.wav").read_bytes()
    sf.write(gen / "a.wav", np.zeros(5 * HOP, dtype=np.float32), 16_000, subtype="FLOAT")
    with pytest.raises(ConfigError, match=r"1 clip\(s\) not the bytes generated \(e.g. .*a.wav"):
        generate(runs[0])
    (gen / "a.wav").write_bytes(a)
    assert generate(runs[0])["generated_now"] == 0
    (gen / "generation.json").write_text('{"run_dir": ')  # damaged: was a JSONDecodeError traceback
    with pytest.raises(DataError, match=r"generation.json: not readable JSON .*delete .*gen"):
        generate(runs[0])
    (gen / "generation.json").unlink()  # clips of unknown origin
    with pytest.raises(ConfigError, match="holds 2 clip.* no generation.json"):
        generate(runs[0])
    for p in gen.glob("*.wav"):
        p.unlink()
    assert generate(runs[1])["generated_now"] == 2 and sf.info(gen / "a.wav").frames == 5 * HOP


def test_an_evaluation_refused_for_its_clips_leaves_the_folders_results(tmp_path):
    """`ckpt=R out=O` then the same with gen_seed=1: refused (O/gen holds seed 0's clips), but O/results.json, still
    the result of those clips, had been moved to results.previous.json first (a second refusal lost it)."""
    from eval.audiocaps import evaluate
    from eval.config import EvalConfig
    from siren.config import to_dict
    from siren.data.demo import demo_set
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_rl import make_stage1_run

    codec, text = demo_codec(), TextEncoder(TextConfig(weights="random"))
    run = make_stage1_run(tmp_path / "run", "12-1", tables=codec.code_tables(), codec_id=codec.id, text_id=text.id,
                          frontends={"codec": to_dict(codec.cfg), "text": to_dict(text.cfg)})
    test = demo_set(tmp_path / "demo", n_train=1, n_test=1).test
    ref = test.parent / "two.csv"  # beside it: its audio paths are relative to the manifest's folder
    ref.write_text("".join(test.read_text().splitlines(keepends=True)[:3]))
    args = dict(ckpt=str(run), ref=str(ref), out=str(tmp_path / "o"), weights="random", metrics="kl", seconds=0.1,
                cache=False)
    evaluate(EvalConfig(**args))
    first = (tmp_path / "o" / "results.json").read_text()
    with pytest.raises(ConfigError, match="holds clips generated otherwise .*seed=0 there, 1 now"):
        evaluate(EvalConfig(**args, gen_seed=1))
    assert (tmp_path / "o" / "results.json").read_text() == first
    assert not (tmp_path / "o" / "results.previous.json").exists()
    evaluate(EvalConfig(**args))  # run again: the earlier result is set aside once this one starts
    assert (tmp_path / "o" / "results.previous.json").read_text() == first


def test_a_generation_keeps_only_clips_of_the_same_batch_and_survives_a_kill_while_writing(tmp_path):
    """A clip's draws depend on its batch (the seed of its first position, the companions sharing the generator):
    clips of a subset= run were kept by a later whole-set run into the same folder. And a job killed after a
    clip was renamed into place but before the record was written was refused on resume as 'put there by hand':
    a batch's clips are recorded first, then renamed into place, so a kill while writing them leaves none."""
    import soundfile as sf

    from eval import generate as generate_module
    from eval.generate import generate_set
    from siren.config import to_dict
    from siren.errors import ConfigError
    from siren.sample import SampleConfig
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_rl import make_stage1_run

    codec, text = demo_codec(), TextEncoder(TextConfig(weights="random"))
    run = make_stage1_run(tmp_path / "run", "12-1", seed=0, tables=codec.code_tables(), codec_id=codec.id,
                          text_id=text.id, frontends={"codec": to_dict(codec.cfg), "text": to_dict(text.cfg)})

    def generate(gen, ids, captions):
        return generate_set(run, ids, captions, gen, seconds=0.1, batch_size=2, seed=0, sample=SampleConfig())

    assert generate(tmp_path / "sub", ["b"], ["rain"])["generated_now"] == 1  # b alone, at position 0
    with pytest.raises(ConfigError, match=r"1 clip\(s\) made in another batch of the set \(e.g. b: in the batch at "
                                          r"position 0 of 1 clip\(s\) there, at 0 of 2 now"):
        generate(tmp_path / "sub", ["a", "b"], ["a dog barks", "rain"])
    real, calls = generate_module.write_clip, []

    def killed_at_the_second_clip(path, *args, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *args, **kw)

    with mock.patch("eval.generate.write_clip", killed_at_the_second_clip), pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "gen", ["a", "b"], ["a dog barks", "rain"])
    assert not list((tmp_path / "gen").glob("*.wav")) and not list((tmp_path / "gen").glob(".*.tmp"))
    assert generate(tmp_path / "gen", ["a", "b"], ["a dog barks", "rain"])["generated_now"] == 2
    whole = tmp_path / "whole"
    generate(whole, ["a", "b"], ["a dog barks", "rain"])
    # the uninterrupted clip, byte for byte (libsndfile's float WAV had a PEAK chunk holding the time it was written)
    assert (whole / "b.wav").read_bytes() == (tmp_path / "gen" / "b.wav").read_bytes()
    assert np.array_equal(sf.read(whole / "b.wav")[0], sf.read(tmp_path / "gen" / "b.wav")[0])


def test_a_generation_stopped_mid_batch_resumes_to_the_uninterrupted_clips(tmp_path):
    """A batch shares one generator seeded by its first row. Resumed, the missing clips were batched anew
    (b and d together, seeded by b's row), so they came out other than the uninterrupted run's; now the set's
    own batches are drawn again whole and only the missing clips written. Another batch size is refused."""
    import soundfile as sf

    from eval.generate import generate_set
    from siren.config import to_dict
    from siren.errors import ConfigError
    from siren.sample import SampleConfig
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_rl import make_stage1_run

    codec, text = demo_codec(), TextEncoder(TextConfig(weights="random"))
    run = make_stage1_run(tmp_path / "run", "12-1", seed=0, tables=codec.code_tables(), codec_id=codec.id,
                          text_id=text.id, frontends={"codec": to_dict(codec.cfg), "text": to_dict(text.cfg)})
    ids, caps = ["a", "b", "c", "d"], ["a dog barks", "rain", "a siren wails", "wind"]

    def generate(gen, batch_size=2):
        return generate_set(run, ids, caps, gen, seconds=0.1, batch_size=batch_size, seed=0, sample=SampleConfig())

    whole = tmp_path / "whole"
    generate(whole)
    for name in ("b.wav", "d.wav"):  # stopped after a and c were written
        (whole / name).rename(tmp_path / name)
    assert generate(whole)["generated_now"] == 2
    for name in ("b.wav", "d.wav"):  # the samples (a float WAV's PEAK chunk holds the time it was written)
        assert np.array_equal(sf.read(whole / name)[0], sf.read(tmp_path / name)[0])
    (whole / "d.wav").unlink()
    with pytest.raises(ConfigError, match="batch_size=2 there, 4 now"):
        generate(whole, batch_size=4)


def test_collapse_is_decided_over_the_whole_set(tmp_path, monkeypatch):
    """itg when at least half the set's samples collapse: it was decided on the batches generated so far, so a
    first batch of collapsed clips (2 of 6 here) made the whole set itg. Now the count is the set's, carried over
    a resume in generation.json; the real sampler runs, and collapse is marked for the captions saying 'hum'."""
    import eval.generate as G
    from siren.config import to_dict
    from siren.sample import SampleConfig
    from siren.text import TextConfig, TextEncoder
    from tests.fixtures_rl import make_stage1_run

    codec, text = demo_codec(), TextEncoder(TextConfig(weights="random"))
    run = make_stage1_run(tmp_path / "run", "12-1", seed=0, tables=codec.code_tables(), codec_id=codec.id,
                          text_id=text.id, frontends={"codec": to_dict(codec.cfg), "text": to_dict(text.cfg)})
    real, marked = G.generate_with_info, {}

    def marking(model, states, n_frames, sample, seed):
        codes, info = real(model, states, n_frames, sample, seed=seed)
        info.collapsed = torch.tensor(marked["rows"].pop(0))
        return codes, info

    monkeypatch.setattr(G, "generate_with_info", marking)
    ids = list("abcdef")

    def generate(gen, caps):
        marked["rows"] = [["hum" in caps[i] for i in rows] for rows in (range(0, 2), range(2, 4), range(4, 6))]
        marked["rows"] = [r for r, done in zip(marked["rows"], [(gen / f"{ids[i]}.wav").is_file()
                                                                 for i in (0, 2, 4)]) if not done]
        return G.generate_set(run, ids, caps, gen, seconds=0.1, batch_size=2, seed=0, sample=SampleConfig())

    card = generate(tmp_path / "two", ["hum", "hum", "rain", "wind", "dog", "bell"])
    assert card["collapsed"] == 2 and len(list((tmp_path / "two").glob("*.wav"))) == 6
    three = tmp_path / "three"
    with pytest.raises(G.CannotGenerate, match="3 of the set's 6 samples collapsed"):
        generate(three, ["hum", "hum", "rain", "wind", "hum", "bell"])
    assert sorted(p.stem for p in three.glob("*.wav")) == list("abcd")  # the last batch is not written
    with pytest.raises(G.CannotGenerate, match="3 of the set's 6"):  # resumed: a and b counted from the record
        generate(three, ["hum", "hum", "rain", "wind", "hum", "bell"])


def test_a_missing_or_empty_eval_subset_is_named(tmp_path, capsys):
    """subset= naming no file ended in a FileNotFoundError traceback; an empty one in 'the reference set has
    0 clip(s)', not naming the subset file."""
    from eval.audiocaps import main

    for i in "ab":
        write_wav(tmp_path / f"{i}.wav", tone(8000))
    ref = csv_file(tmp_path / "R.csv", "id,audio,caption\na,a.wav,a\nb,b.wav,b\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    for subset, words in [(tmp_path / "nope.txt", "nope.txt is not a file"), (tmp_path, "is not a file"),
                          (tmp_path / "blank.txt", "blank.txt lists no id")]:
        assert main([f"gen_dir={tmp_path}", f"ref={ref}", f"subset={subset}", "weights=random", "metrics=fd",
                     f"out={tmp_path / 'out'}"]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.parametrize("split", ["../../esc", "a/b", "..", "a\\b"])
def test_a_prepare_split_cannot_name_a_file_outside_out(split):
    """prepare split=../../esc wrote <out>/../esc.json and <out>/../esc.shards/, outside out=."""
    from siren.data.prepare import parse

    with pytest.raises(DataError, match=r"split=.* names the file <out>/splits/<split>\.json"):
        parse(["manifest=m.csv", "out=o", f"split={split}"])


@pytest.mark.parametrize("module, arg, words", [
    ("siren.data.prepare", "shard=-5", r"shard=-5 must be in \[0, num_shards=1\)"),
    ("siren.data.prepare", "crop_s=-1", "crop_s must be >= 0"),
    ("siren.data.prepare", "crop_s=6 crop_step_s=0", "crop_step_s must be > 0"),
    ("siren.data.filter", "shard=-5", r"shard in \[0, num_shards\).*shard=-5")])
def test_bad_data_values_fail_when_parsed(module, arg, words):
    """shard=-5 encoded (or scored) every shard as -1 does; prepare crop_s=-1 ran with the crop filter off;
    crop_step_s=0 was refused only after the models were built."""
    import importlib

    from siren.errors import SirenError

    with pytest.raises(SirenError, match=words):
        importlib.import_module(module).parse(["manifest=m.csv", "out=o", *arg.split()])


def test_an_eval_cache_dir_that_is_a_file_is_named(tmp_path, capsys):
    """cache_dir=FILE (or a folder under a file) ended in a NotADirectoryError traceback at the first write."""
    from eval.audiocaps import main

    for i in "ab":
        write_wav(tmp_path / "gen" / f"{i}.wav", tone(8000))
    ref = csv_file(tmp_path / "R.csv", f"id,audio,caption\na,{tmp_path}/gen/a.wav,a\nb,{tmp_path}/gen/b.wav,b\n")
    for cache in (ref, ref / "sub"):
        assert main([f"gen_dir={tmp_path / 'gen'}", f"ref={ref}", f"cache_dir={cache}", "weights=random",
                     "metrics=fd", f"out={tmp_path / 'out'}"]) == 2
        assert f"{ref} is a file, not a folder; pass cache_dir=FOLDER" in capsys.readouterr().err


@pytest.mark.parametrize("module, schema, arg", [
    ("siren.data.filter", "FilterConfig", "demo_seed=-1"), ("siren.data.filter", "FilterConfig", "seed=-1"),
    ("siren.demo_assets.codec", "CodecRecipe", "seed=-1"), ("siren.demo_assets.codec", "CodecRecipe", "n_test=-1"),
    ("siren.demo_assets.backbones", "BuildConfig", "seed=-1"), ("siren.demo_assets.check", "CheckConfig", "seed=-1")])
def test_negative_demo_and_draw_seeds_fail_when_parsed(module, schema, arg):
    """The demo set's clips and filter's train_n draw seed numpy, which refuses negative seeds: filter
    manifest=demo demo_seed=-1 (and demo_assets codec/backbones/check seed=-1) ended in its ValueError traceback,
    filter seed=-1 at step=select; codec n_test=-1 wrote an empty test split. All named when parsed, as
    siren.data.demo's own seed= already was."""
    import importlib

    from siren.config import load_config
    from siren.errors import ConfigError

    with pytest.raises(ConfigError, match=arg.split("=")[0] + " must be >= 0"):
        load_config(getattr(importlib.import_module(module), schema), [arg])


# ---------------------------------------------------------------- an output folder that is a file

@pytest.mark.parametrize("module, key, args", [
    ("siren.train", "run_dir", []), ("siren.data.prepare", "out", ["manifest=m.csv"]),
    ("siren.data.filter", "select_out", ["manifest=m.csv", "out=o"]),
    ("siren.rl.config", "out", ["run_dir=r"]), ("ablations.plan", "out", ["grid=table6"])])
def test_an_output_folder_that_is_a_file_is_named_when_parsed(tmp_path, module, key, args):
    """out= (run_dir=, select_out=) naming an existing file, or a folder under one, ended in a NotADirectoryError
    or FileExistsError traceback at the first write: for the grid's action=status and table at once, for train,
    prepare and eval after the models were built, for a probe after all its computing."""
    import importlib

    from siren.errors import ConfigError

    (tmp_path / "f").write_text("")
    for where in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(ConfigError, match=rf"{key}=.*: .*f is a file, not a folder; give {key}=FOLDER"):
            importlib.import_module(module).parse([*args, f"{key}={where}"])


@pytest.mark.parametrize("module, key, args", [
    ("siren.train", "run_dir", []), ("siren.data.prepare", "out", ["manifest=m.csv"]),
    ("siren.rl.config", "out", ["run_dir=r"]), ("ablations.plan", "out", ["grid=table6"])])
def test_an_output_folder_with_a_newline_or_through_a_dangling_link_is_named_when_parsed(tmp_path, module, key,
                                                                                            args):
    """A newline in out= went into the sbatch script, where submitit's quoting does not stop it from starting a
    shell command (and sbatch then ignores the directives after it: the time limit and USR2); a dangling link
    was walked past and ended in a FileExistsError traceback at the first write."""
    import importlib

    from siren.errors import ConfigError

    parse = importlib.import_module(module).parse
    with pytest.raises(ConfigError, match=rf"{key}=.*: a control character"):
        parse([*args, f"{key}={tmp_path}/o\ntouch {tmp_path}/PWNED #"])
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=rf"{key}=.*link is a symbolic link to .*gone, which is not there"):
        parse([*args, f"{key}={tmp_path / 'link' / 'sub'}"])


def test_locks_and_logs_are_not_written_through_a_link(tmp_path):
    """A link put in a shared output folder in place of a lock or a log: the lock truncated the file it named,
    the logs appended to it. Now each is an error naming the link (a training log replaces it)."""
    from siren.data.cache import HashLedger
    from siren.errors import ConfigError
    from siren.io import open_append
    from siren.lock import hold
    from siren.runtime import RunLog

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / "launcher.lock").symlink_to(victim)
    with pytest.raises(ConfigError, match="launcher.lock is a symbolic link .*victim.txt.*remove the link"):
        with hold(tmp_path / "launcher.lock", "test", "fix"):
            pass
    (tmp_path / "controllers.log").symlink_to(victim)  # the local executor's and the warm server's logs
    with pytest.raises(ConfigError, match="controllers.log is a symbolic link"):
        open_append(tmp_path / "controllers.log", "ab")
    ledger = tmp_path / "splits" / "train.shards"  # prepare's and the filter's ledger of source hashes
    ledger.mkdir(parents=True)
    (ledger / "sources-0-of-1.jsonl").symlink_to(victim)
    with pytest.raises(ConfigError, match="sources-0-of-1.jsonl is a symbolic link"):
        HashLedger(ledger, 0, 1, set())
    (tmp_path / "expert_0").mkdir()  # a training log is rewritten (atomically) when opened: the link is replaced
    (tmp_path / "expert_0" / "log.jsonl").symlink_to(victim)
    RunLog(tmp_path / "expert_0", 0).write({"step": 1, "loss": 1.0})
    assert not (tmp_path / "expert_0" / "log.jsonl").is_symlink()
    assert victim.read_text() == "keep me\n"


def test_eval_segment_and_probe_outputs_that_are_files_are_named(tmp_path, capsys):
    from analysis.cli import main as probe
    from analysis.convergence import ConvergenceConfig, run
    from eval.audiocaps import main as evaluate
    from siren.data.demo import main as demo
    from siren.data.segment import main as segment
    from siren.errors import ConfigError

    (tmp_path / "f").write_text("")
    assert evaluate([f"gen_dir={tmp_path}", "ref=demo", f"out={tmp_path / 'f'}", "weights=random",
                     "metrics=fd"]) == 2
    assert "out=" in (err := capsys.readouterr().err) and "f is a file, not a folder" in err
    # a wrong ckpt= is named as such (it was "out=<ckpt>/eval ..." above, and a missing run got <ckpt>/eval/gen/)
    for ckpt in (tmp_path / "f", tmp_path / "nope"):
        assert evaluate([f"ckpt={ckpt}", "ref=demo", "weights=random", "metrics=fd"]) == 2
        assert f"{ckpt} is not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
    for call in (lambda: segment([f"manifest={tmp_path / 'm.csv'}", f"out={tmp_path / 'f'}"]),
                 lambda: demo([f"out={tmp_path / 'f'}"]),
                 lambda: probe("convergence", ConvergenceConfig, run, [f"run={tmp_path}", f"out={tmp_path / 'f'}"])):
        with pytest.raises(ConfigError, match="f is a file, not a folder; give out=FOLDER"):
            call()


def test_convergence_panels_outside_the_12_layers_are_named(tmp_path):
    """panels=0,13 drew an empty Fig. 2d (layers that do not exist were dropped in silence); semantic_probe's
    panels= already refused them."""
    from analysis.convergence import ConvergenceConfig, run
    from siren.config import load_config
    from siren.errors import ConfigError

    log = tmp_path / "run" / "expert_0" / "log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(json.dumps({"step": s, **{f"ce/L{j}": 6.0 - s for j in range(1, 13)}}) + "\n"
                           for s in (1, 2)))
    for panels in ("0,13", "1,4,13"):
        with pytest.raises(ConfigError, match=r"panels=.*: layers \[.*13\] do not exist \(1\.\.12\)"):
            run(load_config(ConvergenceConfig, [f"run={tmp_path / 'run'}", f"panels={panels}",
                                                f"out={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()


def test_task_vectors_init_that_is_not_safetensors_is_named(tmp_path):
    """init=FILE that is not a safetensors file (a .pt, a truncated download) ended in safetensors' own
    'SafetensorError: Error while deserializing header' traceback."""
    from analysis.task_vectors import initial_weights
    from siren.errors import SirenError

    for name, data in (("init.pt", b"\x80\x02}q\x00."), ("empty.safetensors", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SirenError, match=rf"{name}: not a safetensors state dict .*give init=<file\.safetensors>"):
            with initial_weights(tmp_path, str(tmp_path / name)):
                pass


def test_task_vectors_reference_step_without_a_checkpoint_lists_the_steps_kept(tmp_path):
    """reference_step=N where no step_N was kept said only 'missing checkpoint file .../state.json'."""
    from analysis.task_vectors import final_weights
    from siren.errors import SirenError

    for step in (100, 300):
        (tmp_path / f"step_{step:08d}").mkdir()
    with pytest.raises(SirenError, match=r"reference_step=5: .* no checkpoint at that step; its steps: 100, 300"):
        final_weights(tmp_path, 5)


def test_a_results_json_that_is_not_json_is_named(tmp_path):
    """reward_curves results=FILE (or rvq_depth gen_runs=, after decoding every clip) with a file that is not a
    JSON object ended in a JSONDecodeError (or AttributeError) traceback."""
    from analysis.logs import read_results

    for name, text in (("results.json", "FD 1.2\n"), ("list.json", "[1, 2]\n"), ("half.json", '{"metrics": {')):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=rf"{name}: not an eval results\.json"):
            read_results(tmp_path / name)
    with pytest.raises(DataError, match=r"results\.json: not an eval results\.json"):
        read_results(tmp_path)  # a folder: its results.json
    from analysis.rvq_depth import RvqDepthConfig, run
    from siren.config import load_config

    with pytest.raises(DataError, match=r"results\.json: not an eval results\.json"):  # before the data is read
        run(load_config(RvqDepthConfig, [f"data={tmp_path / 'unprepared'}", f"gen_runs={tmp_path}", "gen_r=4",
                                         f"out={tmp_path / 'out'}"]))


def test_stage2_n_beyond_the_models_experts_is_named_before_anything_is_built(tmp_path, monkeypatch):
    """`python -m siren.rl run_dir=<1-12 run> n=2` (or 6-2 with n=7) ended in a ValueError traceback after the
    codec, text encoder and reward were built; a grid's set.rl.n=7 passed planning and failed in the align job,
    after every expert had trained. Now a ConfigError naming n, when parsed for the grid and before any model
    is built for the command."""
    from ablations.grid import load_grid
    from ablations.plan import cells_of, parse
    from siren import frontends
    from siren.errors import ConfigError
    from siren.rl.alignment import main
    from tests.fixtures_rl import make_stage1_run

    with pytest.raises(ConfigError, match=r"table7 row .*n=7 experts to align, but the model has 6"):
        cells_of(load_grid("table7"), parse(["grid=table7", f"out={tmp_path / 'grid'}", "set.rl.n=7"]))
    assert not (tmp_path / "grid").exists()

    def built(*args, **kwargs):
        raise AssertionError("a model was built before n= was checked")

    monkeypatch.setattr(frontends, "build_text", built)
    run = make_stage1_run(tmp_path / "run", "1-12")
    (tmp_path / "p.txt").write_text("a dog barks\n")
    with pytest.raises(ConfigError, match=r"n=2 experts to align, but the model has 1"):
        main([f"run_dir={run}", f"out={tmp_path / 'rl'}", f"prompts={tmp_path / 'p.txt'}", "n=2",
              "reward=code_match", "text.weights=random"])
    assert not (tmp_path / "rl").exists()


def test_a_permission_error_is_one_line_that_does_not_assume_a_write(tmp_path, capsys):
    """EACCES on reading a manifest or weights file said "Permission denied writing <file>; free space"."""
    import errno

    from siren import cli

    def reading(_argv):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "m.csv"))

    def full(_argv):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o.wav"))

    assert cli.call(reading, []) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Permission denied: {tmp_path / 'm.csv'}; give this user access to it, or use")
    assert "writing" not in err and "free space" not in err
    assert cli.call(full, []) == 2
    err = capsys.readouterr().err
    assert f"No space left on device writing {tmp_path / 'o.wav'}; free space" in err and "(out=...)" in err

    def cache_read_only(_argv):  # the assets cache's embeddings: out= does not move them
        from siren.assets import cache_dir

        raise OSError(errno.EROFS, "Read-only file system", str(cache_dir() / "embeddings" / "x.safetensors"))

    assert cli.call(cache_read_only, []) == 2
    err = capsys.readouterr().err
    assert "(the assets cache " in err and "SIREN_CACHE=" in err and "cache=false" in err and "out=" not in err


def test_an_error_from_a_dataloader_worker_is_one_line(capsys):
    """A damaged prepared file read in a DataLoader worker came back as torch re-raises it: the same DataError
    class with the worker's whole traceback as its message, 20 lines under "error:". Now its own words."""
    from torch._utils import ExceptionWrapper

    from siren import cli

    def main(argv):
        try:
            raise DataError("/x/codes.safetensors: a damaged or missing prepared file; run prepare again")
        except DataError:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # what a worker sends back
        wrapped.reraise()

    assert cli.call(main, []) == 2
    assert capsys.readouterr().err == ("error: /x/codes.safetensors: a damaged or missing prepared file; run "
                                       "prepare again\n")
