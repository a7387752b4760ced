"""What every ``python -m analysis.<probe> key=value ...`` shares: config parsing, the output
folder, CSV writing, and the closing line that says where things went."""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence, TypeVar

from siren import cli
from siren.config import load_config, to_dict
from siren.errors import ConfigError
from siren.io import atomic_path, check_folder, write_json
from siren.runtime import code_version

T = TypeVar("T")
log = logging.getLogger(__name__)

OUTPUT_ROOT = Path("outputs") / "analysis"


def out_dir(out: str, probe: str) -> Path:
    """``out=`` or ``outputs/analysis/<probe>`` (created by the first file written into it)."""
    return Path(out) if out else OUTPUT_ROOT / probe


def as_list(value: str | Sequence[str]) -> list[str]:
    """``[a,b,c]`` or ``a,b,c`` (a config string) -> ['a', 'b', 'c']; '' -> []."""
    if not isinstance(value, str):
        return [str(v) for v in value]
    s = value.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    return [p.strip().strip("'\"") for p in s.split(",") if p.strip()]


def int_list(value: str | Sequence[str], key: str) -> list[int]:
    """``as_list`` of whole numbers (layers, depths, sizes); anything else is a ConfigError naming ``key``."""
    try:
        return [int(x) for x in as_list(value)]
    except ValueError:
        raise ConfigError(f"{key}={value}: give whole numbers separated by commas, e.g. {key}=1,4,8") from None


def write_csv(dest: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Rows of dicts -> CSV (atomically); floats keep full precision."""
    rows = list(rows)
    columns = list(columns or (rows[0].keys() if rows else []))
    with atomic_path(dest) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
    return Path(dest)


def remove_stale(folder: Path, probe: str, written: Sequence[Path]) -> None:
    """Remove what this probe's previous run into the folder wrote (its config.json's "files") and this one did not:
    a Table 5 loss_stats.csv of another run stayed beside this run's curves when this run had none. Only a
    config.json this probe wrote is read; nothing it does not list is touched."""
    try:
        before = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):  # none (a first run) or unreadable
        return
    if not isinstance(before, dict) or before.get("probe") != probe or "code_version" not in before:
        return  # another probe's, another tool's, or one before 2026-12-07 (no "files")
    before = before.get("files") or []
    now = {p.name for p in written}
    stale = [folder / n for n in before if isinstance(n, str) and n == Path(n).name and n not in now | {"config.json"}
             and (folder / n).is_file()]
    for p in stale:
        p.unlink()
    if stale:
        log.warning("%s: removed %s, written by the previous run into this folder and not by this one",
                    folder, ", ".join(p.name for p in stale))


def main(probe: str, schema: type[T], run: Callable[[T], list[Path]], argv: Sequence[str] | None = None) -> list[Path]:
    """Parse ``argv``, run the probe, write its resolved config beside the outputs, print where. Bad input
    raises a ``SirenError`` naming the key or file and the fix (``command`` turns it into one line)."""
    cfg = load_config(schema, cli.start(argv))
    check_folder(out_dir(getattr(cfg, "out", ""), probe), "out")  # before the probe computes
    # the commit the probe runs from, read before it writes: its own outputs under a tracked folder (the README's
    # out=docs/demo/<probe>) made every such run "-dirty"
    version = code_version()
    written = run(cfg)
    folder = written[0].parent if written else out_dir(getattr(cfg, "out", ""), probe)
    remove_stale(folder, probe, written)
    written = [*written, folder / "config.json"]  # the probe's settings and commit: listed with its outputs
    write_json(written[-1], {"probe": probe, **to_dict(cfg), "code_version": version,
                             "files": [p.name for p in written if p.parent == folder]})
    print(f"analysis.{probe}: wrote {len(written)} file{'s' * (len(written) != 1)} to {folder}/")
    for p in written:
        print(f"  {p}")
    return written


def command(probe: str, schema: type[T], run: Callable[[T], list[Path]], doc: str | None) -> NoReturn:
    """``python -m analysis.<probe>``: ``main`` under the harness's one shell (siren.cli: ``--help`` with
    every key, bad input as one ``error:`` line and exit code 2, Ctrl-C exit code 130)."""
    def entry(argv: list[str]) -> int:
        main(probe, schema, run, argv)
        return 0

    cli.run(entry, schema, f"usage: python -m analysis.{probe} key=value ...\n\n{(doc or '').strip()}")
