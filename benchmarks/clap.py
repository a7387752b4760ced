"""LAION-CLAP on this machine: build, text embedding and audio embedding times (siren.clap).

    python -m benchmarks.clap [weights=random] [clips=4]
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from siren import cli
from siren.clap import Clap, ClapConfig
from siren.config import check_numbers, load_config
from siren.demo_weights import mode_words


@dataclass
class ClapBenchConfig:
    weights: str = "random"  # pretrained | demo | random | a file path
    seed: int = 0
    captions: int = 16
    clips: int = 4
    repeats: int = 3  # the best of this many runs is reported

    def __post_init__(self):
        check_numbers(self, positive=("captions", "clips", "repeats"))


def main(argv: list[str] | None = None) -> int:
    """Time build, text and audio embedding."""
    args = load_config(ClapBenchConfig, cli.start(argv))

    def best(fn, n: int = 1) -> tuple[float, float]:  # (wall, process CPU) seconds per item, best run
        runs = []
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            runs.append(((time.perf_counter() - wall) / n, (time.process_time() - cpu) / n))
        return min(runs)

    wall, cpu = time.perf_counter(), time.process_time()
    clap = Clap(ClapConfig(weights=args.weights, seed=args.seed))
    build = (time.perf_counter() - wall, time.process_time() - cpu)
    g = torch.Generator().manual_seed(0)
    captions = [f"a dog barks {i} times while rain falls on a tin roof" for i in range(args.captions)]
    wav = 0.1 * torch.randn(args.clips, 10 * 16_000, generator=g)
    rows = [("build (incl. laion_clap import)", build),
            (f"text: embed {args.captions} captions (all)", best(lambda: clap.embed_text(captions))),
            ("audio: 10 s clip, batch 1 (per clip)", best(lambda: clap.embed_audio(wav[:1]))),
            (f"audio: 10 s clips, batch {args.clips} (per clip)", best(lambda: clap.embed_audio(wav), args.clips))]
    mode = mode_words(clap.weights_label) + " (timings only)" * (clap.weights_label == "random")
    print(f"LAION-CLAP {clap.id} ({mode}) on {clap.device}, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats} (CPU s = process CPU time: compare it on a shared machine)")
    print(f"| {'what':46s} | wall s | CPU s |\n|{'-' * 48}|--------|-------|")
    for what, (w, c) in rows:
        print(f"| {what:46s} | {w:6.3f} | {c:5.2f} |")
    return 0


if __name__ == "__main__":
    cli.run(main, ClapBenchConfig, __doc__)
