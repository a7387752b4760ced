"""Grids: one per paper table or figure. A grid is rows; a row is a cell (a config delta) plus the
paper's own numbers for it. A cell's identity is the hash of its resolved config, so a cell that
several tables need (the 1.6B single model is in Tables 3, 5 and 6) runs once.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from siren.config import ConfigError

# Lower is better for these columns; higher for the rest (used for bold/underline).
LOWER_IS_BETTER = {"FAD", "FD", "KL", "Loss Mean", "Loss Ratio"}
# Columns that describe a row rather than score it: never ranked.
DESCRIPTIVE = {"#Parameter", "#Single Para.", "#Train Parameter"}


@dataclass(frozen=True)
class Row:
    label: str
    cell: Mapping[str, Any] | None  # dotted config delta; None: a row we cannot build (see `needs`)
    paper: Mapping[str, Any] | str  # the paper's numbers, or "itg" (inability to generate; "itg": True beside sizes)
    needs: str = ""  # why a row has no cell (said plainly in the table instead of a faked row)


@dataclass(frozen=True)
class Grid:
    name: str
    title: str  # the paper's caption
    columns: tuple[str, ...]
    rows: tuple[Row, ...]
    figure: str = ""  # the figure drawn beside the table: convergence | reward_curves | metrics (ablations/figures.py)
    notes: tuple[str, ...] = field(default_factory=tuple)


def grid_names() -> list[str]:
    import ablations.grids as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))


def load_grid(name: str) -> Grid:
    if name not in grid_names():
        raise ConfigError(f"unknown grid '{name}'. Valid grids: {', '.join(grid_names())}")
    return importlib.import_module(f"ablations.grids.{name}").GRID


MANIFESTS = ("data.train", "data.test", "data.prompts", "data.subset")  # config values naming a user's files


def pretrained_assets(resolved: Mapping[str, Any]) -> list[str]:
    """The assets a weights=pretrained cell's jobs read (``siren.assets`` names): the codec and the CLAP text
    encoder make the data every later step reads; the metric networks only where the keys hold the evaluation's;
    ImageBind where a stage 2 rewards with it."""
    names = ["dac_16khz", "clap", "roberta_vocab", "roberta_merges"]
    names += ["panns_cnn14_16k", "vggish"] if any(k.startswith("eval.") for k in resolved) else []
    names += ["imagebind"] if "rl.method" in resolved and resolved.get("rl.reward.name") == "imagebind" else []
    return names


def cell_id(resolved: Mapping[str, Any], pretrained_files: bool = True) -> str:
    """Identity of a cell: a hash of its fully resolved config (not of the table it came from), of the
    manifests it names by content (a manifest edited in place is other data: its cells run again, not
    reused), and, with weights=demo or pretrained, of the weight files, so a rerun after they change retrains
    rather than reusing results made with the old ones."""
    from siren.io import sha256_file_once
    from siren.train_config import FORMER_DEFAULTS

    # a key at the default it had before the default changed hashes as absent, as the cells made then (where absent
    # meant that value) did: their ids stay theirs. Every resolved cell spells these keys out (ablations.scales), so
    # absent never means the new default here
    resolved = {k: v for k, v in resolved.items()
                if not (k.startswith("train.") and FORMER_DEFAULTS.get(k[len("train."):], object()) == v)}
    for key in MANIFESTS:
        path = Path(str(resolved.get(key) or ""))
        if resolved.get(key) and path.is_file():
            resolved[f"{key}.sha256"] = sha256_file_once(path)
    if resolved.get("weights") == "demo":
        from siren.demo_weights import files_id

        resolved["weights.demo_files"] = files_id()
    elif resolved.get("weights") == "pretrained" and pretrained_files:
        from siren import assets

        resolved["weights.pretrained_files"] = assets.files_id(pretrained_assets(resolved))
    blob = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
