"""What every ``python -m analysis.<probe> key=value ...`` shares: config parsing, the output
folder, CSV writing, and the closing line that says where things went."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from siren.cli import help_text, start
from siren.config import load_config, to_dict
from siren.errors import ConfigError, SirenError
from siren.io import atomic_path, write_json

T = TypeVar("T")

OUTPUT_ROOT = Path("outputs") / "analysis"


def parse(schema: type[T], argv: Sequence[str], probe: str = "") -> T:
    """``key=value`` strings -> the probe's config; a bad key exits with the list of valid ones."""
    if any(a in ("-h", "--help", "help") for a in argv):
        import importlib

        print(f"usage: python -m analysis.{probe} key=value ...  (defaults shown)")
        print(help_text(schema, importlib.import_module(f"analysis.{probe}").__doc__ if probe else ""))
        raise SystemExit(0)
    try:
        return load_config(schema, argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


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


def main(probe: str, schema: type[T], run: Callable[[T], list[Path]], argv: Sequence[str] | None = None) -> list[Path]:
    """Parse ``argv``, run the probe, write its resolved config beside the outputs, print where."""
    cfg = parse(schema, start(argv), probe)
    try:
        written = run(cfg)
    except SirenError as e:
        raise SystemExit(f"error: {e}") from None  # bad input: the message names the file and the fix
    folder = written[0].parent if written else out_dir(getattr(cfg, "out", ""), probe)
    write_json(folder / "config.json", {"probe": probe, **to_dict(cfg)})
    print(f"analysis.{probe}: wrote {len(written)} files to {folder}/")
    for p in written:
        print(f"  {p}")
    return written
