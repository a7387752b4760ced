"""`python -m siren.assets prefetch`: digest check, no partial file on any failure, umask-respecting modes."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from siren import assets
from siren.io import write_json


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A 3 MiB 'publisher' file served by file:// URL, and an empty SIREN_CACHE."""
    src = tmp_path / "publisher" / "weights.bin"
    src.parent.mkdir()
    src.write_bytes(os.urandom(3 << 20))  # several 1 MiB blocks, so an interruption falls mid-file
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIREN_CACHE", str(cache))
    return src, cache


def _register(monkeypatch, src: Path, digest: str) -> assets.Asset:
    a = assets.Asset("test_asset", "sub/weights.bin", src.as_uri(), "a test file", digest, "the test")
    monkeypatch.setitem(assets.ASSETS, a.name, a)
    return a


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


@pytest.mark.parametrize("algo", ["sha256", "md5", "sha256-prefix"])
def test_prefetch_verifies_and_writes_group_readable_file(published, monkeypatch, capsys, algo):
    src, cache = published
    data = src.read_bytes()
    want = hashlib.new("sha256" if algo == "sha256-prefix" else algo, data).hexdigest()
    _register(monkeypatch, src, f"{algo}:{want[:8] if algo == 'sha256-prefix' else want}")
    with umask(0o002):
        assert assets.main(["prefetch", "test_asset"]) == 0
    dest = cache / "sub" / "weights.bin"
    assert dest.read_bytes() == data and _leftovers(cache) == [dest]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o664  # 0o666 & ~0o002, not mkstemp's 0600
    assert "verified" in capsys.readouterr().out
    assert assets.main(["prefetch", "test_asset"]) == 0  # present: checked again, not downloaded
    assert "present" in capsys.readouterr().out


def test_wrong_digest_keeps_nothing(published, monkeypatch, capsys):
    src, cache = published
    _register(monkeypatch, src, "sha256:" + hashlib.sha256(b"another file").hexdigest())
    assert assets.main(["prefetch", "test_asset"]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "test_asset" in err and hashlib.sha256(src.read_bytes()).hexdigest() in err
    assert _leftovers(cache) == []
    with pytest.raises(assets.MissingWeightsError):
        assets.require("test_asset")


def test_a_present_file_with_the_wrong_digest_is_reported(published, monkeypatch):
    src, cache = published
    _register(monkeypatch, src, "md5:" + hashlib.md5(src.read_bytes()).hexdigest())
    dest = cache / "sub" / "weights.bin"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"truncated")
    with pytest.raises(assets.DownloadError, match="already at"):
        assets.prefetch(["test_asset"])


def test_unpublished_digest_is_reported_unverified(published, monkeypatch, capsys):
    src, cache = published
    _register(monkeypatch, src, "")
    assets.prefetch(["test_asset"])
    assert "UNVERIFIED" in capsys.readouterr().out and (cache / "sub" / "weights.bin").is_file()


@pytest.mark.parametrize("fault", [KeyboardInterrupt, ConnectionResetError])
def test_interrupted_download_leaves_no_file(published, monkeypatch, fault):
    """The real urllib opener on a file:// URL; the connection dies after the first 1 MiB block."""
    src, cache = published
    _register(monkeypatch, src, "")

    def dying_opener(url, timeout):
        r = urllib.request.urlopen(url, timeout=timeout)
        real_read, calls = r.read, []

        def read(n=-1):
            calls.append(n)
            if len(calls) > 1:
                raise fault("connection lost")
            return real_read(n)
        r.read = read
        return r

    with pytest.raises(KeyboardInterrupt if fault is KeyboardInterrupt else assets.DownloadError):
        assets.prefetch(["test_asset"], opener=dying_opener)
    assert _leftovers(cache) == []


def test_unreachable_url_is_a_clean_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SIREN_CACHE", str(tmp_path / "cache"))
    _register(monkeypatch, tmp_path / "does-not-exist.bin", "")
    with pytest.raises(assets.DownloadError, match="nothing was kept"):
        assets.prefetch(["test_asset"])
    assert _leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, mask, mode):
    with umask(mask):
        write_json(tmp_path / "r.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("x")  # what open() does, for comparison
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == mode


def _note_many(cache: str, who: int, n: int) -> None:
    os.environ["SIREN_CACHE"] = cache
    from siren import demo_weights
    for i in range(n):
        demo_weights._first_in_this_cache("base", f"{who}-{i}")


def test_notes_written_at_once_keep_every_entry(tmp_path):
    """The assets cache's notes (sha256.json, demo_weights_accepted.json) were read, changed and written whole:
    two jobs sharing a cache dropped each other's entries (then one more hash or warning each). Four processes
    noting 40 entries each at once now leave all 160."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_note_many, args=(str(tmp_path), who, 40)) for who in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    os.environ.pop("SIREN_CACHE", None)
    seen = json.loads((tmp_path / "demo_weights_accepted.json").read_text())["base"]
    assert sorted(seen) == sorted(f"{who}-{i}" for who in range(4) for i in range(40))


def test_a_read_only_cache_notes_nothing_and_fails_nothing(tmp_path, monkeypatch):
    # as root a read-only folder is writable anyway: the refusal is made by hand, where the lock file is opened
    def refused(path, flags):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setenv("SIREN_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "open_no_link", refused)
    assets.update_note("n.json", lambda note: note.update(a=1))
    assert assets.read_note("n.json") == {} and not (tmp_path / "n.json").exists()


def test_a_mistyped_weights_mode_or_a_folder_is_said_as_such(tmp_path):
    """codec.weights=Demo or demoo was "codec weights file Demo does not exist", with no word of the modes (text's
    listed two of three); a folder was "does not exist"; the demo CLAP overlay given by path asked for RoBERTa's
    vocabulary download."""
    from siren import demo_weights
    from siren.clap import Clap, ClapConfig
    from siren.codec import Codec, CodecConfig
    from siren.errors import ConfigError, MissingWeightsError

    for value in ("Demo", "demoo"):
        with pytest.raises(MissingWeightsError, match=rf"weights file {value} does not exist; codec.weights= takes "
                                                      r"one of pretrained, demo, random \(lower case\)"):
            Codec(CodecConfig(weights=value))
    with pytest.raises(MissingWeightsError, match=rf"{tmp_path} is a folder, not a codec weights file"):
        Codec(CodecConfig(weights=str(tmp_path)))
    with pytest.raises(MissingWeightsError, match=r"CLAP weights file Demo does not exist; weights= takes one of "
                                                  r"pretrained, demo, random"):
        Clap(ClapConfig(weights="Demo"))
    with pytest.raises(ConfigError, match="is the demo CLAP file: give weights=demo"):
        Clap(ClapConfig(weights=str(demo_weights.demo_file("clap"))))


def test_list_and_prefetch_agree_with_require_on_an_empty_file_or_a_folder(published, monkeypatch, capsys):
    """An empty file was 'present' in `list` but missing to the loaders; a folder where the file goes made
    prefetch blame the network ("Retry on a machine with internet")."""
    src, cache = published
    _register(monkeypatch, src, "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest())
    dest = cache / "sub" / "weights.bin"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"")
    assert assets.main(["list"]) == 0
    assert any(line.startswith("test_asset") and "MISSING" in line for line in capsys.readouterr().out.splitlines())
    dest.unlink()
    dest.mkdir()
    assert assets.main(["prefetch", "test_asset"]) == 2
    err = capsys.readouterr().err
    assert f"{dest} is there and is not a file; move it away" in err and "internet" not in err
