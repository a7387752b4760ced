"""Benchmark: KV-cached sampling vs recomputing the whole prefix every step (Algorithm 2).

    python -m benchmarks.sample                       # small preset, 6-2, T = 500, batch 1 and 8, CPU
    python -m benchmarks.sample frames=200 batches=4 full=true model.distribution=4-3

It starts from ``scale=small model.distribution=6-2`` (the model keys listed by ``--help`` are the bare
defaults those replace); any key given on the command line wins.

At batch 1 a cached step is a chain of matrix-vector products that reads every weight from
memory, and a recomputed step is a matrix product over the prefix; the speed-up is therefore
about (T/2) x (time of one token in a matrix product) / (time of a matrix-vector product),
which depends on the machine's memory bandwidth against its FLOPS. With a batch the cached
step still reads the weights once while recomputation grows with the batch.

The cached sampler runs all T steps. Without the cache a step's cost grows with the prefix,
and all T steps take minutes on a laptop CPU, so by default the uncached sampler runs the first
``check_steps`` steps in full (codes compared with the cached run) and ``probes`` later
steps spread up to T-1, each from the cached run's prefix and random-generator state (its
sampled codes are compared too); the per-step times in between are interpolated linearly
in t and summed. ``full=true`` runs every step uncached instead. Random weights (timing only).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from siren.codec import N_LAYERS
from siren.config import ConfigError, check_numbers, load_config
from siren.model import CollaborativeModel, ModelConfig, presets
from siren.sample import SampleConfig, sample_step, start


@dataclass
class BenchConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    frames: int = 500
    batches: str = "1,8"  # comma-separated batch sizes, one table row pair each
    text_tokens: int = 16
    seed: int = 0
    threads: int = 1  # torch intra-op threads (1: stable timings on a shared machine)
    check_steps: int = 30  # leading steps sampled without cache, codes compared with the cached run
    probes: int = 5  # later steps timed without cache, spread up to frames-1 (>= 2: the first and the last)
    full: bool = False  # run every step without cache instead of interpolating

    def __post_init__(self):
        check_numbers(self, positive=("frames", "text_tokens", "threads", "probes"), nonneg=("check_steps",))
        if self.probes < 2:  # one probe (at check_steps) held every later step at that early, cheaper cost
            raise ConfigError(f"probes={self.probes}: at least 2, so the interpolation reaches the last step")
        try:
            sizes = self.batch_sizes
        except ValueError:
            raise ConfigError(f"batches must be comma-separated integers, got '{self.batches}'") from None
        if min(sizes) < 1:
            raise ConfigError(f"batches={self.batches}: every batch size must be >= 1")

    @property
    def batch_sizes(self) -> list[int]:
        return [int(b) for b in self.batches.split(",")]


def build(cfg: BenchConfig) -> CollaborativeModel:
    from siren.codec import Codec, CodecConfig
    codec = Codec(CodecConfig(weights="random", seed=cfg.seed))  # explicit: timing does not need trained weights
    torch.manual_seed(cfg.seed)
    return CollaborativeModel.from_codec(cfg.model, codec).eval()


@torch.no_grad()
def run(cfg: BenchConfig, model: CollaborativeModel, batch: int) -> dict:
    g = torch.Generator().manual_seed(cfg.seed)
    text = torch.randn(batch, cfg.text_tokens, 768, generator=g)
    mask = torch.ones(batch, cfg.text_tokens, dtype=torch.bool)
    T, sample_cfg = cfg.frames, SampleConfig()
    probe_at = [] if cfg.full else sorted({int(t) for t in np.linspace(cfg.check_steps, T - 1, cfg.probes)})

    # cached: every step, keeping the generator state at the probe steps
    gen = torch.Generator().manual_seed(cfg.seed)
    codes = torch.zeros(batch, N_LAYERS, T, dtype=torch.long)
    states_at, t0 = {}, clock()
    run_state = start(model, text, mask, cached=True)
    for t in range(T):
        if t in probe_at:
            states_at[t] = gen.get_state()
        sample_step(model, run_state, codes, sample_cfg, gen)
    cached = clock() - t0

    # uncached: the leading steps (or all) from scratch, same seed
    n_lead = T if cfg.full else min(cfg.check_steps, T)
    gen = torch.Generator().manual_seed(cfg.seed)
    ref = torch.zeros_like(codes)
    run_state, times = start(model, text, mask, cached=False), {}
    for t in range(n_lead):
        t1 = clock()
        sample_step(model, run_state, ref, sample_cfg, gen)
        times[t] = clock() - t1
    same = torch.equal(ref[:, :, :n_lead], codes[:, :, :n_lead])

    # uncached probes: step t from the cached prefix and generator state
    for t in probe_at:
        gen.set_state(states_at[t])
        probe = codes.clone()
        probe[:, :, t:] = 0
        run_state = start(model, text, mask, cached=False)
        for s in run_state:
            s.t = t
        t1 = clock()
        sample_step(model, run_state, probe, sample_cfg, gen)
        times[t] = clock() - t1
        same &= torch.equal(probe[:, :, t], codes[:, :, t])

    ts = np.array(sorted(times))
    uncached = np.array([np.interp(np.arange(T), ts, np.array([times[t][c] for t in ts])).sum() for c in (0, 1)])
    return dict(cached_s=cached, uncached_s=uncached, measured_uncached_steps=len(times),
                probe_ms={int(t): 1e3 * times[t] for t in probe_at}, same_codes=bool(same),
                speedup=uncached / cached, frames=T, batch=batch)


def clock() -> np.ndarray:
    """(wall, process CPU) seconds; CPU time is what a busy shared machine distorts least."""
    return np.array([time.perf_counter(), time.process_time()])


def header(cfg: BenchConfig) -> str:
    m = cfg.model
    return (f"sampling benchmark (random weights, timing only): distribution={m.distribution} "
            f"conditioning={m.conditioning} dim={m.dim} main_layers={m.main_layers} "
            f"decoder_layers={m.decoder_layers} T={cfg.frames} threads={cfg.threads} device=cpu "
            f"torch={torch.__version__}")


def report(r: dict) -> str:
    T = r["frames"]
    how = "all steps" if r["measured_uncached_steps"] == T else \
        f"{r['measured_uncached_steps']} steps measured, rest interpolated in t"
    lines = [f"batch {r['batch']}:",
             f"  {'sampler':<18}{'wall ms/step':>14}{'cpu ms/step':>13}{'wall total s':>14}{'cpu total s':>13}  timing",
             *(f"  {name:<18}{1e3 * v[0] / T:>14.2f}{1e3 * v[1] / T:>13.2f}{v[0]:>14.2f}{v[1]:>13.2f}  {timing}"
               for name, v, timing in (("KV cache", r["cached_s"], "all steps"),
                                       ("recompute prefix", r["uncached_s"], how)))]
    if r["probe_ms"]:
        lines.append("  uncached probe steps, wall/cpu ms: " +
                     ", ".join(f"t={t}: {v[0]:.0f}/{v[1]:.0f}" for t, v in r["probe_ms"].items()))
    lines.append(f"  same codes (cached vs recomputed, same seed): {r['same_codes']}")
    ok = r["speedup"].min() >= 10
    lines.append(f"  speed-up: {r['speedup'][0]:.1f}x wall, {r['speedup'][1]:.1f}x cpu  "
                 f"(target >= 10x: {'met' if ok else 'NOT met'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    from siren import cli

    cfg = load_config(BenchConfig, cli.start(argv), presets("model."),
                      defaults=["scale=small", "model.distribution=6-2"])
    torch.set_num_threads(cfg.threads)
    model = build(cfg)
    print(header(cfg), flush=True)
    for batch in cfg.batch_sizes:
        r = run(cfg, model, batch)
        print(report(r), flush=True)
        if not r["same_codes"]:
            sys.exit("error: cached and recomputed sampling gave different codes")


if __name__ == "__main__":
    from siren import cli

    cli.run(main, BenchConfig, __doc__)
