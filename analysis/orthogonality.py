"""Property 1 (section 3, Fig. 2a, Fig. 8): quantized features of different RVQ layers are near-orthogonal.

Appendix D.1: each layer's quantized feature f-hat^j is average-pooled over time per clip,
then cos(f-hat^{j1}, f-hat^{j2}) for every pair of layers. Fig. 2a groups the cosines by
layer interval |j1 - j2|, Fig. 8 shows every pair; ``matrix`` is the 12 x 12 mean.

Beside them a baseline the paper does not draw: the same pairs of layers, but of two different samples (a seeded
pairing). Cosines near 0 mean orthogonality only where they are nearer 0 than these: high-dimensional vectors
that share nothing are near-orthogonal too.

- ``features=projected`` (default): f-hat^j as in Eq. 1, the 1024-d vector DAC sums before
  decoding (codebook vector through DAC's out-projection, bias included); ``codebook``: the
  8-d codebook vector Z^j[q] itself.
- ``pool=time`` (default, appendix D.1) or ``pool=frame`` (section 3's wording: the same time
  step t; every frame is a sample).

    python -m analysis.orthogonality data=demo codec=demo
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis import prepared, style
from analysis.cli import as_list, command, out_dir, write_csv
from siren.config import check_numbers
from siren.errors import ConfigError

POOLS = ("time", "frame")


@dataclass
class OrthogonalityConfig:
    data: str = "demo"  # a prepared directory (python -m siren.data.prepare) | demo
    splits: str = "train,test"  # which prepared splits to pool
    max_clips: int = 0  # per split, 0 = all (a seeded draw otherwise)
    codec: str = ""  # codec weights (pretrained | random | demo | /path.pth); empty: those the data was prepared with
    features: str = "projected"  # projected (1024-d f-hat^j of Eq. 1) | codebook (8-d)
    pool: str = "time"  # time (appendix D.1) | frame (section 3: same time step)
    max_frames: int = 20000  # pool=frame: at most this many frames (seeded draw)
    seed: int = 0
    out: str = ""  # default outputs/analysis/orthogonality

    def __post_init__(self):
        prepared.check_features(self.features)
        check_numbers(self, positive=("max_frames",), nonneg=("max_clips",))


def cosine_matrix(x: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
    """[N, J, D] -> [N, J, J] cosine between every pair of layers of each sample (of x[n] against other[n])."""
    def unit(v):
        v = np.asarray(v, dtype=np.float64)
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

    u = unit(x)
    return np.einsum("njd,nkd->njk", u, u if other is None else unit(other))


def unrelated(n: int, seed: int) -> np.ndarray:
    """A seeded pairing of every sample with another one (no sample with itself): the baseline's partners."""
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=int)
    partner[order] = np.roll(order, 1)
    return partner


def by_interval(cos: np.ndarray) -> dict[int, np.ndarray]:
    """[N, J, J] -> {interval |j1 - j2|: every cosine at that interval (pairs j1 < j2, all samples)}."""
    J = cos.shape[-1]
    return {d: np.concatenate([cos[:, j, j + d] for j in range(J - d)]) for d in range(1, J)}


def summary(values: np.ndarray) -> dict:
    q = np.quantile(values, [0.25, 0.5, 0.75])
    return dict(mean=float(values.mean()), std=float(values.std()), q25=float(q[0]), median=float(q[1]),
                q75=float(q[2]), n=int(values.size))


def plot_intervals(groups: dict[int, np.ndarray], note: str, baseline: dict[int, np.ndarray] | None = None):
    """Fig. 2a: one violin per layer interval; the baseline (the same layers of two different samples) as grey
    quartile bars beside them: what 'near 0' is worth for vectors that share nothing."""
    fig, ax = style.figure(style.COLUMN, 0.6)
    ks = sorted(groups)
    parts = ax.violinplot([groups[k] for k in ks], positions=ks, widths=0.8, showmedians=True, showextrema=False)
    for body, c in zip(parts["bodies"], style.layer_colors(len(ks))):
        body.set_facecolor(c)
        body.set_alpha(0.7)
    if baseline:
        q = np.array([np.quantile(baseline[k], [0.25, 0.5, 0.75]) for k in ks])
        ax.errorbar(np.array(ks) + 0.3, q[:, 1], yerr=[q[:, 1] - q[:, 0], q[:, 2] - q[:, 1]], fmt="_", color="0.4",
                    lw=0.8, ms=4, label="other sample (baseline, quartiles)")
        ax.legend(loc="upper right", fontsize="small")
    ax.axhline(0.0, color="0.5", lw=0.5, ls="--")
    ax.set_xticks(ks)
    ax.set_xlabel("Interval $|j_1 - j_2|$")
    ax.set_ylabel("Cosine similarity")
    style.note(fig, note)
    return fig


