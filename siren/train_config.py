"""Stage-1 configuration (``python -m siren.train key=value ...``): the expert to train, the model,
the optimiser and schedule, data order and crops, checkpointing, and the codec that supplies the
frozen code tables. Values are validated when parsed (README: When things go wrong).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from siren.codec import CodecConfig
from siren.config import load_config
from siren.errors import ConfigError
from siren.io import check_folder
from siren.model.config import FAMILIES, ModelConfig, presets
from siren.model.continuous import ContinuousConfig
from siren.model.continuous import presets as continuous_presets
from siren.model.expert import LOSS_REDUCTIONS
from siren.runtime import SCHEDULES, check_device, check_precision

PAPER_GEN_FRAMES = 500  # the paper generates 10 s clips (50 frames/s)
# Keys added after runs were saved without them, with the value those runs used: a checkpoint
# saved before 2026-12-02 trained with the cosine schedule and resumes as such; one saved before
# 2026-12-03 took every owned layer's CE into its loss.
TRAIN_KEYS_ADDED = {"schedule": "cosine", "decay_frac": 0.2, "loss_layers": 0, "expert_seed": "shared"}
EXPERT_SEEDS = ("shared", "offset")


def saved_train(state: dict) -> dict:
    """The train config a checkpoint's ``state.json`` was saved with, keys added since at the values it used."""
    return {**TRAIN_KEYS_ADDED, **state["train"]}


# Train-config keys that may change when a run resumes (bookkeeping only: they cannot
# change the loss curve; but another device type can, and a resume on one says so). Every other difference is an
# error.
RESUMABLE_CHANGES = ("log_every", "val_every", "val_batches", "ckpt_every", "keep_last", "num_workers", "device")
# Defaults that changed (key: the former default): a run saved under it resumes with the key given
FORMER_DEFAULTS = {"weight_decay": 0.1}  # until 2026-12-07; the authors' 0.05 since


@dataclass
class TrainConfig:
    steps: int = 150_000  # paper: 150K steps (1.6B), 500K (3.1B)
    batch_size: int = 24  # clips per process and micro-batch (paper: 24 per L20 GPU)
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-4  # appendix B
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.05  # the authors' (their training.py); on matrices only (siren.runtime.param_groups)
    warmup_steps: int = 2000  # linear warmup, then the schedule's decay to min_lr at `steps`
    min_lr: float = 3e-5
    # cosine: decay over all steps after warmup | wsd: warmup-stable-decay, lr held until the last
    # decay_frac of the steps, then linear to min_lr (for short runs: the cosine lowers the rate early)
    schedule: str = "cosine"
    decay_frac: float = 0.2  # wsd only
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    seed: int = 0
    # shared: every expert drawn from `seed` (App. D.3: "the same initialization weights"; init, batch order, crops,
    # dropout) | offset: seed + the expert's first layer, as the authors' train command seeds each expert
    expert_seed: str = "shared"
    log_every: int = 50
    val_every: int = 2000  # 0 = only at the end
    val_batches: int = 0  # batches of the test split per validation; 0 = all
    ckpt_every: int = 1000
    keep_last: int = 3  # checkpoints kept per expert
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    crop_s: float = 6.0  # random crops of this length (appendix B); 0 = whole clips
    crop_min_clap: float = 0.0  # > 0: crops only where CLAP similarity > this (appendix B: 0.2; prepare crop_s=)
    num_workers: int = 2
    loss_reduction: str = "mean"  # over the expert's layers: mean (official code) | sum (Eq. 6 as written)
    # > 0: only the expert's first n layers enter the loss (the others are still logged); an ablation of the
    # paper's Influence 1 (do a shared backbone's deeper layers help or hinder its first?); 0 = all
    loss_layers: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        if not 0 < self.decay_frac <= 1:
            raise ConfigError(f"train.decay_frac must be in (0, 1], got {self.decay_frac}")
        if self.expert_seed not in EXPERT_SEEDS:
            raise ConfigError(f"train.expert_seed must be one of {', '.join(EXPERT_SEEDS)}, got '{self.expert_seed}'")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(f"train.loss_reduction must be mean or sum, got '{self.loss_reduction}'")
        check_precision(self.precision, "train.precision")
        check_device(self.device, "train.device")
        for key in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "val_every", "val_batches", "num_workers", "seed", "loss_layers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("lr", "min_lr", "weight_decay", "grad_clip", "crop_s", "beta1", "beta2"):
            v = getattr(self, key)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"train.{key} must be a finite number >= 0, got {v}"
                                  + (" (0 turns clipping off)" if key == "grad_clip" else ""))
        if self.lr == 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= train.min_lr <= train.lr and train.lr > 0; got lr={self.lr}, "
                              f"min_lr={self.min_lr}")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise ConfigError(f"train.beta1 and train.beta2 must be < 1, got {self.beta1}, {self.beta2}")
        if 0 < self.crop_s < 1 / 50:
            raise ConfigError(f"train.crop_s={self.crop_s} is shorter than one codec frame (0.02 s); 0 = whole clips")
        if self.crop_min_clap > 0 and not self.crop_s:
            raise ConfigError(f"train.crop_min_clap={self.crop_min_clap} filters crops, but train.crop_s=0 trains on "
                              "whole clips: give crop_s (appendix B: 6) or crop_min_clap=0")


