"""Demo weight files: the trained tensors of a network whose other tensors stay at a seeded random init.
The loaders (siren.clap, eval.backbones, siren.codec's path and label) read them from here; the builders
that write them are siren.demo_assets.

A file (safetensors) holds only what its recipe trained or measured, under the network's own
state-dict keys; its metadata records the seed of the random init and the sha256 of the tensors
that are NOT in the file (``base_sha256``) and a fingerprint of them (``base_fingerprint``).
Loading builds the network from that seed, checks the regenerated tensors, and loads the file's
tensors over them. The result is the full state dict in the pretrained checkpoint's layout.

The check: the same torch on another CPU can draw the same init with other last bits (the
vectorised ``normal_`` kernels differ between CPUs: measured <= 5e-8 on CLAP's RoBERTa, whose
values are ~0.1). So when the exact hash differs, the fingerprint (a few values of each tensor) and
the moments of every tensor (sum, sum of squares, sum of absolute values over all its values, in
float64; ``base_moments``) are compared within float rounding: last bits move a sum by about 1e-7 of
itself, a real difference (another torch version drawing other numbers, a region of a tensor changed)
by far more, and is refused with a clear error. Files written before the moments were recorded
(2026-12-07) are checked on the fingerprint alone, which a change away from its sampled values passes.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from siren import assets
from siren.errors import CheckpointError, MissingWeightsError
from siren.io import load_hashed, same_file, sha256_file_once, version

log = logging.getLogger(__name__)

FILES = assets.DEMO_DIR  # written by siren.demo_assets' builders
CODEC_FILE = "dac16k_demo.pth"  # the demo codec (siren.codec.DEMO_FILE), whose resynthesis the backbones train on
FORMAT = "siren-demo-overlay-1"
LABEL = "demo weights (trained on the embedded set)"
# the text encoder's demo mode conditions the models with the demo CLAP's RoBERTa states, a seeded random trunk: only
# CLAP's projection heads (the CLAP score's, the reward's) are trained, so "trained" would be wrong for this part
TEXT_LABEL = "demo weights (the demo CLAP's RoBERTa at its seeded random init: untrained text states)"
REBUILD = "python -m siren.demo_assets.backbones"
FINGERPRINT_VALUES = 16  # values per tensor, at evenly spaced positions
ROUNDING = dict(rtol=1e-5, atol=1e-7)  # what last-bit differences of a random draw stay within
# pretrained asset name (siren.assets) -> the demo file standing in for it
DEMO_FILES = {"panns_cnn14_16k": "panns_cnn14_16k.demo.safetensors", "vggish": "vggish.demo.safetensors",
              "clap": "clap.demo.safetensors"}


@functools.cache
def files_id() -> str:
    """Identity of the committed demo weights (every file under ``files/``, by content): results made
    with other demo weights (an older checkout's outputs) must not be reused (ablations.grid.cell_id)."""
    from siren.io import sha256_file

    # not a killed writer's temp file, nor the codec build's work folder (dac16k_demo.pth.build/)
    files = sorted(f for f in FILES.glob("*.*") if f.is_file() and not f.name.startswith("."))
    return hashlib.sha256(json.dumps([(f.name, sha256_file(f)) for f in files]).encode()).hexdigest()[:12]


def mode_of(label: str) -> str:
    """A weights label as its mode: the demo codec records the long label where the others record "demo"."""
    return "demo" if label == LABEL else label


def mode_words(mode: str, part: str = "") -> str:
    """A weights mode as logs say it: the demo's full label (the text encoder's own, ``part="text"``), RANDOM in
    capitals, a file's own label as it is."""
    demo = TEXT_LABEL if part == "text" else LABEL
    return {"demo": demo, "random": "RANDOM weights", "pretrained": "pretrained weights"}.get(mode, mode)


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


def fingerprint(state: dict[str, torch.Tensor]) -> dict[str, list]:
    """Per tensor: dtype, shape and ``FINGERPRINT_VALUES`` of its values at evenly spaced positions."""
    out = {}
    for k in sorted(state):
        t = state[k].detach().cpu().reshape(-1)
        n = min(FINGERPRINT_VALUES, t.numel())
        idx = torch.arange(n) * (t.numel() - 1) // max(n - 1, 1)
        out[k] = [str(t.dtype), list(state[k].shape), t[idx].double().tolist()]
    return out


MOMENTS_RTOL = 1e-5  # of a tensor's sum of |values| (sum, sum of |values|) or of its sum of squares


def moments(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor: [sum, sum of squares, sum of |values|] of all its values, in float64."""
    out = {}
    for k in sorted(state):
        t = state[k].detach().cpu().reshape(-1).double()
        out[k] = [float(t.sum()), float(t.square().sum()), float(t.abs().sum())]
    return out


def moments_error(got: dict[str, list], want: dict[str, list]) -> str | None:
    """The first tensor whose moments differ by more than float rounding, or None."""
    for k in sorted(set(got) | set(want)):
        if k not in got or k not in want:
            return k
        (s, sq, ab), (s0, sq0, ab0) = got[k], want[k]
        if (abs(s - s0) > MOMENTS_RTOL * ab0 + 1e-12 or abs(sq - sq0) > MOMENTS_RTOL * sq0 + 1e-12
                or abs(ab - ab0) > MOMENTS_RTOL * ab0 + 1e-12):
            return k
    return None


def fingerprint_error(got: dict[str, list], want: dict[str, list]) -> tuple[str | None, float]:
    """(the first tensor whose fingerprint differs beyond float rounding or None, the largest |difference|)."""
    worst = 0.0
    for k in sorted(set(got) | set(want)):
        if k not in got or k not in want or got[k][:2] != want[k][:2]:
            return k, worst
        a, b = torch.tensor(got[k][2], dtype=torch.float64), torch.tensor(want[k][2], dtype=torch.float64)
        if not torch.allclose(a, b, **ROUNDING):
            return k, worst
        worst = max(worst, float((a - b).abs().max()) if len(a) else 0.0)
    return None, worst


def seeded(seed: int, make: Callable[[], nn.Module], key: tuple | None = None) -> nn.Module:
    """``make()`` (on the CPU) with torch's CPU generator seeded by ``seed``, leaving the caller's RNG state alone,
    the GPUs' too. ``key`` names what ``make`` builds (the same key: the same network): after ``keep_loaded()`` that
    network is built once per seed and copied (a random CLAP is ~3.4 s to build on a 2-core CPU, its copy ~0.3
    s)."""
    if _KEPT is None or key is None:
        return _seeded(seed, make)
    return _kept(("seeded", *key, seed), lambda: _seeded(seed, make))


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    # the CPU generator alone, which the build (on the CPU) draws from: torch.manual_seed also reseeded every GPU's
    # generator (or queued it, before CUDA starts), which the fork does not give back
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return make()


def save(path: Path, base: nn.Module, trained: dict[str, torch.Tensor], seed: int, meta: dict) -> None:
    """Write ``trained`` (keys of ``base.state_dict()``) and the hash of every other tensor of ``base``,
    which must be the seeded init ``seeded(seed, make)`` of the loader's ``make``."""
    from siren.io import save_tensors

    full = base.state_dict()
    unknown = sorted(set(trained) - set(full))
    if unknown:
        raise KeyError(f"trained tensors not in the network: {unknown[:5]}")
    rest = {k: v for k, v in full.items() if k not in trained}
    header = {"format": FORMAT, "label": LABEL, "base_seed": str(seed), "base_sha256": tensors_sha256(rest),
              "base_fingerprint": json.dumps(fingerprint(rest)), "base_moments": json.dumps(moments(rest)),
              "meta": json.dumps(meta, sort_keys=True)}
    # atomically (two builders at once, or a failed one, leave no part behind), the metadata in one order: the same
    # training gives the same file, byte for byte
    save_tensors(path, trained, header)


def damaged(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: a damaged demo weights file ({str(e)[:120]}); restore it (`git checkout -- "
                           f"{path}` in a clone, or reinstall) or rebuild it with `{REBUILD}`")


def header(path: Path, data: bytes | None = None) -> dict:
    """The file's metadata, checked to be a demo weights file's (from ``data``, the file's bytes, when read)."""
    from safetensors import SafetensorError, safe_open

    if data is None and not path.is_file():
        raise MissingWeightsError(f"demo weights file {path} is missing: it is part of the package "
                                  f"(reinstall, or rebuild it with `{REBUILD}`)")
    try:
        if data is not None:  # safetensors: an 8-byte little-endian length, then the JSON header
            head = dict(json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {})
        else:
            with safe_open(str(path), "pt") as f:
                head = dict(f.metadata() or {})
    except (SafetensorError, ValueError, AttributeError) as e:  # cut short, or not safetensors
        raise damaged(path, e) from None
    if head.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a demo weights file (format {head.get('format')!r}, "
                              f"expected {FORMAT!r}); rebuild it with `{REBUILD}`")
    return head


# Networks kept after loading, once ``keep_loaded()`` was called: (file, its ``siren.io.version``, maker) -> (network,
# the file's sha256), and ("seeded", key..., seed) -> network for the seeded random builds that name a key (``seeded``).
# The warm-start server of local grid runs (ablations/warm.py) turns it on and loads the demo networks
# once; every job it forks then gets a copy instead of regenerating and checking them (~8 s of an
# evaluation job on a 2-core CPU). The test suite turns it on too (tests/conftest.py): its processes build
# the same random CLAP and metric networks dozens of times (not the codec: DAC's weight-norm tensors
# cannot be deep-copied). Off elsewhere: a process loads each network once anyway.
_KEPT: dict[tuple, nn.Module | tuple[nn.Module, str]] | None = None


def keep_loaded() -> None:
    global _KEPT
    if _KEPT is None:
        _KEPT = {}


def load(path: Path, make: Callable[[], nn.Module], sha256: str | None = None) -> tuple[nn.Module, str]:
    """(the network ``make()`` with the demo weights of ``path``: seeded base, checked, trained tensors on top; the
    sha256 of the file it was loaded from). ``sha256``: the hash the caller recorded for the file, checked
    (``siren.io.load_hashed``). After ``keep_loaded()``, a copy of the kept network."""
    if not Path(path).is_file():
        header(Path(path))  # the missing-file error
    if _KEPT is None:
        return _load(path, make, sha256)
    key = (str(Path(path).resolve()), *version(Path(path).stat()), make.__module__, make.__qualname__)
    net, got = _kept(key, lambda: _load(path, make, sha256))
    same_file(path, sha256, got)
    return net, got


def _first_in_this_cache(recorded: str, regenerated: str) -> bool:
    """Whether a seeded base regenerated with other last bits (``regenerated``, its sha256, accepted against the
    ``recorded`` one) is new to this assets cache (``$SIREN_CACHE``: one machine's, or a cluster's shared one):
    each later load of the same bits (the same CPU kernels) then says so at INFO, not as a warning in every job's
    log. Checked every time all the same."""
    seen = assets.read_note("demo_weights_accepted.json").get(recorded)
    if isinstance(seen, list) and regenerated in seen:
        return False

    def note(accepted: dict) -> None:  # merged into the note as it is when written (siren.assets.update_note)
        if not isinstance(accepted.get(recorded), list):
            accepted[recorded] = []
        if regenerated not in accepted[recorded]:
            accepted[recorded].append(regenerated)

    assets.update_note("demo_weights_accepted.json", note)
    return True


def _kept(key: tuple, build: Callable[[], Any]) -> Any:
    """A copy of what is kept under ``key`` (a network, or a network and its file's hash), built first if nothing
    is (each caller owns its copy)."""
    if key not in _KEPT:
        _KEPT[key] = build()
    return copy.deepcopy(_KEPT[key])


def _check_codec(path: Path, head: dict) -> None:
    """Warn when the demo codec beside ``path`` is not the one whose audio the file was trained on (a codec
    rebuilt alone, ``python -m siren.demo_assets.codec``): the metrics then read audio unlike their training's."""
    want = json.loads(head.get("meta", "{}")).get("codec_sha256")
    codec = Path(path).parent / CODEC_FILE
    if want and codec.is_file() and sha256_file_once(codec) != want:
        log.warning("%s was trained on the audio of another demo codec (sha256 %s...) than %s: the numbers it gives "
                    "are not the ones measured for it; rebuild the backbones on this codec with `%s`",
                    path, want[:12], codec, REBUILD)


def _load(path: Path, make: Callable[[], nn.Module], sha256: str | None) -> tuple[nn.Module, str]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    data, sha256 = load_hashed(path, lambda f: f.read(), sha256)  # the tensors loaded are the ones hashed
    head = header(path, data)
    _check_codec(path, head)
    net = _seeded(int(head["base_seed"]), make)
    try:
        trained = load(data)
    except (SafetensorError, ValueError) as e:
        raise damaged(path, e) from None
    full = net.state_dict()
    unknown = sorted(set(trained) - set(full))
    if unknown:
        raise CheckpointError(f"{path} holds tensors this network does not have: {unknown[:5]}")
    rest = {k: v for k, v in full.items() if k not in trained}
    if (regenerated := tensors_sha256(rest)) != head["base_sha256"]:
        bad, worst = fingerprint_error(fingerprint(rest), json.loads(head.get("base_fingerprint", "{}")))
        if bad is None and "base_moments" in head:
            bad = moments_error(moments(rest), json.loads(head["base_moments"]))
        if bad is not None:
            raise CheckpointError(
                f"{path}: the seeded random init (seed {head['base_seed']}) regenerated here differs from the one "
                f"the file was trained on (first at tensor '{bad}'): this torch ({torch.__version__}), or the "
                f"network's own library (panns_inference, torchvggish, laion_clap, transformers), builds or draws it "
                f"otherwise. "
                f"Install the versions of pyproject.toml, or rebuild the demo weights with `{REBUILD}`.")
        first = _first_in_this_cache(head["base_sha256"], regenerated)
        log.log(logging.WARNING if first else logging.INFO,
                "%s: the seeded init regenerated here is not bit-identical to the recorded one (sha256), but matches "
                "%s within float rounding (largest sampled difference %.1e), as another CPU's vectorised kernels draw "
                "it%s", path.name, "its fingerprint and every tensor's moments" if "base_moments" in head
                else "its fingerprint (16 values a tensor; the file records no moments)", worst,
                "" if first else " (warned of once in this assets cache: the same regenerated tensors as then)")
    try:
        net.load_state_dict({**full, **{k: v.to(full[k].dtype) for k, v in trained.items()}}, strict=True)
    except RuntimeError as e:  # a tensor of another shape
        raise damaged(path, e) from None
    return net, sha256
