"""Property 2 (section 3, Fig. 2c, Fig. 9): semantic richness descends with RVQ depth.

Appendix D.2: for each RVQ layer j, the clip's codes q^j look up that layer's codebook to
give f-hat^j in R^{l x C}; a two-layer MLP classifies the clip (AVSync-15: 15 classes; here
the manifest's ``label`` column), top-1 accuracy on the test split. The paper does not say
how the l frames enter the MLP; we average-pool over time (as appendix D.1 does for the
cosines), standardise, and train scikit-learn's MLPClassifier with one hidden layer
(= two linear layers). Each panel of the t-SNE figure embeds the same test clips' pooled
features of one layer, coloured by class, with the layer's accuracy on top.

    python -m analysis.semantic_probe data=demo codec=demo      # codec=random: the smoke-test codec
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis import prepared, style
from analysis.cli import command, int_list, out_dir, write_csv
from siren.codec import N_LAYERS
from siren.config import check_numbers
from siren.data.cache import index_path
from siren.errors import ConfigError, DataError

EXACT_TSNE_MAX = 2000


@dataclass
class SemanticProbeConfig:
    data: str = "demo"  # prepared directory with train + test splits whose manifests had a `label` column | demo
    max_clips: int = 0  # per split, 0 = all (a seeded draw otherwise)
    codec: str = ""  # codec weights (pretrained | random | demo | /path.pth); empty: those the data was prepared with
    features: str = "projected"  # projected (1024-d f-hat^j) | codebook (8-d Z^j[q])
    hidden: int = 256  # width of the MLP's hidden layer
    max_iter: int = 500  # MLP training epochs (adam)
    tsne_perplexity: float = 30.0  # capped at (n - 1) / 3 for small test sets
    panels: str = "1,4,8,12"  # layers shown in the Fig. 2c panel (all 12 go to Fig. 9)
    seed: int = 0
    out: str = ""

    def __post_init__(self):
        prepared.check_features(self.features)
        check_numbers(self, positive=("hidden", "max_iter", "tsne_perplexity"), nonneg=("max_clips",))


def probe_accuracy(x_train: np.ndarray, y_train, x_test: np.ndarray, y_test, hidden: int = 256,
                   max_iter: int = 500, seed: int = 0) -> float:
    """Top-1 test accuracy of a 2-layer MLP (standardised inputs -> hidden ReLU -> classes)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter,
                                                        random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # small sets: max_iter is the budget, not an error
        clf.fit(x_train, y_train)
    return float((clf.predict(x_test) == np.asarray(y_test)).mean())


def check_split(train: prepared.Items, test: prepared.Items, where) -> None:
    """A probe can only be read against chance if every test class was trained on and no test clip is a train
    clip: a class missing from train is never predicted; a shared file is scored on what the probe memorised."""
    unseen = sorted(set(test.labels) - set(train.labels))
    if unseen:
        drawn = " among the max_clips drawn" if len(train.index) < len(train.dataset) else ""
        raise DataError(f"{where}: test classes {unseen[:5]} have no train clip{drawn}; the probe cannot predict "
                        f"them. Use splits that share their classes")
    sha = {train.dataset.items[i].get("source_sha256") for i in train.index} - {None}
    shared = [test.dataset.items[i]["id"] for i in test.index if test.dataset.items[i].get("source_sha256") in sha]
    if shared:
        raise DataError(f"{where}: {len(shared)} test clip(s) have the same audio file as a train clip (e.g. "
                        f"{shared[:3]}): the probe would be scored on clips it was trained on. Prepare a test split "
                        f"without them")


