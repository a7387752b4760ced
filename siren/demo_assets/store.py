"""Demo weight files: the trained tensors of a network whose other tensors stay at a seeded random init.

A file (safetensors) holds only what its recipe trained or measured, under the network's own
state-dict keys; its metadata records the seed of the random init and the sha256 of the tensors
that are NOT in the file (``base_sha256``). Loading builds the network from that seed, checks
the regenerated tensors against the recorded hash (another torch version may draw other numbers:
then the file cannot be used, and the error says so), and loads the file's tensors over them.
The result is the full state dict in the pretrained checkpoint's layout.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from siren.errors import CheckpointError, MissingWeightsError

FILES = Path(__file__).parent / "files"
FORMAT = "siren-demo-overlay-1"
LABEL = "demo weights (trained on the embedded set)"
REBUILD = "python -m siren.demo_assets.backbones"
# pretrained asset name (siren.assets) -> the demo file standing in for it
DEMO_FILES = {"panns_cnn14_16k": "panns_cnn14_16k.demo.safetensors", "vggish": "vggish.demo.safetensors",
              "clap": "clap.demo.safetensors"}


@functools.cache
def files_id() -> str:
    """Identity of the committed demo weights (every file under ``files/``, by content): results made
    with other demo weights (an older checkout's outputs) must not be reused (ablations.grid.cell_id)."""
    from siren.io import sha256_file

    files = sorted(FILES.glob("*.*"))
    return hashlib.sha256(json.dumps([(f.name, sha256_file(f)) for f in files]).encode()).hexdigest()[:12]


def demo_file(asset: str) -> Path:
    """The committed demo weights file standing in for pretrained asset ``asset``."""
    if asset not in DEMO_FILES:
        raise KeyError(f"no demo weights for '{asset}'; there are: {', '.join(DEMO_FILES)}")
    return FILES / DEMO_FILES[asset]


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of named tensors: name, dtype, shape and bytes, in key order (independent of dict order)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` under ``torch.manual_seed(seed)``, leaving the caller's RNG state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def save(path: Path, base: nn.Module, trained: dict[str, torch.Tensor], seed: int, meta: dict) -> None:
    """Write ``trained`` (keys of ``base.state_dict()``) and the hash of every other tensor of ``base``,
    which must be the seeded init ``seeded(seed, make)`` of the loader's ``make``."""
    from safetensors.torch import save_file

    full = base.state_dict()
    unknown = sorted(set(trained) - set(full))
    if unknown:
        raise KeyError(f"trained tensors not in the network: {unknown[:5]}")
    rest = {k: v for k, v in full.items() if k not in trained}
    header = {"format": FORMAT, "label": LABEL, "base_seed": str(seed), "base_sha256": tensors_sha256(rest),
              "meta": json.dumps(meta, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in trained.items()}, str(tmp), metadata=header)
    tmp.replace(path)


def header(path: Path) -> dict:
    from safetensors import safe_open

    if not path.is_file():
        raise MissingWeightsError(f"demo weights file {path} is missing: it is part of the package "
                                  f"(reinstall, or rebuild it with `{REBUILD}`)")
    with safe_open(str(path), "pt") as f:
        head = dict(f.metadata() or {})
    if head.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a demo weights file (format {head.get('format')!r}, "
                              f"expected {FORMAT!r}); rebuild it with `{REBUILD}`")
    return head


def load(path: Path, make: Callable[[], nn.Module]) -> nn.Module:
    """The network ``make()`` with the demo weights of ``path``: seeded base, checked, trained tensors on top."""
    from safetensors.torch import load_file

    head = header(path)
    net = seeded(int(head["base_seed"]), make)
    trained = load_file(str(path))
    full = net.state_dict()
    unknown = sorted(set(trained) - set(full))
    if unknown:
        raise CheckpointError(f"{path} holds tensors this network does not have: {unknown[:5]}")
    rest = {k: v for k, v in full.items() if k not in trained}
    got = tensors_sha256(rest)
    if got != head["base_sha256"]:
        raise CheckpointError(
            f"{path}: the seeded random init (seed {head['base_seed']}) regenerated here differs from the one "
            f"the file was trained on (sha256 {got[:16]}..., recorded {head['base_sha256'][:16]}...): this torch "
            f"version ({torch.__version__}) draws other numbers. Rebuild the demo weights with `{REBUILD}`.")
    net.load_state_dict({**full, **{k: v.to(full[k].dtype) for k, v in trained.items()}}, strict=True)
    return net


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    h.update(Path(path).read_bytes())
    return h.hexdigest()
