"""What `scale=demo` and `scale=paper` mean for a cell: the dotted keys every stage gets, and how
a row's symbolic model size (the paper's names) maps to a model preset.

demo: tiny models on the embedded demo set with demo weights (codec, text encoder and metric
backbones trained by the project on the embedded set, siren.demo_assets): minutes on a laptop CPU.
Its numbers show the pipeline measuring something (calibration rows bracket them); they say nothing
about the paper's scale.
paper: the paper's sizes and schedules on AudioCaps-style manifests with pretrained weights, and
the paper's ImageBind reward in stage 2 (demo keeps the CLAP reward, whose checkpoint is the CLAP
metric's: its tables mark that column "reward = metric").
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import MISSING
from typing import Any, Mapping

from siren.config import ConfigError, default_of
from siren.data.demo import N_TEST, N_TRAIN
from siren.model.config import SCALES as MODEL_PRESETS

# Defaults every cell resolves with, so a row that spells a default out (Table 5's "Accumu. AR")
# hashes like a row that leaves it implicit (Table 3's "Base Single"): the same run.
# The architecture is part of every cell's identity, so a run of another architecture is never reused.
COMMON: dict[str, Any] = {"model.conditioning": "accumulated", "model.arch": "official"}

SCALES: dict[str, dict[str, Any]] = {
    "demo": {
        "weights": "demo",
        "data.source": "demo", "data.demo_train": N_TRAIN, "data.demo_test": N_TEST,  # clips per class
        # 300 steps at a tiny model's learning rate, held (wsd) until the last 60 steps: a cosine lowers it
        # while layer 1's CE is still leaving its plateau (docs/demo/notes.md, The schedule). Batch 6: of 4, 6
        # and 8 the smallest that brings every row's layer-1 CE 2 nats below ln 1024 in three seeds; batch 8
        # takes the README's command over 10 minutes on slower kinds (docs/demo/notes.md, Batch 6).
        "train.steps": 300, "train.batch_size": 6, "train.crop_s": 1.0, "train.warmup_steps": 20,
        "train.lr": 3e-3, "train.min_lr": 3e-4, "train.schedule": "wsd",
        # the first wave's default, with which every demo table in docs/demo was made (the CLI's is the authors' 0.05);
        # hashed as absent (ablations.grid.cell_id), so the demo cells keep the ids they had
        "train.weight_decay": 0.1,
        "train.log_every": 10, "train.val_every": 0, "train.ckpt_every": 100, "train.num_workers": 0,
        "rl.steps": 4, "rl.group": 4, "rl.batch": 2, "rl.seconds": 1.0, "rl.lr": 1e-4, "rl.ckpt_every": 2,
        "eval.seconds": 1.0, "eval.gen_batch_size": 96,  # the 90 test captions in one batch (tiny models)
    },
    "paper": {
        "weights": "pretrained",
        "data.source": "manifest",
        # whole 10 s items, so every position that 10 s generation uses is trained (README: Length);
        # appendix B's 6 s crops: set.train.crop_s=6 (then train, eval and stage 2 warn)
        "train.crop_s": 10.0,
        # the authors' (the CLI default since 2026-12-07), spelled out so a paper cell trained with the former
        # default 0.1 has another identity and is not reused (set.train.weight_decay=0.1 finds those)
        "train.weight_decay": 0.05,
        "rl.steps": 2000,  # section 5.1: the first transformer is fine-tuned 2K more steps
        "rl.reward.name": "imagebind",  # Eq. 8's phi: ImageBind, not the CLAP checkpoint behind the CLAP metric
        "eval.seconds": 10.0, "eval.gen_batch_size": 16,
        # the job's GPU where it has one (gpus=1): eval's own default is the CPU, which left it idle
        "eval.device": "auto",
    },
}

# Paper model sizes by name; "total-1.6b" (Table 6) depends on the distribution.
_TOTAL_16B = {"1-12": "single-1.6b", "2-6": "isolated-1.6b-2-6", "3-4": "isolated-1.6b-3-4",
              "4-3": "isolated-1.6b-4-3", "6-2": "isolated-1.6b", "12-1": "isolated-1.6b-12-1"}
_PAPER_SIZES = ("single-530m", "single-1.6b", "single-3.3b", "isolated-1.6b", "isolated-3.1b")

# Demo: tiny experts (d=64) sized by backbone depth. Table 6's "one expert gets ~1/K of the total"
# is depth 12/K, so the 1.6B single model is 12 blocks and a 6-2 expert 2 blocks, and the other
# sizes keep the paper's ratios to these (530M ~ 1/3, 3.3B ~ 2x, the 3.1B isolated ~ 2x).
_DEMO_SIZES = {"single-530m": 4, "single-1.6b": 12, "single-3.3b": 24, "isolated-1.6b": 2, "isolated-3.1b": 4}
# The tiny preset's dropout (0, as the authors' tiny.json), spelled out so it is part of every demo cell's
# identity: before 2026-12-02 `arch=official` overrode it with 0.1, and those runs must not be reused.
_DEMO_EXPERT = {"model.scale": "tiny", "model.dropout": MODEL_PRESETS["tiny"]["dropout"]}


# paper/003's continuous LM (model.family=continuous): Base 193M / Large 462M; demo: the tiny preset
_CONTINUOUS_SIZES = ("cont-base", "cont-large")


def model_keys(scale: str, size: str, distribution: str) -> dict[str, Any]:
    """Dotted model keys for a row's symbolic size at a scale."""
    if size in _CONTINUOUS_SIZES:
        return {"model.scale": size if scale == "paper" else "cont-tiny"}
    if size == "total-1.6b":
        if scale == "paper":
            return {"model.scale": _TOTAL_16B[distribution]}
        return {**_DEMO_EXPERT, "model.main_layers": 12 // int(distribution.split("-")[0])}
    if size not in _PAPER_SIZES:
        raise ConfigError(f"unknown model.size '{size}'; known: total-1.6b, {', '.join(_PAPER_SIZES)}")
    if scale == "paper":
        return {"model.scale": size}
    return {**_DEMO_EXPERT, "model.main_layers": _DEMO_SIZES[size]}


def resolve(cell: Mapping[str, Any], scale: str, overrides: Mapping[str, Any] = ()) -> dict[str, Any]:
    """A cell's full dotted config at a scale: scale defaults, then the size's model keys, then the
    cell's own keys, then the user's overrides. Its hash is the cell's identity."""
    if scale not in SCALES:
        raise ConfigError(f"unknown scale '{scale}'; valid: {', '.join(SCALES)}")
    cell = dict(cell)
    size = cell.pop("model.size")
    common = COMMON if cell.get("model.family", "discrete") == "discrete" else {}  # RVQ-expert keys only
    out = {**common, **SCALES[scale], **model_keys(scale, size, cell.get("model.distribution", "")), **cell}
    given, base = dict(overrides), set(out)
    for k, v in given.items():
        like = out[k] if k in out else stage_default(k)
        value = typed(v, None if like is MISSING else like)
        if k not in out and value == like and type(value) is type(like):
            continue  # the stage's own default, spelled out: the cell it is without the key (not retrained)
        out[k] = value
    added = [k for k in given if k.startswith("model.") and k not in base]
    preset = model_preset(out) if added else {}  # of the scale / arch the overrides end with: in any order
    for k in [k for k in added if k.partition(".")[2] in preset]:
        like = preset[k.partition(".")[2]]
        value = typed(given[k], like)
        if value == like and type(value) is type(like):  # set.model.dim=64 on a d=64 preset: that cell, not another
            del out[k]
        elif isinstance(value, bool):  # yes / True / 1: one cell, hashed as "true" / "false" have always been
            out[k] = "true" if value else "false"
    return dict(sorted(out.items()))


def model_preset(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of an RVQ-expert cell's model preset (its model.scale and model.arch), {} for another family."""
    if cfg.get("model.family", "discrete") != "discrete" or "model.scale" not in cfg:
        return {}
    from siren.config import load_config
    from siren.model.config import ModelConfig, presets

    preset = load_config(ModelConfig, [f"scale={cfg['model.scale']}", f"arch={cfg.get('model.arch', 'official')}"],
                         presets())
    return {f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)}


def stage_default(key: str) -> Any:
    """The value the stage reading ``key`` gives it when a cell leaves it out (train.*: siren.train, rl.*: stage 2,
    eval.*: the evaluation), or MISSING (another key, or one these schemas do not have)."""
    from eval.config import EvalConfig
    from siren.rl.config import AlignConfig
    from siren.train_config import TrainConfig

    head, _, rest = key.partition(".")
    schema = {"train": TrainConfig, "rl": AlignConfig, "eval": EvalConfig}.get(head)
    return default_of(schema, rest) if schema else MISSING


def as_bool(value: str) -> bool | str:
    """A command-line boolean as the stages' schemas (OmegaConf) read it: true/yes/on/y, false/no/off/n, any case,
    or a whole number (0 is false); another string stays as written, for the schema to name."""
    v = value.strip().lower()
    if v in ("true", "yes", "on", "y", "false", "no", "off", "n"):
        return v in ("true", "yes", "on", "y")
    return int(v) != 0 if re.fullmatch(r"[+-]?[0-9]+", v) else value


def typed(value: Any, like: Any) -> Any:
    """A ``set.`` override (a command-line string) as the value it stands for, of the type of the value
    it replaces: the cell's identity is a hash of these values, so ``set.train.steps=300`` (the default)
    must hash like 300 and ``set.train.lr=3e-3`` like 0.003, or the grid retrains cells it has. A string
    the type cannot take stays as written; the stage's own schema names it (ablations.steps.validate)."""
    if not isinstance(value, str) or isinstance(like, str):
        return value
    if isinstance(like, bool):
        return as_bool(value)
    # like is None: a key the scale and the cell leave to the stage's default
    for parse in (type(like),) if isinstance(like, (int, float)) else (int, float):
        try:
            return parse(value)
        except ValueError:
            pass
    return value
