"""The steps of a cell, each a module-level function that a submitit job runs (so it pickles by
reference). Each takes the cell's resolved dotted config and calls the stage's own entry point
with the stage's own keys: a grid run is exactly the commands a user would type by hand."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from siren.train import EXIT_PREEMPTED


class Preempted(RuntimeError):
    """A stage stopped on SIGUSR2/SIGTERM after checkpointing; running the step again resumes it."""


def _keys(cfg: Mapping[str, Any], prefix: str, strip: bool = True) -> list[str]:
    """key=value args of the keys under ``prefix`` (without it when ``strip``)."""
    return [f"{k[len(prefix):] if strip else k}={v}" for k, v in cfg.items() if k.startswith(prefix)]


def _weights(cfg: Mapping[str, Any], *parts: str) -> list[str]:
    return [f"{p}.weights={cfg['weights']}" for p in parts]


def stage1_args(cfg: Mapping[str, Any]) -> list[str]:
    """siren.train keys of a cell: the model preset first (so explicit model keys override it)."""
    model = {k: v for k, v in cfg.items() if k.startswith("model.") and k != "model.scale"}
    return [f"scale={cfg['model.scale']}", *_keys(model, "", strip=False), *_keys(cfg, "train.", strip=False),
            *_weights(cfg, "codec")]


def _check(rc: int, what: str) -> None:
    if rc == EXIT_PREEMPTED:
        raise Preempted(f"{what} stopped on a signal after checkpointing; run the grid again to resume")
    if rc != 0:
        raise RuntimeError(f"{what} exited with status {rc}")


def prepare_step(data_dir: str, cfg: Mapping[str, Any]) -> dict:
    from siren.data.prepare import main as prepare_main

    manifest = "demo" if cfg["data.source"] == "demo" else cfg["data.train"]
    prepare_main([f"manifest={manifest}", f"out={data_dir}", *_weights(cfg, "codec", "text")])
    if cfg["data.source"] == "demo":  # the demo's eval subset: the first test clip of every class
        write_demo_subset(Path(data_dir) / "demo_source")
    return {"data_dir": data_dir}


def write_demo_subset(source: Path) -> Path:
    from siren.data.manifest import read_manifest
    from siren.io import write_text

    first = {}
    for row in read_manifest(source / "test.csv"):
        first.setdefault(row.label, row.id)
    path = source / "eval_subset.txt"
    write_text(path, "".join(f"{i}\n" for i in first.values()))
    return path


def train_step(cfg: Mapping[str, Any], run_dir: str, data_dir: str, expert: int) -> dict:
    from siren.train import main as train_main

    _check(train_main([*stage1_args(cfg), f"run_dir={run_dir}", f"expert={expert}", f"data_dir={data_dir}"]),
           f"training expert {expert} of {run_dir}")
    return {"run_dir": run_dir, "expert": expert}


def align_step(cfg: Mapping[str, Any], stage1_dir: str, out: str, prompts: str) -> dict:
    from siren.rl.alignment import main as rl_main

    args = [f"run_dir={stage1_dir}", f"out={out}", f"prompts={prompts}", *_keys(cfg, "rl."),
            *_weights(cfg, "codec", "text", "reward")]
    _check(rl_main(args), f"stage-2 alignment of {stage1_dir}")
    return {"run_dir": out}


def eval_step(cfg: Mapping[str, Any], run_dir: str, ref: str, out: str) -> dict:
    """Generate for every reference caption, score, write results.json; a model that cannot generate
    (non-finite logits, collapse) is recorded as itg with the reason, as the paper prints it."""
    from eval.audiocaps import evaluate_run

    return evaluate_run(run_dir=run_dir, ref=ref, out=out, weights=cfg["weights"],
                        overrides=[*_keys(cfg, "eval.")])


def result_path(cell_dir: Path) -> Path:
    return Path(cell_dir) / "eval" / "results.json"
