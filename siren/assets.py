"""Every pretrained file the harness uses, one cache directory, and the prefetch command.

Compute nodes run offline. On a machine with internet (a login node):

    python -m siren.assets prefetch            # all of them
    python -m siren.assets prefetch dac_16khz  # one
    python -m siren.assets list                # where each is expected, present or not

The cache is ``$SIREN_CACHE`` (default ``~/.cache/siren``); point it at shared storage so
every node sees the same files. A missing file is an error naming it, the place it is
expected and this command. Random weights are never substituted for a missing file: code
that wants them asks for them explicitly (``weights=random``) and labels its outputs.

Each download is checked against the publisher's digest where one is published (``Asset.digest``;
the others are reported UNVERIFIED), lands under a temp name that is removed on any error or
Ctrl-C, and gets the umask's mode, so one cache serves a whole group.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from siren.errors import ConfigError, MissingWeightsError, SirenError
from siren.io import atomic_path, cache_dir, file_digest, hash_rest, open_no_link, version, write_json

log = logging.getLogger(__name__)

PREFETCH = "python -m siren.assets prefetch"
DEMO_DIR = Path(__file__).parent / "demo_assets" / "files"  # the committed demo weights (siren.demo_weights)


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str
    url: str
    what: str
    # The publisher's digest of the file, "<algorithm>:<hex>" (sha256, md5, or "sha256-prefix" for a
    # torch.hub-style file name); "" where the publisher states none: downloaded, reported UNVERIFIED.
    digest: str = ""
    digest_source: str = ""
    demo: bool = True  # the project trains a demo stand-in (weights=demo); ImageBind has none


ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("dac_16khz", "weights_16khz.pth",
          "https://github.com/descriptinc/descript-audio-codec/releases/download/0.0.5/weights_16khz.pth",
          "DAC 16 kHz codec (12 RVQ layers x 1024 codes, hop 320)",
          digest_source="none found: the 0.0.5 release lists no digest for this asset"),
    Asset("clap", "630k-audioset-best.pt",
          "https://huggingface.co/lukewys/laion_clap/resolve/main/630k-audioset-best.pt",
          "LAION-CLAP HTSAT-tiny + RoBERTa (text conditioning, CLAP score, reward)",
          "sha256:8053c9775516af2f4902e1e8281e356cc1bf7a85e8b761908170767b77c3f037",
          "Git LFS object id on huggingface.co/lukewys/laion_clap"),
    Asset("roberta_vocab", "roberta-base/vocab.json",
          "https://huggingface.co/FacebookAI/roberta-base/resolve/c2a5e573587885ce23744cf330ee7c402f0df16f/vocab.json",
          "RoBERTa BPE vocabulary for the CLAP text tokenizer",
          digest_source="none published (a plain git file); the URL pins a fixed revision"),
    Asset("roberta_merges", "roberta-base/merges.txt",
          "https://huggingface.co/FacebookAI/roberta-base/resolve/c2a5e573587885ce23744cf330ee7c402f0df16f/merges.txt",
          "RoBERTa BPE merges for the CLAP text tokenizer",
          digest_source="none published (a plain git file); the URL pins a fixed revision"),
    Asset("panns_cnn14_16k", "Cnn14_16k_mAP=0.438.pth",
          "https://zenodo.org/record/3987831/files/Cnn14_16k_mAP%3D0.438.pth",
          "PANNs Cnn14 16 kHz (FD, KL, IS)",
          "md5:362fc5ff18f1d6ad2f6d464b45893f2c", "Zenodo record 3987831 (Zenodo publishes md5)"),
    Asset("vggish", "vggish-10086976.pth",
          "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
          "VGGish (FAD)",
          "sha256-prefix:10086976", "torch.hub file-name convention (torchvggish checks it with check_hash)"),
    Asset("imagebind", "imagebind_huge.pth", "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth",
          "ImageBind-Huge (stage-2 reward at paper scale, reward=imagebind; ~4.5 GB)", demo=False),
]}


def path(name: str) -> Path:
    if name not in ASSETS:
        raise KeyError(f"unknown asset '{name}'; known: {', '.join(ASSETS)}")
    return cache_dir() / ASSETS[name].filename


# The weights label of a file given by path that is not the published one (a fine-tuned or another checkpoint):
# "file <absolute path>". Outputs never call it "pretrained"; siren.codec.weights_arg reads the path back.
FILE_LABEL = "file "


def label(name: str, file: str | os.PathLike, sha256: str) -> str:
    """"pretrained" for a file with the publisher's digest, wherever it is; where the publisher gives none (the
    DAC, ImageBind), for asset ``name``'s file in the cache. Else ``FILE_LABEL`` + its absolute path: a file put
    in the cache by hand that is not the publisher's (another checkpoint under its name) is not called pretrained."""
    a, file = ASSETS[name], Path(file).resolve()
    if a.digest:
        algo, want = a.digest.split(":", 1)
        got = sha256 if algo in ("sha256", "sha256-prefix") else file_digest(file, algorithm=algo)
        published = (got[:len(want)] if algo == "sha256-prefix" else got) == want
    else:
        published = file == path(name).resolve()
    return "pretrained" if published else f"{FILE_LABEL}{file}"


