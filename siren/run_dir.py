"""A run directory as a whole: the config.json its experts share (model, codec, text encoder), the length they
were trained on, and the model assembled from their newest checkpoints (``siren.load``). One expert's
checkpoints are siren.checkpoint's.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from siren import io
from siren.checkpoint import (
    Checkpoint,
    check_config,
    config_diff,
    expert_dir,
    expert_dirs,
    load_latest,
    load_weights,
    read_commit_step,
    read_run_json,
    step_name,
)
from siren.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

RUN_KEYS = ("model", "codec", "text")  # what every expert of a run shares (run_dir/config.json)


def write_run_config(run_dir: Path, run_config: Mapping[str, Any]) -> None:
    """Create run_dir/config.json, or check that the existing one agrees (every expert of a run shares it)."""
    path = run_dir / "config.json"
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".config.json.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(run_config, indent=2, sort_keys=True) + "\n")
            os.chmod(tmp, io.default_mode())  # mkstemp made it 0600: a group-shared run folder's jobs read it
            os.link(tmp, path)  # create-if-absent, atomically: two experts starting together write it once
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    saved = read_run_json(path)
    check_family(saved.get("model", {}), run_config.get("model", {}), f"run directory {run_dir}")
    check_config(saved, json.loads(json.dumps(run_config)), f"run directory {run_dir} (config.json)",
                 fix="Experts of one run must share the model, codec and text encoder: use another run_dir.")


def check_family(saved: Mapping[str, Any], now: Mapping[str, Any], where: str) -> None:
    """One sentence where a run of one model family meets the other's config (every model key differs: the
    key-by-key list said nothing of why)."""
    was, want = saved.get("family", "discrete"), now.get("family", "discrete")
    if was != want:
        tokens = "RVQ codes" if was == "discrete" else "continuous tokens"
        raise ConfigError(f"{where} holds a family={was} model ({tokens}); this run asks for family={want}: use "
                          f"another run_dir")


def trained_frames(run_dir: str | os.PathLike) -> int | None:
    """The longest sequence every expert of a run was trained on (frames), when the run records it."""
    lengths = []
    for edir in expert_dirs(run_dir):
        c = load_latest(edir)
        if c is None or c.state.get("trained_frames") is None:
            return None
        lengths.append(int(c.state["trained_frames"]))
    return min(lengths) if lengths else None


def warn_if_past_trained(run_dir: str | os.PathLike, n_frames: int, what: str) -> None:
    """Generation past the trained length extrapolates the positions (README: "Length")."""
    limit = trained_frames(run_dir)
    if limit is not None and n_frames > limit:
        log.warning("%s generates %d frames (%.1f s) but %s was trained on sequences of at most %d frames (%.1f s): "
                    "positions past %d are never trained (generate at most %.1f s, or train on longer sequences: "
                    "train.crop_s=10 on 10 s items)", what, n_frames, n_frames / 50, run_dir, limit, limit / 50, limit,
                    limit / 50)


def read_run_config(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory: {path} is missing "
                              f"(python -m siren.train run_dir={run_dir} expert=K ... writes it)")
    cfg = read_run_json(path)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):  # a KeyError / AttributeError later
        raise CheckpointError(f"{path} is not a run's config (a JSON object with a 'model' entry): restore it, or "
                              f"train into a new run_dir")
    return cfg


def reward_model(run_dir: str | os.PathLike) -> dict:
    """The model a stage-2 run was aligned with (name, weights_sha256), from its alignment.json; {} for a
    stage-1 run. Generation records it beside the clips, so a gen_dir= evaluation does not need the run."""
    meta = Path(run_dir) / "alignment.json"
    if not meta.is_file():
        return {}
    return io.read_json(meta, "stage 2 wrote it: run the alignment again (it resumes), or evaluate another run"
                        ).get("reward_model") or {}


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu", allow_unfinished: bool = False):
    """The K trained experts of ``run_dir`` assembled into a ``CollaborativeModel`` (eval mode); a continuous
    run's ``ContinuousLM`` (``load_continuous``).

    Raises one error listing every expert that is missing, unfinished (its latest checkpoint is
    before train.steps; ``allow_unfinished=True`` takes it anyway), built for another model or another
    expert's (a folder moved)."""
    from siren.model import CollaborativeModel
    from siren.model.config import from_saved

    run_dir = Path(run_dir)
    shared = read_run_config(run_dir)
    if shared["model"].get("family") == "continuous":
        return load_continuous(run_dir, shared, device, allow_unfinished)
    cfg = from_saved(shared["model"], f"{run_dir / 'config.json'}: model")  # older configs: arch=legacy
    found, problems = {}, []
    # a stage-2 run: its trained experts are read at the step its commit point names (each expert's `latest` moves
    # first, so a run killed between two experts' saves holds them at different steps)
    commit = run_dir / "rl" / "state.json"
    committed = read_commit_step(commit) if commit.is_file() else None
    for k in range(cfg.n_experts):
        edir = expert_dir(run_dir, k)
        c = load_latest(edir) if edir.is_dir() else None
        if c is not None and committed is not None and c.state.get("stage") == 2 and c.step != committed:
            if not (edir / step_name(committed)).is_dir():
                problems.append(f"expert {k}: {commit} names step {committed}, which {edir} does not have")
                continue
            c = Checkpoint(edir / step_name(committed))
        if c is None:
            problems.append(f"expert {k}: missing (no checkpoint in {edir})")
            continue
        c.require(*RUN_KEYS, "finished", "rl" if c.state.get("stage") == 2 else "train")
        diff = config_diff({key: shared[key] for key in RUN_KEYS}, {key: c.state[key] for key in RUN_KEYS})
        if diff:
            problems.append(f"expert {k}: {c.path} was trained for another model: "
                            + ", ".join(f"{key}={b!r} (run config.json: {a!r})" for key, a, b in diff))
        elif c.state.get("expert", k) != k:  # every expert has the same shapes: a swapped folder loads silently
            problems.append(f"expert {k}: {c.path} is expert {c.state['expert']}'s checkpoint (its state.json), "
                            f"not expert {k}'s: were expert_<k> folders moved or swapped? Put each in its own")
        elif not c.state["finished"] and not allow_unfinished:
            of = c.state["rl"]["steps"] if c.state.get("stage") == 2 else c.state["train"]["steps"]
            problems.append(f"expert {k}: unfinished, latest checkpoint {c.path.name} is step {c.step} of "
                            f"{of} (resume its training, or pass allow_unfinished=True)")
        found[k] = c
    data = {k: c.state.get("data", {}).get("train") for k, c in found.items()}  # None before 2026-12-06: skipped
    if len({d for d in data.values() if d}) > 1:  # one expert trained again on another data_dir loaded silently
        problems.append("the experts were trained on different train splits (digest of the items each read): "
                        + ", ".join(f"expert {k} {d}" for k, d in data.items() if d)
                        + "; train every expert of a run on one data_dir")
    if problems:
        raise CheckpointError(f"cannot assemble {cfg.distribution} model from {run_dir}:\n  " + "\n  ".join(problems))
    from siren.train_config import saved_train

    warn_other_train_keys(run_dir, {k: saved_train(c.state) for k, c in found.items() if c.state.get("stage") != 2})
    model = CollaborativeModel(cfg)  # zero code tables: every expert's checkpoint holds them
    for k, c in found.items():
        load_weights(model.experts[k], c.model_state(), c.path / "model.safetensors")
    return model.to(device).eval()


