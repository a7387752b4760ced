"""Reading what runs leave behind: JSONL logs (stage 1, stage 2) and eval ``results.json``."""
from __future__ import annotations

import json
from pathlib import Path


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
            raise ValueError(f"{path}:{n}: not a JSON object; the log is corrupt (fix or delete that line)") from None
    return rows


def read_metric(results: str | Path, key: str) -> float | None:
    """``key`` of a results.json (a file, or a folder holding one): its "metrics" object, else top level;
    None when the file or the key is absent."""
    path = Path(results)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    for src in (res.get("metrics", {}), res):
        if isinstance(src, dict) and key in src and src[key] is not None:
            v = src[key]
            return float(v["value"] if isinstance(v, dict) else v)
    return None


def weights_note(run_dir: str | Path) -> str:
    """'random codec weights; random text weights' for a run made with random-weight models
    (read from run_dir/config.json), '' for pretrained ones or when the run does not say."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return ""
    cfg = json.loads(path.read_text())
    return "; ".join(f"{cfg[k]['weights']} {k} weights" for k in ("codec", "text")
                     if isinstance(cfg.get(k), dict) and cfg[k].get("weights", "pretrained") != "pretrained")
