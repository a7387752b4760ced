"""Reading what runs leave behind: JSONL logs (stage 1, stage 2) and eval ``results.json``."""
from __future__ import annotations

import json
from pathlib import Path

from siren.errors import CheckpointError, DataError

UNRECORDED = "not recorded"  # a run config without a model's weights entry (not taken for "pretrained")


def read_jsonl(path: str | Path) -> list[dict]:
    """One object per line; a half-written last line (a job killed mid-write) is skipped."""
    path = Path(path)
    rows = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                continue
            raise DataError(f"{path}:{n}: not a JSON object; the log is corrupt (fix or delete that line)") from None
    return rows


def read_results(results: str | Path) -> dict | None:
    """An eval results.json (a file, or a folder holding one); None when there is none."""
    path = Path(results)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        return None
    fix = "give the results.json that eval/audiocaps.py wrote"
    try:
        res = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not an eval results.json ({e}); {fix}") from None
    if not isinstance(res, dict):
        raise DataError(f"{path}: not an eval results.json (a JSON {type(res).__name__}, not an object); {fix}")
    return res


def metric_of(res: dict, key: str) -> float | None:
    """``key`` of a read results.json: its "metrics" object, else top level; None when absent."""
    for src in (res.get("metrics", {}), res):
        if isinstance(src, dict) and key in src and src[key] is not None:
            v = src[key]
            return float(v["value"] if isinstance(v, dict) else v)
    return None


def results_weights(res: dict | None) -> str:
    """The weights label of the evaluation that wrote a read results.json (its card's "weights")."""
    return ((res or {}).get("card") or {}).get("weights") or UNRECORDED


def metrics_phrase(label: str) -> str:
    """A figure note's words on the weights of the metric networks behind plotted numbers (``results_weights``):
    a curve of RANDOM-backbone FDs must not pass for pretrained numbers."""
    return weights_phrase("metric", "random" if label.startswith("random") else label)


def weights_note(run_dir: str | Path) -> str:
    """A figure's note on the weights a run was made with (run_dir/config.json): "codec: demo weights (trained on
    the embedded set); text: demo weights (the demo CLAP's RoBERTa ...: untrained text states)", "RANDOM codec and
    text weights", ... naming each mode once (the demo text encoder apart); "weights unknown (...)"
    when the run does not say. A stage-2 run (alignment.json) adds its reward model: what Figure 5 draws."""
    modes = weights_modes(run_dir)
    if modes is None:
        return f"weights unknown ({Path(run_dir).name} has no config.json)"
    by_mode: dict[tuple[str, bool], list[str]] = {}
    for what, mode in modes.items():  # the demo text encoder has words of its own (untrained): never grouped
        by_mode.setdefault((mode, what == "text" and mode == "demo"), []).append(what)
    notes = [weights_phrase(", ".join(w[:-1]) + " and " + w[-1] if len(w) > 1 else w[0], mode)
             for (mode, _), w in by_mode.items()]
    return "; ".join(n for n in notes if n)


def weights_modes(run_dir: str | Path) -> dict[str, str] | None:
    """{"codec": mode, "text": mode[, "reward (<name>)": mode]} as run_dir/config.json (and a stage-2 run's
    alignment.json) record them; None when the run has no config.json."""
    cfg = _run_config(run_dir)
    return None if cfg is None else _modes(run_dir, cfg)


def _run_config(run_dir: str | Path) -> dict | None:
    """The run's config.json (None without one); a damaged one is a CheckpointError naming it. Only its frontends'
    entries are read here (siren.run_dir.read_run_config also needs the model's)."""
    from siren.checkpoint import read_run_json

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    cfg = read_run_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a run's config (a JSON object): restore it, or train into a new run_dir")
    return cfg


def _modes(run_dir: str | Path, cfg: dict) -> dict[str, str]:
    from siren.checkpoint import read_run_json
    from siren.codec import weights_arg

    modes = {}
    for k in ("codec", "text"):
        # what was loaded: the top-level "weights" label ("pretrained" only for the published file, "file <path>"
        # for another one at its place); config.weights is what was asked (a run recorded before labels: that)
        entry = cfg.get(k) if isinstance(cfg.get(k), dict) else {}
        modes[k] = weights_arg(entry.get("weights", (entry.get("config") or {}).get("weights", UNRECORDED)))
    align = read_run_json(Path(run_dir) / "alignment.json") if (Path(run_dir) / "alignment.json").is_file() else {}
    reward = (align.get("config") or {}).get("reward") or {}
    if reward.get("name"):
        label = (align.get("weights_labels") or {}).get("reward", reward.get("weights", "pretrained"))
        modes[f"reward ({reward['name']})"] = weights_arg(label)
    return modes


def provenance(run_dir: str | Path) -> dict[str, str]:
    """CSV columns saying what a run's numbers were made with: ``weights`` ("codec=demo, text=demo", or
    "unknown (no config.json)") and ``model`` (distribution and conditioning, as its config.json records)."""
    cfg = _run_config(run_dir)
    if cfg is None:
        return {"weights": "unknown (no config.json)", "model": "unknown"}
    model = cfg.get("model") or {}
    words = ("continuous" if model.get("family") == "continuous" else
             f"{model.get('distribution', '?')}, conditioning={model.get('conditioning', '?')}")
    return {"weights": ", ".join(f"{k}={v}" for k, v in _modes(run_dir, cfg).items()), "model": words}


def weights_phrase(what: str, mode: str) -> str:
    """A figure note's words for one model's weights: "pretrained codec weights", "codec: demo weights (trained on
    the embedded set)" (the text encoder's: demo_weights.TEXT_LABEL), "RANDOM codec weights", "codec: weights from
    /x.pth"; ``mode`` is a weights mode or label. Pretrained is said too: a figure is copied alone into a paper."""
    from siren.codec import DEMO_LABEL, weights_arg
    from siren.demo_weights import mode_words

    if mode == "pretrained":
        return f"pretrained {what} weights"
    if mode == UNRECORDED:  # said, not left blank as if pretrained
        return f"{what}: weights not recorded by the run"
    if mode == "random":
        return f"RANDOM {what} weights"
    if mode in ("demo", DEMO_LABEL):  # the text encoder's demo states are untrained: its own words (TEXT_LABEL)
        return f"{what}: {mode_words('demo', what)}"
    return f"{what}: weights from {weights_arg(mode)}"  # a file given by path (the mode) or its label