def others_train(run_dir: Path, k: int) -> dict[int, dict]:
    """The train configs of the run's other stage-1 experts that have a checkpoint (expert -> config)."""
    from siren.train_config import saved_train

    out = {}
    for edir in expert_dirs(run_dir):
        j = int(edir.name[len("expert_"):])
        try:
            last = load_latest(edir) if j != k else None
        except CheckpointError:  # that expert's own job says so; this one trains on
            continue
        if last is not None and last.state.get("stage") != 2:
            out[j] = saved_train(last.state)
    return out


def warn_other_train_keys(run_dir: Path, trains: dict[int, dict], when: str = "") -> None:
    """The experts of one run trained with other train keys (each job takes its own command line: another lr, seed
    or crop for expert 1, or another default: train.weight_decay's changed on 2026-12-07) load as one model, and the
    cards and probes describe it by expert 0's: said, when loaded and when an expert starts (``trains``: expert ->
    its train config)."""
    from siren.train_config import RESUMABLE_CHANGES

    keys = sorted({key for t in trains.values() for key in t} - set(RESUMABLE_CHANGES))
    differ = [key for key in keys if len({json.dumps(t.get(key)) for t in trains.values()}) > 1]
    if differ:
        log.warning("%s: its experts %s with other train keys: %s; its cards and probes describe it by "
                    "expert %d's", run_dir, when or "were trained", "; ".join(f"train.{key}: " + ", ".join(
                        f"expert {k} {t.get(key)!r}" for k, t in trains.items()) for key in differ), min(trains))


def load_continuous(run_dir: Path, shared: dict, device: str | torch.device = "cpu", allow_unfinished: bool = False):
    """A family=continuous run (one model, expert_0): the ContinuousLM of its config.json, latent projection
    included (buffers of the checkpoint), in eval mode."""
    from siren.config import from_dict
    from siren.model.continuous import ContinuousConfig, ContinuousLM

    model_cfg = {k: v for k, v in shared["model"].items() if k != "family"}
    cfg = from_dict(ContinuousConfig, model_cfg, f"{run_dir / 'config.json'}: model")
    c = load_latest(expert_dir(run_dir, 0))
    if c is None:
        raise CheckpointError(f"cannot load the continuous model of {run_dir}: no checkpoint in "
                              f"{expert_dir(run_dir, 0)}")
    c.require(*RUN_KEYS, "finished", "train")
    diff = config_diff({key: shared[key] for key in RUN_KEYS}, {key: c.state[key] for key in RUN_KEYS})
    if diff:
        raise CheckpointError(f"{c.path} was trained for another model: "
                              + ", ".join(f"{key}={b!r} (run config.json: {a!r})" for key, a, b in diff))
    if not c.state["finished"] and not allow_unfinished:
        raise CheckpointError(f"{c.path} is step {c.step} of {c.state['train']['steps']} (resume its training, or "
                              f"pass allow_unfinished=True)")
    model = ContinuousLM(cfg)  # a placeholder projection: the checkpoint holds the fitted one
    load_weights(model, c.model_state(), c.path / "model.safetensors")
    model.projection.id = cfg.latent
    return model.to(device).eval()
