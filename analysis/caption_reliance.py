"""How much a trained stage-1 model takes from its caption: per-layer CE with the clip's own
caption vs with another clip's.

Not a figure of the paper. It answers the question a reversed ranking raises (at demo scale
Table 6 ranks 1-12 best in FD and CLAP, the paper 6-2): on held-out clips, teacher-forced,
CE of layer j (Eq. 6 term, frame-weighted over the split) is computed twice, with the text
states of the clip's own caption and with those of a caption from another clip (another
class where the manifest has labels). Their difference, in nats, is what the caption tells
the model about layer j; a model that ignores the text scores 0. A model can model the codes'
time course well (low own-caption CE) and still take little from the caption, and then its
samples match their captions (CLAP score) poorly.

Another clip's caption: the split sorted by (label, position), each clip paired with the one
half the split further on; a label on more than half the clips cannot be paired off and is an
error. Frames: the first ``seconds`` of every clip, by default the run's training crop (the
positions its model trained on).

    python -m analysis.caption_reliance data=outputs/demo/data/<id> run=outputs/demo/stage1/<a>,outputs/demo/stage1/<b>
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from analysis import prepared, style
from analysis.cli import as_list, command, out_dir, write_csv
from analysis.logs import provenance, weights_note
from siren.checkpoint import expert_dir, load_latest
from siren.codec import FRAME_RATE, N_LAYERS
from siren.config import check_numbers
from siren.data import PreparedDataset
from siren.data.cache import index_path
from siren.data.dataset import collate
from siren.errors import ConfigError, DataError
from siren.model.params import expert_params
from siren.runtime import resolve_device
from siren.train_config import saved_train


@dataclass
class CaptionRelianceConfig:
    run: str = ""  # stage-1 run directories, comma-separated (each a discrete-token model)
    data: str = ""  # the prepared directory the runs trained on (codes + text states of the same encoders)
    split: str = "test"
    seconds: float = 0.0  # first seconds of every clip; 0 = each run's train.crop_s (whole clips if that is 0)
    batch_size: int = 16
    device: str = "auto"
    out: str = ""

    def __post_init__(self):
        check_numbers(self, positive=("batch_size",), nonneg=("seconds",))


def other_clip(labels: list[str | None], where: str = "") -> list[int]:
    """For clip i, the index of the clip whose caption replaces its own: the split sorted by
    (label, position), each clip paired with the one half the split further on (a permutation
    without fixed points; with labels, never a clip of the same label)."""
    n = len(labels)
    if n < 2:
        raise DataError(f"{where}: {n} clip(s); another clip's caption needs at least 2")
    order = sorted(range(n), key=lambda i: (labels[i] or "", i))
    partner = [0] * n
    for r, i in enumerate(order):
        partner[i] = order[(r + n // 2) % n]
    same = sorted({labels[i] for i in range(n) if labels[i] and labels[i] == labels[partner[i]]})
    if same:
        raise DataError(f"{where}: label(s) {same} hold more than half of the {n} clips, so some clip would be "
                        f"given a caption of its own class; probe a split with more classes")
    return partner


def read_clips(ds: PreparedDataset) -> list[dict]:
    """Every clip of the split once: its real (unpadded) codes, its caption and that caption's text states."""
    clips = []
    for i, it in enumerate(ds.items):
        text = ds.text(i)
        clips.append({"codes": ds.codes(i)[:, : it["real_frames"]], "text": text["states"], "text_mask": text["mask"],
                      "id": it["id"], "caption": it["caption"]})
    return clips


@torch.no_grad()
def layer_ce(model, clips: list[dict], text_of: list[int], frames: int, batch_size: int,
             device: torch.device) -> np.ndarray:
    """[12] CE of each RVQ layer over the first ``frames`` frames of every clip (0 = all), clip i
    read with the text states of clip ``text_of[i]``; frame-weighted over the split as Eq. 6's
    frame-masked mean over one batch of all of them."""
    total, n_frames = torch.zeros(N_LAYERS, dtype=torch.float64), 0
    for b in range(0, len(clips), batch_size):
        items = [{**clips[i], "codes": clips[i]["codes"][:, :frames] if frames else clips[i]["codes"],
                  **{k: clips[text_of[i]][k] for k in ("text", "text_mask", "caption")}}
                 for i in range(b, min(len(clips), b + batch_size))]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(items).items()}
        losses = model.loss(batch)
        f = losses[0].frames
        total += torch.cat([loss.ce for loss in losses]).double().cpu() * f
        n_frames += f
    return (total / n_frames).numpy()


def train_keys(run_dir: str) -> dict:
    """The train config of the run's first expert, from its latest checkpoint (keys added since it was
    saved at the values it trained with); empty when it has none."""
    last = load_latest(expert_dir(run_dir, 0))
    return saved_train(last.state) if last is not None else {}


