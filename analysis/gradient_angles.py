"""Influence 1 (section 3, Fig. 2b): the 12 heads of one transformer pull its backbone apart.

A single transformer (distribution 1-12: one backbone, 12 classifier heads, AudioGen-style)
is run teacher-forced on real batches; each head's cross-entropy (Eq. 6 term of layer j,
frame-masked mean) is back-propagated alone to the weight matrix of the backbone's last
layer. Appendix D.1: that gradient [out, in] is averaged over the output dimension, leaving
one vector over the input neurons per head; the angle between two heads' vectors is
arccos(cos) in degrees (90 = orthogonal). Every batch gives the 66 pairwise angles; the
figure shows their distribution over batches and the 12 x 12 mean. Beside it a baseline the paper does not draw:
the angles between two heads' gradients taken on two different batches (``baseline.csv``, the grey outline), what
"about 90 degrees" is worth for gradients that share no batch (high-dimensional vectors are near-orthogonal too).

Model: ``run=`` a stage-1 run of a 1-12 model (its latest checkpoint), or, without ``run``,
a fresh one of ``scale`` (default AudioGen's parallel heads, conditioning=none) trained for
``train_steps`` with siren.train on ``data`` (0 = probe at initialisation). Batches come
from ``data`` (a prepared directory with text states; ``demo`` prepares the demo set with the demo
text encoder); with ``run=`` they must be the run's codec and text encoder, which is checked.

    python -m analysis.gradient_angles data=demo train_steps=20
    python -m analysis.gradient_angles run=outputs/demo/stage1/<1-12 id> data=demo
    python -m analysis.gradient_angles run=runs/single-1-12 data=data/audiocaps_prepared device=cuda
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from analysis import prepared, style
from analysis.cli import command, out_dir, write_csv
from analysis.logs import weights_phrase
from siren.codec import weights_arg
from siren.config import check_numbers
from siren.data import PreparedDataset
from siren.data.cache import index_path
from siren.errors import CheckpointError, ConfigError, DataError
from siren.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass
class GradientAnglesConfig:
    run: str = ""  # stage-1 run dir of a 1-12 model; empty: a fresh model trained here
    data: str = "demo"  # prepared directory (codes + text states) | demo
    split: str = "train"  # batches from this split
    codec: str = ""  # data=demo / fresh model: codec weights (empty: as prepared)
    scale: str = "tiny"  # fresh model: siren.model scale preset
    conditioning: str = "none"  # fresh model: none (AudioGen parallel heads) | residual | accumulated
    train_steps: int = 20  # fresh model: stage-1 steps before probing (0 = at initialisation)
    param: str = "backbone.blocks.-1.mlp.down.weight"  # last backbone layer's weight matrix ([-1] = last block)
    batches: int = 8  # batches probed (each gives 66 angles)
    batch_size: int = 8
    crop_s: float = 0.0  # > 0: random crops of this many seconds (appendix B: 6); 0 = whole items
    device: str = "auto"
    seed: int = 0
    out: str = ""

    def __post_init__(self):
        check_numbers(self, positive=("batches", "batch_size"), nonneg=("train_steps", "crop_s"))


def reduce_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Appendix D.1: a weight gradient [out, in] averaged over the output dimension -> [in]."""
    return grad.reshape(grad.shape[0], -1).mean(0) if grad.dim() > 1 else grad