def tsne(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """[N, D] -> [N, 2]; standardised first so no single channel dominates the distances."""
    from sklearn.manifold import TSNE

    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    p = float(min(perplexity, max(1.0, (len(x) - 1) / 3)))
    method = "exact" if len(x) <= EXACT_TSNE_MAX else "barnes_hut"  # exact is faster for small sets
    return TSNE(n_components=2, perplexity=p, init="pca", method=method, random_state=seed).fit_transform(x)


def plot_tsne(points: dict[int, np.ndarray], acc: dict[int, float], labels: list[str], layers: list[int],
              note: str, ncols: int):
    classes = sorted(set(labels))
    colors = style.class_colors(len(classes))
    c = [colors[classes.index(y)] for y in labels]
    nrows = -(-len(layers) // ncols)
    width = style.TWO_COLUMN if ncols > 2 else style.COLUMN
    fig, axes = style.figure(width, nrows / ncols, nrows=nrows, ncols=ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for j, ax in zip(layers, axes.flat):
        ax.scatter(points[j][:, 0], points[j][:, 1], c=c, s=4, linewidths=0)
        ax.set_title(f"layer {j}: {100 * acc[j]:.1f}%")
    style.note(fig, note)
    return fig


def plot_accuracy(acc: dict[int, float], n_classes: int, note: str):
    fig, ax = style.figure(style.COLUMN, 0.6)
    js = sorted(acc)
    ax.plot(js, [100 * acc[j] for j in js], marker="o", color=style.layer_colors(3)[0])
    ax.axhline(100 / n_classes, color="0.5", lw=0.5, ls="--", label=f"chance ({100 / n_classes:.1f}%)")
    ax.set_xticks(js)
    ax.set_xlabel("RVQ layer")
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.legend()
    style.note(fig, note)
    return fig


def run(cfg: SemanticProbeConfig) -> list:
    panels = int_list(cfg.panels, "panels")  # checked before minutes of probing, not after
    bad = [j for j in panels if not 1 <= j <= N_LAYERS]
    if bad or not panels:
        raise ConfigError(f"panels={cfg.panels}: give the layers of the Fig. 2c panel, each in 1..{N_LAYERS}"
                          + (f" ({bad} do not exist)" if bad else ""))
    folder = out_dir(cfg.out, "semantic_probe")
    data = prepared.resolve(cfg.data, cfg.codec)
    train = prepared.load(data, "train", cfg.max_clips, cfg.seed, need_labels=True)
    test = prepared.load(data, "test", cfg.max_clips, cfg.seed, need_labels=True)
    check_split(train, test, index_path(data, "test"))
    codec = prepared.open_codec(data, ["train", "test"], cfg.codec)
    feats = prepared.pooled_features(codec, train.codes + test.codes, cfg.features)  # [N, 12, D]
    y = np.array(train.labels + test.labels)
    tr = np.arange(len(y)) < len(train.codes)
    te = ~tr
    n_classes = len(set(y[tr]))
    layers = list(range(1, feats.shape[1] + 1))
    acc, points = {}, {}
    print(f"probe trained on {int(tr.sum())} clips, tested on {int(te.sum())}, {n_classes} classes "
          f"(chance {100 / n_classes:.1f}%); {prepared.codec_words(codec)}")
    for j in layers:
        acc[j] = probe_accuracy(feats[tr, j - 1], y[tr], feats[te, j - 1], y[te], cfg.hidden, cfg.max_iter, cfg.seed)
        points[j] = tsne(feats[te, j - 1], cfg.tsne_perplexity, cfg.seed)
        print(f"layer {j:2d}: top-1 {100 * acc[j]:5.1f}%")
    note = prepared.weights_note(codec)
    prov = dict(codec=codec.id, weights=codec.weights_label, features=cfg.features, pool="time-mean",
                n_train=int(tr.sum()), n_test=int(te.sum()), n_classes=n_classes)
    written = [write_csv(folder / "accuracy.csv", [dict(layer=j, top1=acc[j], **prov) for j in layers])]
    ids = test.ids
    written.append(write_csv(folder / "tsne.csv", [
        dict(layer=j, id=i, label=lab, x=float(p[0]), y=float(p[1]), codec=codec.id, weights=codec.weights_label)
        for j in layers for i, lab, p in zip(ids, y[te], points[j])]))
    written += style.save_figure(plot_tsne(points, acc, list(y[te]), panels, note, ncols=len(panels)), folder,
                                 "fig2c_tsne")
    written += style.save_figure(plot_tsne(points, acc, list(y[te]), layers, note, ncols=6), folder, "fig9_tsne")
    written += style.save_figure(plot_accuracy(acc, n_classes, note), folder, "accuracy")
    return written


if __name__ == "__main__":
    command("semantic_probe", SemanticProbeConfig, run, __doc__)
