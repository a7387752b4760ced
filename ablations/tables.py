"""Result tables: our rows beside the paper's, as Markdown, LaTeX (booktabs; best bold, second
underlined, as the paper does) and CSV. Every table says its scale and weights in its caption and
on every one of our rows, so a demo table is never mistaken for a paper-scale one."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ablations.grid import DESCRIPTIVE, LOWER_IS_BETTER, Grid
from eval.card import REWARD_MARK
from siren import io


@dataclass(frozen=True)
class Outcome:
    """What one of our rows produced: metric values, or why there are none."""
    values: Mapping[str, Any]
    status: str = "ok"  # ok | itg (ran, could not generate audio) | pending | failed | not built | not selected
    reason: str = ""
    reward_metric: tuple[str, ...] = ()  # columns whose metric checkpoint is this row's stage-2 reward model
    weights: str = ""  # its evaluation card's weights label (eval.card.weights_label); "" without one


REWARD_NOTE = ("reward = metric: this row's model was aligned in stage 2 with, or its clips picked by reject sampling "
               "(eval.candidates) with, the checkpoint that computes this column's metric, so the value is inflated")


CALIBRATION = "calibration"  # the source of the oracle / chance rows: they bracket a table, never ranked


def build_frame(grid: Grid, outcomes: Mapping[str, Outcome], source: str,
                calibration: Mapping[str, Outcome] | None = None) -> pd.DataFrame:
    """One row per paper row and per our row; `source` names ours, e.g. 'ours (demo, RANDOM weights)';
    then the calibration rows (oracle, chance), if any."""
    records = []
    for row in grid.rows:
        paper = {"itg": True} if row.paper == "itg" else dict(row.paper)
        records.append({"Setting": row.label, "Source": "paper", "Status": "itg" if paper.pop("itg", False) else "ok",
                        "Note": "", "Reward = metric": "", **{c: paper.get(c) for c in grid.columns}})
        out = outcomes.get(row.label,
                           Outcome({}, "not built", row.needs) if row.cell is None else Outcome({}, "pending"))
        records.append({"Setting": row.label, "Source": source, "Status": out.status, "Note": out.reason,
                        "Reward = metric": ",".join(c for c in grid.columns if c in out.reward_metric),
                        **{c: out.values.get(c) for c in grid.columns}})
    for label, out in (calibration or {}).items():
        records.append({"Setting": label, "Source": CALIBRATION, "Status": out.status, "Note": out.reason,
                        "Reward = metric": "", **{c: out.values.get(c) for c in grid.columns}})
    return pd.DataFrame.from_records(records, columns=["Setting", "Source", "Status", "Note", "Reward = metric",
                                                       *grid.columns])


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _ranks(df: pd.DataFrame, col: str) -> dict[int, int]:
    """Rank (0 best, 1 second) of each row index within its source block, for scored columns. Ranked on the
    values as printed (``_fmt``'s two decimals; pandas' round() differs at halves), so equal numbers (two rows of
    one cell, as Base and Large at scale=demo) share their mark and the next value is second."""
    if col in DESCRIPTIVE:
        return {}
    out = {}
    for name, block in df.groupby("Source", sort=False):
        if name == CALIBRATION:
            continue
        vals = pd.to_numeric(block[col], errors="coerce").dropna().map(lambda v: float(_fmt(float(v))))
        best = sorted(set(vals), reverse=col not in LOWER_IS_BETTER)[:2]
        out.update({i: best.index(v) for i, v in vals.items() if v in best})
    return out


def _cells(df: pd.DataFrame, grid: Grid, mark, dagger: str) -> list[tuple[str, str, str | None, list[str]]]:
    """(setting, source, status text for a row without numbers or None, formatted values); a value whose metric
    is the row's reward model gets ``dagger`` after it."""
    ranks = {c: _ranks(df, c) for c in grid.columns}
    out = []
    for i, r in df.iterrows():
        note = f" ({r['Note']})" if r["Note"] else ""
        status = None if r["Status"] == "ok" else " ".join((r["Status"] + note).split())  # one line: a Markdown row
        marked = set(str(r["Reward = metric"] or "").split(","))
        out.append((r["Setting"], r["Source"], status,
                    [mark(_fmt(r[c]), ranks[c].get(i)) + (dagger if c in marked else "") for c in grid.columns]))
    return out


