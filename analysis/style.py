"""One plotting style for every probe: paper column widths, small serif-free fonts, one colour map.

Figures are sized for the paper's layout (one column ~3.3 in, two columns ~6.9 in) so a PDF
drops into LaTeX at 100 % without rescaling the fonts. ``save_figure`` writes PDF + PNG
atomically. Importing this module selects matplotlib's Agg backend (no display on a node).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.layout_engine import ConstrainedLayoutEngine  # noqa: E402

from siren.io import atomic_path  # noqa: E402

COLUMN = 3.3  # in, one column of the paper
TWO_COLUMN = 6.9  # in, full text width
CMAP = "viridis"  # sequential: layers 1..12, steps
DIVERGING = "RdBu_r"  # signed values centred on 0 (cosines)
CATEGORICAL = "tab10"  # up to 10 categories (runs, module groups)
CATEGORICAL_MANY = "tab20"  # classes (t-SNE panels); 20 colours cover the 15 AVSync-15 classes
DPI = 300

RC = {
    "font.family": "sans-serif",
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "legend.fontsize": 6,
    "legend.frameon": False,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.0,
    "lines.markersize": 3,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text, accepted by camera-ready checks
}
plt.rcParams.update(RC)


def figure(width: float = COLUMN, aspect: float = 0.75, nrows: int = 1, ncols: int = 1, **kw):
    """(fig, axes) of ``width`` inches and height ``width * aspect``, constrained layout."""
    return plt.subplots(nrows, ncols, figsize=(width, width * aspect), layout="constrained", **kw)


def layer_colors(n: int = 12) -> list:
    """One colour per RVQ layer 1..n, shallow to deep along ``CMAP``."""
    return [plt.get_cmap(CMAP)(x) for x in np.linspace(0.0, 0.92, n)]


def class_colors(n: int) -> list:
    """n distinguishable colours: tab10 up to 10, tab20 beyond."""
    cmap = plt.get_cmap(CATEGORICAL if n <= 10 else CATEGORICAL_MANY)
    return [cmap(i % cmap.N) for i in range(n)]


NOTE_SIZE = 5  # pt


def note(fig, text: str) -> None:
    """A provenance line under the figure, e.g. 'random codec weights' (say what made the numbers), wrapped at
    the figure's width: one long line widened the saved image (``savefig.bbox: tight``) and squeezed the plot."""
    if text:
        width_pt, height_pt = 72 * fig.get_figwidth(), 72 * fig.get_figheight()
        lines = math.ceil(len(text) * 0.6 * NOTE_SIZE / (0.95 * width_pt))  # ~0.6 em a character, word breaks
        engine = fig.get_layout_engine()
        if isinstance(engine, ConstrainedLayoutEngine):  # keep the x label clear of the note
            bottom = min(0.3, lines * 1.25 * NOTE_SIZE / height_pt)  # (left, bottom, width, height)
            engine.set(rect=(0, bottom, 1, 1 - bottom))
        fig.text(0.005, 0.002, text, ha="left", va="bottom", fontsize=NOTE_SIZE, color="0.35", style="italic",
                 wrap=True)


def ema(values: np.ndarray, weight: float, steps: np.ndarray | None = None) -> np.ndarray:
    """Exponential moving average, bias-corrected (TensorBoard's smoothing); ``weight`` is the past's per step.
    With ``steps`` (steps done, from 0), an entry logged d steps after the one before stands for those d steps
    (the past decays by weight**d), the first for max(step, 1): logs written every N steps, plus the steps a run
    always logs, are not taken as evenly spaced."""
    if weight <= 0:
        return values
    gaps = np.ones(len(values)) if steps is None else np.diff(np.asarray(steps), prepend=0).clip(min=1)
    out, acc, norm = np.empty_like(values, dtype=float), 0.0, 0.0
    for i, (v, d) in enumerate(zip(values, gaps)):
        decay = weight ** d
        acc, norm = decay * acc + (1 - decay) * v, decay * norm + (1 - decay)
        out[i] = acc / norm
    return out


def save_figure(fig, out_dir: str | os.PathLike, name: str) -> list[Path]:
    """Write ``out_dir/name.pdf`` and ``out_dir/name.png`` (each atomically) and close ``fig``."""
    out = []
    for ext in ("pdf", "png"):
        dest = Path(out_dir) / f"{name}.{ext}"
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, format=ext)
        out.append(dest)
    plt.close(fig)
    return out