def plot_pairs(cos: np.ndarray, note: str):
    """Fig. 8: for each layer j1, the distribution of cos(f^{j1}, f^{j2}) over the other 11 layers."""
    J = cos.shape[-1]
    fig, axes = style.figure(style.TWO_COLUMN, 0.5, nrows=3, ncols=4, sharey=True)
    colors = style.layer_colors(J)
    for j1, ax in enumerate(axes.flat[:J]):
        others = [j for j in range(J) if j != j1]
        parts = ax.violinplot([cos[:, j1, j] for j in others], positions=[j + 1 for j in others], widths=0.8,
                              showextrema=False, showmedians=True)
        for body, j in zip(parts["bodies"], others):
            body.set_facecolor(colors[j])
            body.set_alpha(0.7)
        ax.axhline(0.0, color="0.5", lw=0.5, ls="--")
        ax.set_title(f"layer {j1 + 1} vs. others")
        ax.set_xticks(range(1, J + 1))
    for ax in axes[-1]:
        ax.set_xlabel("RVQ layer $j_2$")
    for ax in axes[:, 0]:
        ax.set_ylabel("Cosine")
    style.note(fig, note)
    return fig


def plot_matrix(mean: np.ndarray, note: str, title: str = "Mean cosine between RVQ layers"):
    J = mean.shape[0]
    fig, ax = style.figure(style.COLUMN, 0.85)
    lim = max(float(np.abs(mean[~np.eye(J, dtype=bool)]).max()), 1e-3)
    im = ax.imshow(mean, cmap=style.DIVERGING, vmin=-lim, vmax=lim)
    ax.set_xticks(range(J), range(1, J + 1))
    ax.set_yticks(range(J), range(1, J + 1))
    ax.set_xlabel("RVQ layer $j_2$")
    ax.set_ylabel("RVQ layer $j_1$")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    style.note(fig, note)
    return fig


def run(cfg: OrthogonalityConfig) -> list:
    if cfg.pool not in POOLS:
        raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got '{cfg.pool}'")
    splits = as_list(cfg.splits)
    if not splits or len(set(splits)) < len(splits):  # a split given twice paired clips with their own copies
        raise ConfigError(f"splits={cfg.splits}: give each prepared split to pool once, e.g. splits=train,test")
    folder = out_dir(cfg.out, "orthogonality")
    data = prepared.resolve(cfg.data, cfg.codec)
    names_, codes = [], []
    for split in splits:
        items = prepared.load(data, split, cfg.max_clips, cfg.seed)
        names_ += items.ids
        codes += items.codes
    codec = prepared.open_codec(data, splits, cfg.codec)
    if cfg.pool == "time":
        feats, names = prepared.pooled_features(codec, codes, cfg.features), names_
    else:
        names = [f"{n}@{t}" for n, c in zip(names_, codes) for t in range(c.shape[-1])]
        keep = np.arange(len(names))
        if len(names) > cfg.max_frames:
            keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(names))[: cfg.max_frames])
        feats, names = prepared.frame_features(codec, codes, cfg.features, keep), [names[i] for i in keep]
    cos = cosine_matrix(feats)
    # the same pairs of layers, each of another sample: vectors in different layers' subspaces that share nothing
    base = cosine_matrix(feats, feats[unrelated(len(feats), cfg.seed)]) if len(feats) > 1 else None
    J = cos.shape[-1]
    note = prepared.weights_note(codec)
    prov = dict(codec=codec.id, weights=codec.weights_label, features=cfg.features, pool=cfg.pool)

    pairs = [(a, b) for a in range(J) for b in range(a + 1, J)]
    written = [write_csv(folder / "cosines.csv", (
        dict(sample=n, j1=a + 1, j2=b + 1, interval=b - a, cosine=float(cos[i, a, b]), **prov)
        for i, n in enumerate(names) for a, b in pairs))]
    groups = by_interval(cos)
    baseline = by_interval(base) if base is not None else {}

    def base_cols(k):
        b = baseline.get(k)
        return {} if b is None else dict(baseline_mean=float(b.mean()), baseline_abs_mean=float(np.abs(b).mean()))

    written.append(write_csv(folder / "by_interval.csv",
                             [dict(interval=k, **summary(v), abs_mean=float(np.abs(v).mean()), **base_cols(k), **prov)
                              for k, v in sorted(groups.items())]))
    mean = cos.mean(0)
    written.append(write_csv(folder / "matrix.csv", [
        dict(j1=a + 1, j2=b + 1, mean=float(mean[a, b]), std=float(cos[:, a, b].std()), n=len(cos), **prov)
        for a in range(J) for b in range(J)]))
    written += style.save_figure(plot_intervals(groups, note, baseline), folder, "fig2a_interval")
    written += style.save_figure(plot_pairs(cos, note), folder, "fig8_pairs")
    written += style.save_figure(plot_matrix(mean, note), folder, "matrix")
    off = np.abs(cos[:, ~np.eye(J, dtype=bool)])
    print(f"{len(cos)} samples ({cfg.pool}-pooled {cfg.features} features, {prepared.codec_words(codec)}): "
          f"mean |cos| between different layers {off.mean():.3f}"
          + (f" (the same layers of two different samples: {np.abs(base[:, ~np.eye(J, dtype=bool)]).mean():.3f})"
             if base is not None else "")
          + "; mean cos by interval " + ", ".join(f"{k}:{groups[k].mean():+.3f}" for k in sorted(groups)))
    return written


if __name__ == "__main__":
    command("orthogonality", OrthogonalityConfig, run, __doc__)
