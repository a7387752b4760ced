"""Every pretrained file the harness uses, one cache directory, and the prefetch command.

Compute nodes run offline. On a machine with internet (a login node):

    python -m siren.assets prefetch            # all of them
    python -m siren.assets prefetch dac_16khz  # one
    python -m siren.assets list                # where each is expected, present or not

The cache is ``$SIREN_CACHE`` (default ``~/.cache/siren``); point it at shared storage so
every node sees the same files. A missing file is an error naming it, the place it is
expected and this command. Random weights are never substituted for a missing file: code
that wants them asks for them explicitly (``weights=random``) and labels its outputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from siren.errors import MissingWeightsError
from siren.io import sha256_file

PREFETCH = "python -m siren.assets prefetch"


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str
    url: str
    what: str


ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("dac_16khz", "weights_16khz.pth",
          "https://github.com/descriptinc/descript-audio-codec/releases/download/0.0.5/weights_16khz.pth",
          "DAC 16 kHz codec (12 RVQ layers x 1024 codes, hop 320)"),
    Asset("clap", "630k-audioset-best.pt",
          "https://huggingface.co/lukewys/laion_clap/resolve/main/630k-audioset-best.pt",
          "LAION-CLAP HTSAT-tiny + RoBERTa (text conditioning, CLAP score, reward)"),
    Asset("roberta_vocab", "roberta-base/vocab.json",
          "https://huggingface.co/FacebookAI/roberta-base/resolve/main/vocab.json",
          "RoBERTa BPE vocabulary for the CLAP text tokenizer"),
    Asset("roberta_merges", "roberta-base/merges.txt",
          "https://huggingface.co/FacebookAI/roberta-base/resolve/main/merges.txt",
          "RoBERTa BPE merges for the CLAP text tokenizer"),
    Asset("panns_cnn14_16k", "Cnn14_16k_mAP=0.438.pth",
          "https://zenodo.org/record/3987831/files/Cnn14_16k_mAP%3D0.438.pth",
          "PANNs Cnn14 16 kHz (FD, KL, IS)"),
    Asset("vggish", "vggish-10086976.pth",
          "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
          "VGGish (FAD)"),
    Asset("imagebind", "imagebind_huge.pth", "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth",
          "ImageBind-Huge (stage-2 reward at paper scale, reward=imagebind; ~4.5 GB)"),
]}




def cache_dir() -> Path:
    return Path(os.environ.get("SIREN_CACHE", Path.home() / ".cache" / "siren")).expanduser()


def path(name: str) -> Path:
    if name not in ASSETS:
        raise KeyError(f"unknown asset '{name}'; known: {', '.join(ASSETS)}")
    return cache_dir() / ASSETS[name].filename


def require(name: str) -> Path:
    """The local file of a pretrained asset, or an error that says how to get it."""
    p = path(name)
    if not p.is_file() or p.stat().st_size == 0:
        a = ASSETS[name]
        raise MissingWeightsError(
            f"pretrained weights '{a.filename}' ({a.what}) not found at {p}. On a machine with "
            f"internet run `{PREFETCH} {name}` (set SIREN_CACHE to shared storage so compute nodes "
            f"see it), or copy the file there. For a smoke test without weights pass weights=random.")
    return p


def prefetch(names: list[str]) -> None:
    from tqdm import tqdm

    for name in names:
        dest = path(name)
        if dest.is_file() and dest.stat().st_size > 0:
            print(f"{name}: present at {dest}")
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = ASSETS[name].url
        with urllib.request.urlopen(url, timeout=60) as r, tempfile.NamedTemporaryFile(
                dir=dest.parent, delete=False) as tmp:
            with tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                      desc=name) as bar:
                while block := r.read(1 << 20):
                    tmp.write(block)
                    bar.update(len(block))
        os.replace(tmp.name, dest)  # atomic: an interrupted download never looks complete
        print(f"{name}: {dest} sha256={sha256_file(dest)}")


def main(argv: list[str] | None = None) -> int:
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
            print(f"{a.name:16s} {'present' if p.is_file() else 'MISSING':8s} {p}  ({a.what})")
        return 0
    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        ap.error(f"unknown asset(s) {unknown}; known: {', '.join(ASSETS)}")
    prefetch(args.names or list(ASSETS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