def angle_matrix(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """[H, n] -> [H, H] pairwise angles in degrees, arccos of the cosine (clipped to [-1, 1]). A zero vector has
    no direction: its angles are NaN (a cosine of 0 would read as 90 degrees, "orthogonal")."""
    v = torch.as_tensor(vectors, dtype=torch.float64)
    norm = v.norm(dim=1, keepdim=True)
    unit = v / norm.clamp_min(1e-300)
    angles = torch.rad2deg(torch.arccos((unit @ unit.T).clamp(-1.0, 1.0)))
    zero = norm[:, 0] == 0
    angles[zero], angles[:, zero] = float("nan"), float("nan")
    return angles.numpy()


def head_losses(expert, batch: dict) -> list[torch.Tensor]:
    """Per owned layer the frame-masked mean CE (the terms of Eq. 6), each its own graph node, so
    one head's backward never touches the other heads' softmax."""
    codes, mask = batch["codes"], batch["frame_mask"].bool()
    logits = expert(codes, batch["text"], batch["text_mask"]).float()  # [B, m, T, V]
    target = codes[:, expert.layers.start: expert.layers.stop].long()
    w = mask.to(logits.dtype)
    return [(F.cross_entropy(logits[:, i].reshape(-1, logits.shape[-1]), target[:, i].reshape(-1), reduction="none")
             * w.reshape(-1)).sum() / w.sum() for i in range(logits.shape[1])]


def head_gradients(expert, batch: dict, weight: torch.Tensor) -> torch.Tensor:
    """[m, in]: each head's loss alone, back-propagated to ``weight`` and reduced (appendix D.1)."""
    losses = head_losses(expert, batch)
    rows = [reduce_gradient(torch.autograd.grad(l, weight, retain_graph=i < len(losses) - 1)[0])
            for i, l in enumerate(losses)]
    return torch.stack(rows).double().cpu()


def resolve_param(expert, name: str) -> tuple[str, torch.Tensor]:
    """A parameter by state-dict name; a negative block index counts from the end."""
    params = dict(expert.named_parameters())
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.lstrip("-").isdigit() and int(p) < 0:
            where = ".".join(parts[:i])
            try:
                n_blocks = len(expert.get_submodule(where))
            except (AttributeError, TypeError):  # no such module, or not a list of blocks
                raise ConfigError(f"param={name}: '{where}' is not a list of blocks in the expert") from None
            if n_blocks + int(p) < 0:
                raise ConfigError(f"param={name}: index {p} is out of range, '{where}' has {n_blocks} blocks")
            parts[i] = str(n_blocks + int(p))
    full = ".".join(parts)
    if full not in params:
        close = [k for k in params if k.endswith(parts[-1])][:6]
        raise ConfigError(f"param={name}: no parameter '{full}' in the expert; e.g. {close}")
    return full, params[full]


def fresh_run(cfg: GradientAnglesConfig, data: Path, folder: Path) -> Path:
    """A 1-12 model of ``cfg.scale`` trained ``cfg.train_steps`` steps by siren.train into ``folder``."""
    from siren import train

    codec = cfg.codec or weights_arg(PreparedDataset(data, cfg.split, crop_s=None).info["codec"]["weights"])
    run_dir = folder / f"run-1-12-{cfg.scale}-{cfg.conditioning}-{cfg.train_steps}steps-seed{cfg.seed}"
    args = [f"run_dir={run_dir}", f"data_dir={data}", f"scale={cfg.scale}", "model.distribution=1-12",
            f"model.conditioning={cfg.conditioning}", f"codec.weights={codec}", f"train.steps={cfg.train_steps}",
            f"train.batch_size={cfg.batch_size}", f"train.warmup_steps={max(1, cfg.train_steps // 10)}",
            f"train.log_every={max(1, cfg.train_steps // 20)}", f"train.ckpt_every={cfg.train_steps}",
            "train.val_every=0", f"train.crop_s={cfg.crop_s}", f"train.seed={cfg.seed}", "train.num_workers=0",
            f"train.device={cfg.device}"]
    cfg_train, earlier = train.parse(args), (run_dir / "expert_0" / "latest").is_file()
    try:
        train.train(cfg_train, handle_signals=False)
    except (CheckpointError, ConfigError) as e:  # its fix names siren.train's keys; this probe's are data= and out=
        if not earlier:
            raise
        raise ConfigError(f"{e}\nHere: {run_dir} is this probe's fresh run from an earlier call, which this call "
                          f"cannot go on with (above: why); give another out=, or delete that folder") from None
    return run_dir


def load_expert(cfg: GradientAnglesConfig, data: Path, folder: Path, device: torch.device):
    import dataclasses

    from siren.config import load_config
    from siren.model import Expert, ModelConfig, presets

    if cfg.run or cfg.train_steps > 0:
        import siren

        run_dir = cfg.run or fresh_run(cfg, data, folder)
        model = siren.load(run_dir, device, allow_unfinished=True)
        if model.cfg.n_experts != 1:
            raise ConfigError(f"{cfg.run}: distribution {model.cfg.distribution}; gradient angles need a single "
                              f"transformer (1-12) whose 12 heads share one backbone")
        if model.cfg.conditioning != "none":
            log.warning("%s: conditioning=%s; the paper's Fig. 2b is of AudioGen, whose 12 heads read only the "
                        "backbone (a 1-12 run with model.conditioning=none, e.g. Table 5's Indpdt. cell)",
                        cfg.run or "the fresh run", model.cfg.conditioning)
        from siren import checkpoint as ckpt

        step = ckpt.load_latest(ckpt.expert_dir(run_dir, 0)).step  # a 20-step probe must not read as trained
        return model.experts[0], f"{model.cfg.distribution}, {model.cfg.conditioning}, {step} training steps"
    mcfg = load_config(ModelConfig, [f"scale={cfg.scale}", "distribution=1-12", f"conditioning={cfg.conditioning}"],
                       presets())
    codec = prepared.open_codec(data, [cfg.split], cfg.codec)
    torch.manual_seed(cfg.seed)
    expert = Expert(dataclasses.replace(mcfg, codec=codec.id), 0, codec.code_tables()).to(device)
    return expert, f"1-12, {cfg.conditioning}, at initialisation"


def plot_distribution(angles: np.ndarray, note: str, baseline: np.ndarray | None = None):
    fig, ax = style.figure(style.COLUMN, 0.6)
    bins = np.linspace(0, 180, 37)
    ax.hist(angles, bins=bins, color=style.layer_colors(3)[1], alpha=0.85, label="same batch")
    if baseline is not None and len(baseline):
        ax.hist(baseline, bins=bins, histtype="step", color="0.3", lw=0.8, weights=np.full(len(baseline),
                len(angles) / len(baseline)), label="two batches (baseline, scaled)")
        ax.legend(loc="upper left", fontsize="small")
    ax.axvline(90.0, color="0.4", lw=0.6, ls="--")
    ax.set_xlim(0, 180)
    ax.set_xticks(range(0, 181, 30))
    ax.set_xlabel("Angle between heads' gradients (degrees)")
    ax.set_ylabel("Count")
    style.note(fig, note)
    return fig


def plot_matrix(mean: np.ndarray, note: str):
    H = mean.shape[0]
    fig, ax = style.figure(style.COLUMN, 0.85)
    im = ax.imshow(mean, cmap=style.DIVERGING, vmin=0, vmax=180)
    ax.set_xticks(range(H), range(1, H + 1))
    ax.set_yticks(range(H), range(1, H + 1))
    ax.set_xlabel("Head (RVQ layer)")
    ax.set_ylabel("Head (RVQ layer)")
    ax.set_title("Mean gradient angle (degrees)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    style.note(fig, note)
    return fig


def run(cfg: GradientAnglesConfig) -> list:
    from siren.data import make_loader

    folder = out_dir(cfg.out, "gradient_angles")
    device = resolve_device(cfg.device)
    codec = cfg.codec
    if cfg.run:  # the run's model reads codes of one codec: probe it with data of that codec
        from siren.run_dir import read_run_config

        codec = codec or weights_arg(read_run_config(cfg.run)["codec"]["weights"])  # the label -> the key
    data = prepared.resolve(cfg.data, codec)
    if cfg.run:  # its codec and text encoder made the split's codes and text states, or the angles mean nothing
        prepared.check_run_data(cfg.run, PreparedDataset(data, cfg.split, crop_s=None), index_path(data, cfg.split))
    expert, what = load_expert(cfg, data, folder, device)
    name, weight = resolve_param(expert, cfg.param)
    loader = make_loader(data, cfg.split, cfg.batch_size, crop_s=cfg.crop_s or None, shuffle=True, seed=cfg.seed,
                         pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise DataError(f"{data}: split '{cfg.split}' has no items")
    mats, rows, grads = [], [], []
    H = len(expert.layers)
    b = 0
    while b < cfg.batches:
        for batch in loader:
            if b >= cfg.batches:
                break
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            grads.append(head_gradients(expert, batch, weight))
            mats.append(angle_matrix(grads[-1]))
            rows += [dict(batch=b, head_a=i + 1, head_b=j + 1, angle_deg=float(mats[-1][i, j]))
                     for i in range(H) for j in range(i + 1, H)]
            b += 1
    # baseline: head i's gradient on batch b against head j's on batch b + 1 (i != j), no batch in common
    pairs = [(b, (b + 1) % len(grads)) for b in range(len(grads) if len(grads) > 1 else 0)]
    cross = [angle_matrix(torch.cat([grads[a], grads[c]]))[:H, H:] for a, c in pairs]  # [H, H]: a's heads vs c's
    base = [dict(batch_a=a, batch_b=c, head_a=i + 1, head_b=j + 1, angle_deg=float(m[i, j]))
            for (a, c), m in zip(pairs, cross) for i in range(H) for j in range(H) if i != j]
    base_angles = np.array([r["angle_deg"] for r in base])
    base_angles = base_angles[~np.isnan(base_angles)]
    angles = np.array([r["angle_deg"] for r in rows])
    if np.isnan(angles).any():  # a head whose loss did not reach the parameter, or was exactly 0
        log.warning("%d of %d angles are NaN (a head's gradient on %s was zero); the CSVs keep them, the summary "
                    "and the figures leave them out", np.isnan(angles).sum(), angles.size, name)
        if np.isnan(angles).all():
            raise DataError(f"every head's gradient on {name} was zero: no angle to measure; probe another param=")
        angles = angles[~np.isnan(angles)]
    with warnings.catch_warnings():  # a head zero in every batch: its row of the mean is NaN, shown blank
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(mats, 0)
    info = PreparedDataset(data, cfg.split, crop_s=None).info
    weights = {"codec": info["codec"]["weights"], "text": info["text"]["weights"]}
    note = "; ".join([f"model {what}", *(p for k, v in weights.items() if (p := weights_phrase(k, v)))])
    prov = dict(model=what, param=name, codec_weights=weights["codec"], text_weights=weights["text"])
    written = [write_csv(folder / "angles.csv", [dict(**r, **prov) for r in rows]),
               write_csv(folder / "baseline.csv", [dict(**r, **prov) for r in base],
                         columns=["batch_a", "batch_b", "head_a", "head_b", "angle_deg", *prov]),
               write_csv(folder / "matrix.csv", [dict(head_a=i + 1, head_b=j + 1, mean_angle_deg=float(mean[i, j]),
                                                      **prov) for i in range(H) for j in range(H)])]
    written += style.save_figure(plot_distribution(angles, note, base_angles), folder, "fig2b_gradient_angles")
    written += style.save_figure(plot_matrix(mean, note), folder, "matrix")
    q = np.quantile(angles, [0.25, 0.5, 0.75])
    print(f"{what}; gradients of {H} heads on {name} ({weight.shape[1] if weight.dim() > 1 else 1} input neurons), "
          f"{len(mats)} batches: angle median {q[1]:.1f} deg (IQR {q[0]:.1f}-{q[2]:.1f}), mean {angles.mean():.1f}"
          + (f"; two heads on two different batches (baseline): median {np.median(base_angles):.1f} deg"
             if len(base_angles) else ""))
    return written


if __name__ == "__main__":
    command("gradient_angles", GradientAnglesConfig, run, __doc__)
