"""Shared inputs for the analysis tests: a small prepared demo set (real random-weight DAC and
text encoder) and tiny stage-1 runs trained by the real trainer on it."""
from __future__ import annotations

from pathlib import Path

from siren.data.audio import AudioConfig

CLIP_S = 0.2  # demo clips cut to their first 0.2 s (10 frames): the random full-size DAC encodes ~1 s of audio per s


def prepare_demo(root: Path, n_train: int = 2, n_test: int = 1) -> Path:
    """The embedded demo set (all 15 classes, ``n_train`` + ``n_test`` clips each), prepared
    with the random-weight DAC and text encoder (asked for explicitly)."""
    from analysis.prepared import build_codec
    from siren.data.demo import make_demo
    from siren.data.prepare import prepare
    from siren.text import TextConfig, TextEncoder

    train = make_demo(root / "source", seed=0, n_train=n_train, n_test=n_test)
    codec, text = build_codec("random"), TextEncoder(TextConfig(weights="random"))
    for manifest, split in ((train, "train"), (train.with_name("test.csv"), "test")):
        prepare(manifest, root / "prepared", codec=codec, text_encoder=text, split=split,
                audio=AudioConfig("crop", CLIP_S), progress=False)
    return root / "prepared"


def tiny_run(run_dir: Path, prepared: Path, distribution: str, steps: int = 3) -> Path:
    """Every expert of a ``distribution`` model, CPU-second sized, trained by siren.train on ``prepared``.

    The trainer keeps no copy of an expert's initial weights; the real Expert it builds is
    recorded as it is made (expert_<k>/init.safetensors) so task vectors can be taken."""
    from unittest import mock

    from siren import train as trainer
    from siren.io import save_tensors

    args = [f"run_dir={run_dir}", f"data_dir={prepared}", "scale=tiny", f"model.distribution={distribution}",
            "model.dim=32", "model.attn_heads=2", "model.main_layers=2", "codec.weights=random",
            "train.batch_size=4", f"train.steps={steps}", "train.warmup_steps=1", "train.lr=3e-3",
            "train.log_every=1", "train.val_every=0", f"train.ckpt_every={steps}", "train.num_workers=0",
            "train.device=cpu", "train.precision=fp32", "train.crop_s=0"]
    cfg = trainer.parse(args)
    data = trainer.Stage1Data.from_prepared(cfg.data_dir, None, cfg.train.seed, cfg.codec)  # one codec build

    def recorded(cfg, k, tables=None):
        expert = Expert(cfg, k, tables)
        save_tensors(Path(run_dir) / f"expert_{k}" / "init.safetensors", expert.state_dict())
        return expert

    Expert = trainer.Expert
    with mock.patch.object(trainer, "Expert", recorded):
        for k in range(trainer.parse(args).model.n_experts):
            trainer.train(trainer.parse([*args, f"expert={k}"]), data, handle_signals=False)
    return run_dir