ITG_NOTE = ("itg: inability to generate, the paper's mark for a model that produced no usable audio (for our rows "
            "the reason follows it; results.json holds it)")


def _reward_note(df: pd.DataFrame) -> bool:
    return bool(df["Reward = metric"].fillna("").astype(str).str.len().gt(0).any())


def _itg_note(df: pd.DataFrame) -> bool:  # what the mark means, beside the table that prints it
    return bool(df["Status"].eq("itg").any())


def _lead(grid: Grid) -> int:
    """How many of the columns, from the first, describe the model (its size): a row without numbers still has
    them (the paper prints 12-1's 140M beside its itg), and its status spans the rest."""
    return next((i for i, c in enumerate(grid.columns) if c not in DESCRIPTIVE), len(grid.columns))


def to_markdown(df: pd.DataFrame, grid: Grid, caption: str) -> str:
    mark = lambda s, rank: f"**{s}**" if rank == 0 else (f"<u>{s}</u>" if rank == 1 else s)
    head, lead = ["Setting", "Source", *grid.columns], _lead(grid)
    lines = [f"**{grid.name}**: {grid.title}", "", f"_{caption}_", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, source, status, vals in _cells(df, grid, mark, REWARD_MARK):
        vals = vals[:lead] + [_md(status)] + [""] * (len(vals) - lead - 1) if status else vals
        lines.append("| " + " | ".join([_md(label), source, *vals]) + " |")
    lines += ["", *[f"- {n}" for n in grid.notes], *([f"- {REWARD_MARK} {REWARD_NOTE}"] if _reward_note(df) else []),
              *([f"- {ITG_NOTE}"] if _itg_note(df) else [])]
    return "\n".join(lines).rstrip() + "\n"


def _md(s: str) -> str:
    """A table cell's text (a failure note may hold a '|', which ends the cell)."""
    return str(s).replace("|", r"\|")


TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
       "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(s: str) -> str:
    return "".join(TEX.get(ch, ch) for ch in s)


def to_latex(df: pd.DataFrame, grid: Grid, caption: str) -> str:
    mark = lambda s, rank: rf"\textbf{{{s}}}" if rank == 0 else (rf"\underline{{{s}}}" if rank == 1 else s)
    rows = _cells(df, grid, mark, r"\textsuperscript{\dag}")
    n, lead = len(grid.columns), _lead(grid)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{ll" + "c" * n + "}", r"\toprule",
             " & ".join(["Setting", "Source", *map(_tex, grid.columns)]) + r" \\", r"\midrule"]
    for label, source, status, vals in rows:
        # a row without numbers (itg, pending, failed) is one spanning cell, as the paper prints itg
        body = " & ".join([*vals[:lead], rf"\multicolumn{{{n - lead}}}{{c}}{{{_tex(status)}}}"]) if status else \
            " & ".join(vals)
        lines.append(f"{_tex(label)} & {_tex(source)} & {body} " + r"\\")
    note = (rf" \textsuperscript{{\dag}} {_tex(REWARD_NOTE)}." if _reward_note(df) else "") + \
        (f" {_tex(ITG_NOTE)}." if _itg_note(df) else "")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex(grid.title)} {_tex(caption)}{note}}}",
              rf"\label{{tab:{grid.name}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_tables(df: pd.DataFrame, grid: Grid, caption: str, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {ext: out_dir / f"{grid.name}.{ext}" for ext in ("md", "tex", "csv")}
    io.write_text(paths["md"], to_markdown(df, grid, caption))
    io.write_text(paths["tex"], to_latex(df, grid, caption))
    with io.atomic_path(paths["csv"]) as tmp:
        df.assign(Caption=caption).to_csv(tmp, index=False)
    return paths