def files_id(names: list[str]) -> str:
    """Identity of the assets ``names`` in the cache by content (a missing one as missing), for a grid cell made with
    them (ablations.grid.cell_id): one replaced by hand (another checkpoint under the published name) runs its cells
    again rather than reusing their results. Each file's sha256 is kept in ``<cache>/sha256.json`` by version (size,
    mtime, ctime: ``siren.io.version``), so a file is read again only when it changed."""
    record, new, got = read_note("sha256.json"), {}, []
    for name in sorted(names):
        p, known = path(name), record.get(ASSETS[name].filename)
        try:
            st = p.stat()
        except OSError:
            got.append((name, None))
            continue
        if not (isinstance(known, dict) and known.get("version") == version(st)
                and isinstance(known.get("sha256"), str)):
            log.info("hashing %s (%.1f GB; once per version of the file) ...", p, st.st_size / 1e9)
            with open(p, "rb") as f:  # the version of the bytes read, not of a later replacement
                known = {"version": version(os.fstat(f.fileno())), "sha256": hash_rest(hashlib.sha256(), f).hexdigest()}
            new[ASSETS[name].filename] = known
        got.append((name, known["sha256"]))
    if new:  # merged into the note as it is now: another launcher may have added its own hashes meanwhile
        update_note("sha256.json", lambda note: note.update(new))
    return hashlib.sha256(json.dumps(got).encode()).hexdigest()[:12]


