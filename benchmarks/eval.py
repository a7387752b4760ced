"""Benchmark: PANNs embedding throughput (batched vs one file at a time) and cold vs cached evaluation.

    python -m benchmarks.eval [n=64] [seconds=4] [batch_size=16] [weights=random] [metrics=fad,fd,isc,kl,clap]

Clips are synthetic (seeded tones + noise, ``seconds`` long at 16 kHz), written as wav files to a
temporary folder. "One file at a time" is audioldm_eval's loop: read a file, subtract its mean,
pad to 2 s, run Cnn14 on a batch of one. "Batched" is this harness: threaded reading, clips of
equal length batched. Both produce the same numbers (the table shows the largest difference).
The second table runs ``eval/audiocaps.py``'s evaluation of n generated clips against n reference
clips with an empty embedding cache, then again with the cache it filled.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from eval.audio import load_clips
from eval.audiocaps import evaluate
from eval.backbones import PannsCnn14
from eval.cache import embed_clips
from eval.card import banner
from eval.config import EvalConfig, max_is_splits, metric_list
from siren import cli
from siren.assets import WEIGHTS_MODES
from siren.config import ConfigError, check_numbers, load_config


@dataclass
class BenchConfig:
    n: int = 64
    seconds: float = 4.0
    batch_size: int = 16
    weights: str = "random"
    metrics: str = "fad,fd,isc,kl,clap"
    seed: int = 0

    def __post_init__(self):  # named before the first table's minutes, not after them
        check_numbers(self, positive=("n", "seconds", "batch_size"))
        if self.n < 2:
            raise ConfigError(f"n={self.n}: the evaluation needs at least 2 clips a set")
        if self.weights not in WEIGHTS_MODES:
            raise ConfigError(f"weights must be pretrained, demo or random, got {self.weights!r}")
        metric_list(self)


def _write_clips(folder: Path, n: int, seconds: float, seed: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    out = {}
    for i in range(n):
        f = rng.uniform(100, 3000)
        wav = 0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size)
        out[f"clip{i:04d}"] = folder / f"clip{i:04d}.wav"
        sf.write(out[f"clip{i:04d}"], wav.astype(np.float32), 16000)
    return out


def one_at_a_time(panns: PannsCnn14, paths: list[Path]) -> dict[str, np.ndarray]:
    """audioldm_eval's loop: per file read, first channel, minus mean, pad to 2 s, batch of one."""
    emb, logits = [], []
    for p in paths:
        wav, sr = sf.read(str(p), dtype="float32", always_2d=True)
        x = torch.from_numpy(wav[:, 0].copy())
        x = x - x.mean()
        x = torch.nn.functional.pad(x, (0, max(0, PannsCnn14.MIN_SAMPLES - x.numel())))
        out = panns.forward(x[None])
        emb.append(out["embedding"][0].numpy())
        logits.append(out["logits"][0].numpy())
    return {"embedding": np.stack(emb), "logits": np.stack(logits)}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(BenchConfig, cli.start(argv))
    shown = banner(cfg.weights) if cfg.weights != "pretrained" else ""  # demo's words for demo, RANDOM's for random
    print(f"# eval.bench: {cfg.n} synthetic {cfg.seconds:g} s clips at 16 kHz, CPU threads {torch.get_num_threads()}, "
          f"weights={cfg.weights}" + (f"  ({shown}; the timings are the same)" if shown else ""))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = _write_clips(tmp / "gen", cfg.n, cfg.seconds, cfg.seed)
        panns = PannsCnn14(cfg.weights, cfg.seed)
        panns.forward(torch.zeros(1, PannsCnn14.MIN_SAMPLES))  # build + warm up outside the timings

        t0 = time.perf_counter()
        base = one_at_a_time(panns, list(gen.values()))
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        clips = load_clips(gen, what="generated")
        ours, _ = embed_clips(panns, clips, None, cfg.batch_size, "panns batched")
        t_batched = time.perf_counter() - t0
        diff = max(float(np.abs(np.stack([o[k] for o in ours]) - base[k]).max()) for k in ("embedding", "logits"))

        print("\n## PANNs Cnn14 embedding + logits, no cache\n")
        print(_row(["pipeline", "clips", "seconds", "clips/s", "speed-up"]))
        print(_row(["---"] * 5))
        print(_row(["one file at a time (audioldm_eval loop, batch 1)", str(cfg.n), f"{t_single:.1f}",
                    f"{cfg.n / t_single:.2f}", "1.00x"]))
        print(_row([f"batched (this harness, batch {cfg.batch_size})", str(cfg.n), f"{t_batched:.1f}",
                    f"{cfg.n / t_batched:.2f}", f"{t_single / t_batched:.2f}x"]))
        print(f"\nlargest |difference| between the two pipelines' outputs: {diff:.2e}")

        ref = _write_clips(tmp / "ref" / "audio", cfg.n, cfg.seconds, cfg.seed + 1)
        manifest = tmp / "ref" / "test.csv"
        manifest.write_text("id,audio,caption\n"
                            + "".join(f"{i},audio/{p.name},a tone number {i}\n" for i, p in ref.items()))
        ecfg = EvalConfig(gen_dir=str(tmp / "gen"), ref=str(manifest), out=str(tmp / "out"), weights=cfg.weights,
                          seed=cfg.seed, metrics=cfg.metrics, batch_size=cfg.batch_size, cache_dir=str(tmp / "cache"),
                          is_splits=min(10, max_is_splits(cfg.n)))  # 2 clips a split at least
        times, stats = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            r = evaluate(ecfg)
            times.append(time.perf_counter() - t0)
            stats.append(sum(s["computed"] for s in r["cache"].values()))
        print(f"\n## eval/audiocaps.py gen_dir= evaluation, {cfg.n} generated vs {cfg.n} reference clips, "
              f"metrics={cfg.metrics}\n")
        print(_row(["run", "seconds", "embeddings computed"]))
        print(_row(["---"] * 3))
        print(_row(["cold (empty cache, networks built)", f"{times[0]:.1f}", str(stats[0])]))
        print(_row(["cached re-evaluation", f"{times[1]:.2f}", str(stats[1])]))
        if shown:
            print(f"\n** {shown} ** (metric values not shown; timings only)")
    return 0


if __name__ == "__main__":
    cli.run(main, BenchConfig, __doc__)