@dataclass
class Stage1Config:
    run_dir: str = "runs/siren"  # holds the K experts of one model
    expert: int = 0  # k (0-based): which expert this process trains
    data_dir: str = "data/prepared"  # output of siren.data.prepare
    family: str = "discrete"  # discrete: ``model`` (K experts over RVQ codes) | continuous: ``continuous``
    model: ModelConfig = field(default_factory=ModelConfig)
    continuous: ContinuousConfig = field(default_factory=ContinuousConfig)  # family=continuous (paper/003)
    train: TrainConfig = field(default_factory=TrainConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)  # supplies the frozen code tables


def preset_groups() -> dict:
    """scale=tiny/small/isolated-*/single-*/... set model.*; scale=cont-tiny/cont-base/... set continuous.*"""
    groups = presets("model.")
    groups["scale"] = {**groups["scale"], **continuous_presets("continuous.")["scale"]}
    return groups


def parse(args: list[str]) -> Stage1Config:
    groups = preset_groups()
    cont = continuous_presets("continuous.")["scale"]
    cfg = load_config(Stage1Config, args, presets=groups)
    if cfg.family not in FAMILIES:
        raise ConfigError(f"family '{cfg.family}' is not allowed; allowed: {', '.join(FAMILIES)}")
    # the other family's preset or keys were read into the group this family never builds: scale=cont-tiny alone
    # trained the paper-size discrete model, family=continuous scale=tiny the continuous default
    scale = next((a.split("=", 1)[1] for a in reversed(args) if a.startswith("scale=")), None)
    if scale is not None and (scale in cont) != (cfg.family == "continuous"):
        names = sorted(cont) if cfg.family == "continuous" else sorted(set(groups["scale"]) - set(cont))
        raise ConfigError(f"scale={scale} is a preset of the {'continuous' if scale in cont else 'discrete'} family, "
                          f"but family={cfg.family}: give family={'continuous' if scale in cont else 'discrete'}, or "
                          f"one of {', '.join(names)}")
    other = "model." if cfg.family == "continuous" else "continuous."
    # arch= (a discrete-model preset) set model.* keys the continuous model never reads
    stray = [a.split("=", 1)[0] for a in args if a.startswith(other) or (other == "model." and a.startswith("arch="))]
    if stray:
        raise ConfigError(f"{', '.join(stray)}: keys of the other family's model, which family={cfg.family} does not "
                          f"build; use {'continuous.' if other == 'model.' else 'model.'}* keys")
    if cfg.family == "continuous" and cfg.expert != 0:
        raise ConfigError(f"expert={cfg.expert}: the continuous family is one model (expert 0)")
    if cfg.family == "discrete" and not 0 <= cfg.expert < cfg.model.n_experts:
        raise ConfigError(f"expert={cfg.expert} does not exist in model.distribution={cfg.model.distribution} "
                          f"(experts 0..{cfg.model.n_experts - 1})")
    check_folder(cfg.run_dir, "run_dir")
    m = cfg.model.layers_per_expert if cfg.family == "discrete" else 0
    if cfg.train.loss_layers > m:
        raise ConfigError(f"train.loss_layers={cfg.train.loss_layers}: " + (
            f"an expert of model.distribution={cfg.model.distribution} owns {m} layers; give 0 (all) to {m}"
            if m else "the continuous family has no RVQ layers; leave it at 0"))
    return cfg