def read_note(name: str) -> dict:
    """A JSON object the project keeps for itself in the cache (``files_id``'s hashes, the demo bases accepted by
    ``siren.demo_weights``): {} where it is missing, unreadable or not an object, so its owner rebuilds it."""
    try:
        note = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def update_note(name: str, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to ``read_note(name)`` and write the result atomically, under an flock on a lock file
    beside it: two jobs noting at once (a grid's launchers, a SLURM array's tasks sharing one cache) each keep
    their entry, where a plain read and write let the later writer drop the earlier one's. Nothing is written in
    a read-only cache (a hash or a warning is then repeated next time, nothing else changes)."""
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        fd = open_no_link(cache_dir() / f".{name}.lock", os.O_RDONLY)  # flock needs no write: another user's file
    except (OSError, ConfigError) as e:
        log.debug("cannot note %s in the assets cache (%s)", name, e)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a read and a small write
        except OSError:  # a filesystem without flock: the plain read and write
            pass
        note = read_note(name)
        change(note)
        write_json(cache_dir() / name, note)
    except OSError as e:
        log.debug("cannot write %s in the assets cache (%s)", name, e)
    finally:
        os.close(fd)  # releases the flock


def present(name: str) -> bool:
    """Whether asset ``name`` is in the cache (a file, not empty)."""
    p = path(name)
    return p.is_file() and p.stat().st_size > 0


def require(name: str) -> Path:
    """The local file of a pretrained asset, or an error that says how to get it."""
    p = path(name)
    if not present(name):
        a = ASSETS[name]
        raise MissingWeightsError(
            f"pretrained weights '{a.filename}' ({a.what}) not found at {p}. On a machine with "
            f"internet run `{PREFETCH} {name}` (set SIREN_CACHE to shared storage so compute nodes "
            f"see it), or copy the file there. "
            + ("Offline, weights=demo runs on the project's demo weights (trained on the embedded set: numbers "
               "comparable with other demo runs only; in a command with several, codec./text./reward.weights=demo); "
               if a.demo else "")
            + "for a smoke test without weights pass weights=random.")
    return p


WEIGHTS_MODES = ("pretrained", "demo", "random")


def no_weights_file(what: str, key: str, value: str, path: Path, fix: str = "") -> MissingWeightsError:
    """The error for a ``key=value`` weights setting whose file is not there: a folder, a missing file, or a
    mistyped mode (``Demo``, ``demoo``: taken for a path) are each said as such."""
    why = f"{path} is a folder, not a {what} weights file" if path.is_dir() else \
        f"{what} weights file {path} does not exist"
    modes = "" if value in WEIGHTS_MODES else (f"; {key}= takes one of {', '.join(WEIGHTS_MODES)} (lower case) or "
                                                f"the path of a {what} weights file")
    return MissingWeightsError(why + modes + (f"; {fix}" if fix else ""))


class DownloadError(SirenError, OSError):
    """A download that failed or whose bytes are not the publisher's file; nothing was kept."""


def check_digest(asset: Asset, digest_of, where: str) -> str:
    """'verified ...' if the file matches the recorded digest, 'UNVERIFIED ...' if none is recorded; else an error.

    ``digest_of(algorithm)`` returns the file's hex digest for "sha256" or "md5".
    """
    if not asset.digest:
        return f"UNVERIFIED: {asset.digest_source or 'no published digest'}"
    algo, want = asset.digest.split(":", 1)
    prefix = algo == "sha256-prefix"
    got = digest_of("sha256" if prefix else algo)
    if (got[:len(want)] if prefix else got) != want:
        raise DownloadError(f"{asset.name}: {where} has {algo} {got}, but the publisher's file has {want} "
                            f"({asset.digest_source}). Delete it and run `{PREFETCH} {asset.name}` again; if the "
                            f"download keeps differing, the file at {asset.url} changed: tell the maintainers.")
    return f"verified: {algo} {want}"


def _download(asset: Asset, dest: Path, opener=urllib.request.urlopen) -> dict[str, str]:
    """Stream ``asset.url`` into a temp file beside ``dest``, verify it, then rename it onto ``dest``.

    The temp file is removed on any failure, a wrong digest and Ctrl-C included, so ``dest`` is
    either absent or the whole verified file. Mode as ``open()`` gives (umask respected).
    """
    from tqdm import tqdm

    hashes = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    with atomic_path(dest) as tmp:
        with opener(asset.url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=asset.name) as bar:
                while block := r.read(1 << 20):
                    f.write(block)
                    for h in hashes.values():
                        h.update(block)
                    bar.update(len(block))
        if total is not None and tmp.stat().st_size != total:
            raise DownloadError(f"{asset.name}: got {tmp.stat().st_size} of {total} bytes from {asset.url}; "
                                f"nothing was kept. Retry `{PREFETCH} {asset.name}`.")
        digests = {k: h.hexdigest() for k, h in hashes.items()}
        digests["status"] = check_digest(asset, digests.__getitem__, f"the download from {asset.url} (not kept)")
    return digests


def prefetch(names: list[str], opener=urllib.request.urlopen) -> None:
    """Download each missing asset (verified where the publisher gives a digest); check present ones too."""
    for name in names:
        asset, dest = ASSETS[name], path(name)
        if os.path.lexists(dest) and not dest.is_file():  # a folder (or a dangling link) in the way: not the network
            raise DownloadError(f"{name}: {dest} is there and is not a file; move it away and run the prefetch again")
        if present(name):
            status = check_digest(asset, lambda algo: file_digest(dest, algorithm=algo), f"the file already at {dest}")
            print(f"{name}: present at {dest} ({status})")
            continue
        try:
            d = _download(asset, dest, opener)
        except DownloadError:
            raise
        except OSError as e:  # URLError, HTTPError, timeouts, a full disk
            raise DownloadError(f"{name}: download from {asset.url} failed ({e}); nothing was kept. "
                                f"Retry on a machine with internet, or copy the file to {dest}.") from e
        print(f"{name}: {dest} sha256={d['sha256']} ({d['status']})")


def main(argv: list[str] | None = None) -> int:
    """CLI entry (``list`` / ``prefetch``) under the one shell: a failed download is one error line and
    exit 2, Ctrl-C exit 130 (the file being downloaded is removed either way)."""
    from siren import cli

    return cli.call(_main, argv, doc=__doc__)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m siren.assets", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    pf = sub.add_parser("prefetch")
    pf.add_argument("names", nargs="*", metavar="NAME", help=f"default: all ({', '.join(ASSETS)})")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for a in ASSETS.values():
            p = path(a.name)
            print(f"{a.name:16s} {'present' if present(a.name) else 'MISSING':8s} {p}  ({a.what})")
        print(f"Offline, weights=demo needs none of these: it uses the committed demo weights in "
              f"{DEMO_DIR} (numbers comparable with other demo runs only); "
              f"no demo stand-in for {', '.join(a.name for a in ASSETS.values() if not a.demo)}")
        return 0
    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        ap.error(f"unknown asset(s) {unknown}; known: {', '.join(ASSETS)}")
    prefetch(args.names or list(ASSETS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
