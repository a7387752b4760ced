"""The front ends of every model, built in one place: the RVQ codec (siren.codec) and the frozen
text encoder (siren.text, LAION-CLAP's text branch).

A run stores both in its config.json as ``{"id", "weights", "config"}`` (the entries below);
``run_frontends`` rebuilds them from there for eval, stage 2 and analysis and checks that the
weights found here give the ids the run was trained with. Nothing is parsed back out of an id.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from siren.codec import WEIGHTS, Codec, CodecConfig, weights_file
from siren.config import from_dict, to_dict
from siren.errors import CheckpointError, ConfigError
from siren.io import version
from siren.text import TextConfig, TextEncoder, can_share


def build_codec(cfg: CodecConfig, device: str | torch.device = "cpu") -> Codec:
    """The frozen codec of ``cfg`` on ``device``; one per (weights, seed, device) per process, built again when
    its file changed (a warm-start server keeps one for every job it forks)."""
    return _codec(cfg.weights, cfg.seed, str(device), _file_version(cfg.weights))


def _file_version(weights: str) -> tuple | None:
    if weights == "random":
        return None
    try:
        st = weights_file(weights).stat()
    except OSError:  # missing: Codec names it
        return None
    return st.st_ino, *version(st)


@functools.lru_cache(maxsize=4)
def _codec(weights: str, seed: int, device: str, _version: tuple | None) -> Codec:
    return Codec(CodecConfig(weights=weights, seed=seed)).to(device)


def build_text(cfg: TextConfig, device: str | torch.device = "cpu", clap=None) -> TextEncoder:
    """The frozen text encoder of ``cfg``; ``clap``: an already built ``siren.clap.Clap`` with the same
    weights to share (the CLAP score and the reward use the same model)."""
    return TextEncoder(cfg, clap=clap).to(device)


def check_keys(recorded: Mapping[str, Mapping | None], given: Mapping[str, Any], made: str) -> None:
    """Before anything is built: ``given`` codec / text configs that differ from those ``made`` recorded are one
    error naming every key to add, not a missing-pretrained-file error for weights it never used. Two weights
    files given by path are left to the id check after the build (the same file may be spelled two ways)."""
    def differs(key: str, ours, theirs) -> bool:
        return ours != theirs and not (key == "weights" and ours not in WEIGHTS and theirs not in WEIGHTS)

    fixes = [f"{what}.{key}={value}" for what, cfg in given.items() for key, value in (recorded.get(what) or {}).items()
             if differs(key, getattr(cfg, key, value), value)]
    if fixes:
        raise ConfigError(f"{made} with another codec / text encoder than these keys give: add {' '.join(fixes)}")


def codec_entry(codec) -> dict[str, Any]:
    """What a run or a prepared directory records of its codec."""
    cfg = getattr(codec, "cfg", None)
    return {"id": codec.id, "weights": getattr(codec, "weights_label", "unknown"),
            "config": to_dict(cfg) if cfg is not None else None}


def text_entry(encoder_or_info) -> dict[str, Any]:
    """What a run records of its text encoder (from the encoder, or a prepared index's ``text`` entry)."""
    if isinstance(encoder_or_info, Mapping):
        return {k: encoder_or_info.get(k) for k in ("id", "weights", "config")}
    cfg = getattr(encoder_or_info, "cfg", None)
    return {"id": encoder_or_info.id, "weights": getattr(encoder_or_info, "weights_label", "unknown"),
            "config": to_dict(cfg) if cfg is not None else None}


def run_frontends(run_cfg: Mapping[str, Any], device: str | torch.device = "cpu", where: str = "the run",
                  clap=None) -> tuple[TextEncoder, Codec]:
    """The text encoder and codec a run was trained with, rebuilt from its config.json entries.
    ``clap``: an already built ``siren.clap.Clap`` (eval's CLAP-score model); the text encoder uses it
    instead of building a second one when its weights and seed are the run's text encoder's (with the
    demo weights they are: one CLAP build per eval process instead of two, ~10 s on a CPU)."""
    for what in ("codec", "text"):
        if not (run_cfg.get(what) or {}).get("config"):
            raise CheckpointError(f"{where} does not record its {what} configuration (made by an older version of "
                                  f"the harness); train it again, or add \"config\" to its config.json {what} entry")
    codec = build_codec(from_dict(CodecConfig, run_cfg["codec"]["config"], f"{where} codec"), device)
    text_cfg = from_dict(TextConfig, run_cfg["text"]["config"], f"{where} text")
    text = build_text(text_cfg, device, clap if clap is not None and can_share(clap, text_cfg) else None)
    for what, key, built in [("text encoder", "text", text.id), ("codec", "codec", codec.id)]:
        want = run_cfg[key]["id"]
        if built == want:
            continue
        fix = ("the run was trained on other demo files (another commit's siren/demo_assets/files, or a rebuild): "
               "evaluate it at the commit it was trained with, or train it again"
               if run_cfg[key]["config"].get("weights") == "demo" else
               "put the same weights in $SIREN_CACHE (python -m siren.assets list)")
        raise CheckpointError(f"{where} was trained with {what} {want}, but the weights found here give {built}; {fix}")
    return text, codec
