"""The run directories of stage 2: the stage-1 run it reads (never writes) and the new run it makes,
which ``siren.load`` reads like a stage-1 run (layout: siren/rl/alignment.py's docstring).

Frozen experts are linked into the new run (hard links, falling back to copies), so they stay
bit-identical; ``alignment.json`` records the source run, its checkpoints and the reward, codec
and text-encoder ids, and a second start with another source or reward is refused.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from siren import checkpoint as ckpt
from siren import io
from siren.config import to_dict
from siren.errors import ConfigError, SirenError
from siren.model import CollaborativeModel
from siren.rl.config import RESUMABLE_CHANGES, AlignConfig
from siren.run_dir import read_run_config

log = logging.getLogger(__name__)


def load_stage1(run_dir: str | os.PathLike, device: str | torch.device = "cpu"
                ) -> tuple[CollaborativeModel, list[ckpt.Checkpoint], dict]:
    """The finished stage-1 model (``siren.load``), each expert's checkpoint and run_dir/config.json."""
    from siren import load

    run_cfg = read_run_config(run_dir)
    if (Path(run_dir) / "alignment.json").is_file():  # its reward and true stage-1 step would be lost from the record,
        # its aligned experts taken as the stage-1 reference
        raise ConfigError(f"run_dir={run_dir} is a stage-2 run (alignment.json): stage 2 starts from a stage-1 run, "
                          f"here {ckpt.read_run_json(Path(run_dir) / 'alignment.json').get('source_run')}; to train "
                          f"this one further, resume it (out={run_dir}) with a larger steps=")
    if run_cfg["model"].get("family") == "continuous":
        raise ConfigError(f"run_dir={run_dir} is a family=continuous run: stage 2 aligns RVQ-code experts "
                          f"(Algorithm 3); give a stage-1 run of the code family")
    model = load(run_dir, device)
    stage1 = [ckpt.load_latest(ckpt.expert_dir(run_dir, k)) for k in range(model.cfg.n_experts)]
    return model, stage1, run_cfg


def _link_tree(src: Path, dest: Path, how: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.is_file():
            continue
        if how == "symlink":
            (dest / f.name).symlink_to(f.resolve())
            continue
        if how == "hardlink":
            try:
                os.link(f, dest / f.name)
                continue
            except OSError:  # another filesystem: copy
                pass
        shutil.copy2(f, dest / f.name)


# Resumable keys (RESUMABLE_CHANGES) that move the numbers of the steps to come: allowed (a smaller GPU's
# micro_batch), said (a resume otherwise reproduces the uninterrupted run).
CHANGES_THAT_MOVE_NUMBERS = {
    "micro_batch": "the update's gradients are summed in other groups, so the steps from here differ in their last "
                   "bits from an uninterrupted run's",
    "decode_batch": "the rollouts are decoded and scored in other batches, so rewards and the steps from here differ "
                    "in their last bits from an uninterrupted run's",
    "fixed_prompts": "the fixed-prompt reward (Figure 5's curve) is measured on another set of prompts from here on"}

LOCK = "align.lock"  # held by the run that sets up and trains in out= (siren.lock)


def check_out(out: str | os.PathLike, n_experts: int, trainable: list[int]) -> None:
    """Refuse an ``out`` that holds anything but a stage-2 run (or a setup of one stopped part way), before the
    lock is taken in it: a refused folder is not written to."""
    out = Path(out)
    # what a setup writes before alignment.json: a setup stopped part way leaves only these, and runs again
    ours = {"config.json", LOCK, *(ckpt.expert_dir(out, k).name for k in range(n_experts) if k not in trainable)}
    if out.is_dir() and not (out / "alignment.json").exists() and \
            any(p.name not in ours and not p.name.endswith(".tmp") for p in out.iterdir()):
        raise SirenError(f"out={out} exists and is not a stage-2 run (no alignment.json); choose a new out=")


def prepare_out(cfg: AlignConfig, stage1: list[ckpt.Checkpoint], run_cfg: dict, trainable: list[int],
                ids: dict) -> None:
    """Create ``out`` (config.json, frozen experts, alignment.json) or check it belongs to this config."""
    out = Path(cfg.out)
    meta = {"config": to_dict(cfg), "source_run": str(Path(cfg.run_dir).resolve()),
            "source_checkpoints": {k: str(c.path.resolve()) for k, c in enumerate(stage1)},
            "trainable_experts": trainable, **ids}
    path = out / "alignment.json"
    if path.exists():
        saved = ckpt.read_run_json(path)
        mine = {k: v for k, v in json.loads(json.dumps(meta)).items() if k != "config"}
        if "prompts_sha256" not in saved:  # a run set up before the prompts were recorded
            mine.pop("prompts_sha256", None)
        ckpt.check_config({k: v for k, v in saved.items() if k != "config"}, mine, f"{path}",
                          fix="This out= directory belongs to another stage-1 run, reward or prompts file; "
                              "use another out= (or the prompts it was started with).")
        # where things are may change (a moved or copied out=, another working directory): what they are is
        # checked above, by the resolved source run, its checkpoints and the prompts' digest
        moved = ("out", "run_dir") + (("prompts",) if "prompts_sha256" in saved else ())
        ckpt.check_config({"config": saved["config"]}, {"config": json.loads(json.dumps(to_dict(cfg)))}, f"{path}",
                          ignore=tuple(f"config.{k}" for k in RESUMABLE_CHANGES + moved),
                          fix="Only these keys may change on resume: " + ", ".join(RESUMABLE_CHANGES)
                              + " (and the paths of out=, run_dir= and prompts=, not what they hold).")
        if saved["config"].get("out") != cfg.out:
            log.info("%s was set up as out=%s; resuming it here", out, saved["config"].get("out"))
        now, rollouts = to_dict(cfg), cfg.batch * cfg.group

        def takes(key: str, value):  # what the value does: a group as large as a step's rollouts is all at once
            return min(value or rollouts, rollouts) if key in ("micro_batch", "decode_batch") else value

        for key, why in CHANGES_THAT_MOVE_NUMBERS.items():
            if key == "fixed_prompts" and not cfg.fixed_every:  # no fixed-prompt reward is measured
                continue
            if key in saved["config"] and takes(key, saved["config"][key]) != takes(key, now[key]):
                log.warning("%s: %s=%s, set up with %s: %s", out, key, now[key], saved["config"][key], why)
        return
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "config.json", run_cfg)
    for k, c in enumerate(stage1):
        if k in trainable:
            continue
        edir = ckpt.expert_dir(out, k)
        if edir.is_symlink():  # rmtree refuses a link: unlinked, or the frozen expert is written into its target
            edir.unlink()
        shutil.rmtree(edir, ignore_errors=True)
        _link_tree(c.path, edir / c.path.name, cfg.link)
        io.write_text(edir / "latest", c.path.name + "\n")
    io.write_json(path, meta)  # last: its presence means the frozen experts are in place


def check_same(run_cfg: dict, what: str, built: str, how: str, run_dir: str) -> None:
    """The rollouts must use the codec / text encoder the stage-1 experts were trained with."""
    want = (run_cfg.get(what) or {}).get("id")
    if want != built:
        raise ConfigError(f"{run_dir} was trained with {what} {want}; {how} builds {built}. "
                          f"Set {what}.* to the stage-1 run's ({(run_cfg.get(what) or {}).get('weights')} weights).")
