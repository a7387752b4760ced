"""What a stage-1 run records of itself, and what its checkpoint must match to be resumed (siren.train).

``run_dir/config.json`` holds what every expert of a run shares (the model, the codec and text encoder with
their configs); each checkpoint records its expert's train config, the train split's digest and the number of
processes. A resume under other values is refused, naming every differing key, but for the bookkeeping keys
(``RESUMABLE_CHANGES``).
"""
from __future__ import annotations

import dataclasses

from siren import checkpoint as ckpt
from siren.config import to_dict
from siren.data.stage1 import Stage1Data
from siren.errors import ConfigError
from siren.run_dir import check_family
from siren.train_config import FORMER_DEFAULTS, RESUMABLE_CHANGES, Stage1Config, TrainConfig, saved_train


def model_entry(cfg: Stage1Config, data: Stage1Data) -> dict:
    """The model's config as a run records it; a continuous model's token width and latent id come from the data."""
    if cfg.family == "discrete":
        return to_dict(cfg.model)
    proj, c = data.projection, cfg.continuous
    if proj is None:
        raise ConfigError("family=continuous needs data with a latent projection (python -m siren.data.latents)")
    if c.token_dim != proj.dim or (c.latent and c.latent != proj.id):
        raise ConfigError(f"continuous.token_dim={c.token_dim}, continuous.latent='{c.latent}' but the data's "
                          f"latent projection is {proj.id} of width {proj.dim}; set continuous.token_dim={proj.dim} "
                          f"or prepare latents of width {c.token_dim}")
    return {"family": "continuous", **to_dict(dataclasses.replace(c, latent=proj.id))}


def run_config(cfg: Stage1Config, data: Stage1Data) -> dict:
    """What every expert of a run shares: run_dir/config.json (model, codec and text encoder with their configs)."""
    return {"model": model_entry(cfg, data), "codec": data.codec, "text": data.text}


def train_digest(data: Stage1Data) -> str | None:
    """The train split's ``PreparedDataset.digest`` (None for datasets made in code, as the tests' synthetic ones)."""
    return getattr(data.train, "digest", None)


def check_resumable(last: ckpt.Checkpoint, cfg: Stage1Config, data: Stage1Data, world: int) -> None:
    """The checkpoint must be of this expert of this model, trained with this train config (bookkeeping keys
    aside), on this train split and number of processes; the error names every differing key."""
    where = f"checkpoint {last.path}"
    if last.state.get("stage") == 2:
        raise ConfigError(f"{where} is a stage-2 (alignment) checkpoint; train stage 1 in a run_dir of its own")
    saved, now = last.state.get("data", {}).get("train"), train_digest(data)  # None before 2026-12-06: not compared
    if None not in (saved, now) and saved != now:
        raise ConfigError(f"{where} was trained on another train split (items {saved}) than {cfg.data_dir}'s "
                          f"({now}): prepared again since, or another data_dir. Set data_dir back to the data it "
                          f"trained on, or use another run_dir")
    if last.state.get("world_size", world) != world:  # train.batch_size is per process: the global batch would change
        raise ConfigError(f"{where} was trained on {last.state['world_size']} processes, this run has {world}: the "
                          f"global batch (train.batch_size x processes) would change mid-run. Resume with "
                          f"{last.state['world_size']} processes (torchrun --nproc_per_node), or use another run_dir")
    last.require("model", "expert", "train")
    check_family(last.state["model"], model_entry(cfg, data), where)
    ckpt.check_config({"model": last.state["model"], "expert": last.state["expert"]},
                      {"model": model_entry(cfg, data), "expert": cfg.expert}, where,
                      fix="Use another run_dir, or set these keys back.")
    train = saved_train(last.state)
    former = [f"train.{k}={v}" for k, v in FORMER_DEFAULTS.items()
              if train.get(k) == v != getattr(cfg.train, k) == getattr(TrainConfig, k)]
    ckpt.check_config({"train": train}, {"train": to_dict(cfg.train)}, where,
                      ignore=tuple(f"train.{key}" for key in RESUMABLE_CHANGES),
                      fix="Only bookkeeping keys may change on resume: " + ", ".join(RESUMABLE_CHANGES) + ". Set the "
                          "others back, or train into another run_dir= (train.steps sets the learning-rate schedule, "
                          "so a run cannot be extended)."
                          + (f" {' '.join(former)} was the default until 2026-12-07: if this run used it, resume "
                             f"with {' '.join(former)}." if former else ""))
