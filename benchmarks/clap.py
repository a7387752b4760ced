"""LAION-CLAP on this machine: build, text embedding and audio embedding times (siren.clap).

    python -m benchmarks.clap [--weights random] [--clips 4]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from siren.clap import Clap, ClapConfig


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.clap [--weights random] [--clips 4]``: time build, text and audio embedding."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.clap", description="time LAION-CLAP on this machine")
    ap.add_argument("--weights", default="random", help="pretrained | demo | random | path (default: random)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--captions", type=int, default=16)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

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
    print(f"LAION-CLAP {clap.id} on {clap.device}, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats} (CPU s = process CPU time: compare it on a shared machine)")
    print(f"| {'what':46s} | wall s | CPU s |\n|{'-' * 48}|--------|-------|")
    for what, (w, c) in rows:
        print(f"| {what:46s} | {w:6.3f} | {c:5.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