def train_frames(train: dict) -> int:
    """The run's training crop in frames (0 = whole clips)."""
    return round(float(train.get("crop_s", 0)) * FRAME_RATE)


def loss_words(n: int) -> str:
    """train.loss_layers in words ('' for 0: every layer)."""
    return f"loss over layer{'s 1-' if n > 1 else ' '}{n}" if n else ""


def train_words(train: dict) -> str:
    """What tells runs of one model apart: the seed, and the layers its loss took (train.loss_layers)."""
    return ", ".join(filter(None, (f"seed {train.get('seed', '?')}", loss_words(train.get("loss_layers", 0)))))


def blocks_word(n: int) -> str:
    return f"{n} block{'s' if n != 1 else ''}"


def model_words(model) -> str:
    cfg = model.cfg
    return (f"{cfg.distribution}, {cfg.conditioning}, {blocks_word(cfg.main_layers)} per expert, "
            f"{expert_params(model.experts[0]).total / 1e6:.1f}M parameters per expert")


def plot(rows: list[dict], note: str):
    """One colour per setting (model and loss layers), one line style per training seed."""
    from matplotlib.lines import Line2D

    fig, ax = style.figure(style.COLUMN, 0.75)
    setting = lambda r: ", ".join(filter(None, (r["distribution"], blocks_word(r["blocks"]),  # noqa: E731
                                                 loss_words(r["loss_layers"]))))
    settings = list(dict.fromkeys(setting(r) for r in rows))
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    colors, styles = style.class_colors(len(settings)), ("-", "--", ":", "-.")
    labelled = set()
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        name = setting(mine[0])
        ax.plot([r["layer"] for r in mine], [r["gap"] for r in mine], marker="o", ms=2.5,
                color=colors[settings.index(name)], ls=styles[seeds.index(mine[0]["seed"]) % len(styles)],
                label=None if name in labelled else name)
        labelled.add(name)
    ax.axhline(0.0, color="0.4", lw=0.6, ls="--")
    ax.set_xticks(range(1, N_LAYERS + 1))
    ax.set_xlabel("RVQ layer")
    ax.set_ylabel("CE(other caption) - CE(own) (nats)")
    handles, labels = ax.get_legend_handles_labels()
    if len(seeds) > 1:  # the line styles' key
        handles += [Line2D([], [], color="0.3", ls=styles[i % len(styles)]) for i in range(len(seeds))]
        labels += [f"seed {s}" for s in seeds]
    ax.legend(handles, labels)
    style.note(fig, note)
    return fig


def run(cfg: CaptionRelianceConfig) -> list:
    import siren

    runs = as_list(cfg.run)
    if not runs or not cfg.data:
        raise ConfigError("run=<stage-1 run dir>[,<run dir>...] and data=<the prepared directory they trained "
                          "on> are required")
    folder = out_dir(cfg.out, "caption_reliance")
    device = resolve_device(cfg.device)
    ds = PreparedDataset(prepared.resolve(cfg.data), cfg.split, crop_s=None)
    where = index_path(ds.dir, cfg.split)
    clips = read_clips(ds)  # read once, scored 2 x len(runs) times
    own = list(range(len(ds)))
    other = other_clip(ds.labels, str(where))
    rows, summary = [], []
    for run_dir in runs:
        prepared.check_run_data(run_dir, ds, where)
        model = siren.load(run_dir, device)
        train = train_keys(run_dir)
        frames = round(cfg.seconds * FRAME_RATE) if cfg.seconds > 0 else train_frames(train)
        ce_own = layer_ce(model, clips, own, frames, cfg.batch_size, device)
        ce_other = layer_ce(model, clips, other, frames, cfg.batch_size, device)
        how = train_words(train)
        words, gap = f"{model_words(model)}; {how}", ce_other - ce_own
        weights = provenance(run_dir)["weights"]
        rows += [dict(run=run_dir, distribution=model.cfg.distribution, blocks=model.cfg.main_layers, model=words,
                      train=how, seed=train.get("seed"), loss_layers=train.get("loss_layers", 0),
                      layer=j + 1, ce_own=float(ce_own[j]), ce_other=float(ce_other[j]),
                      gap=float(gap[j]), frames=frames, split=cfg.split, clips=len(ds),
                      weights=weights) for j in range(N_LAYERS)]
        summary.append(f"  {words}: layer 1 CE {ce_own[0]:.3f} own caption, {ce_other[0]:.3f} another's "
                       f"({gap[0]:+.3f}); mean over layers {gap.mean():+.3f}  ({run_dir})")
    written = [write_csv(folder / "reliance.csv", rows)]
    written += style.save_figure(plot(rows, weights_note(runs[0])), folder, "caption_reliance")
    print(f"CE with another clip's caption minus with the clip's own, {len(ds)} {cfg.split} clips of {cfg.data}:")
    print("\n".join(summary))
    return written


if __name__ == "__main__":
    command("caption_reliance", CaptionRelianceConfig, run, __doc__)
