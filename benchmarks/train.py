"""Stage-1 training throughput: one Siren expert (6-2) vs the single 1-12 model of equal total size.

    python -m benchmarks.train                          # CPU table; GPU rows too when CUDA is present
    python -m benchmarks.train batch_size=8 steps=5 scale=small
    python -m benchmarks.train gpu_scale=isolated-3.1b gpu_batch_size=24 peak_tflops=989

Each row times ``siren.train.train_step`` (forward, Eq. 6 loss, backward, clipping, AdamW) on
random codes and text states of the agreed batch format (all frames real); the rows' steps are
interleaved and CPU time is shown next to wall time, so a shared machine skews them alike. The single model is
parameter-matched to Siren's K = 6 experts together, by backbone depth at the same width
(as the paper's Table 3 baselines). Frames/s counts time steps t (one frame = 12 codes).

On CUDA: one ``isolated-1.6b`` expert in bf16 autocast, with model FLOPs utilisation
MFU = model FLOPs of a step / time / peak. The model FLOPs are counted, not estimated: torch's
``FlopCounterMode`` over the warm-up step (forward and backward: every matmul, convolution and attention as
executed, the residual decoder's m+1 positions per frame, the text keys and values on the text tokens, the
embedding projections once per step; attention as a full T x T product, PaLM's convention, though the causal
mask halves what a kernel needs). The 6ND rule (6 x parameters x frames) it replaces was 11.7% low for this
expert at 16 x 500 frames (9% with attention counted causal) and up to 3x high for small presets, whose
parameters are mostly the 12 x d x 1024 embedding tables.
Peak bf16 dense FLOP/s comes from ``peak_tflops=``, else $SIREN_PEAK_TFLOPS, else the table below by GPU name.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass

import torch

from siren import cli
from siren.codec import CODEBOOK_SIZE, FRAME_RATE, N_LAYERS
from siren.config import check_numbers, load_config
from siren.loss_stats import Stats
from siren.model import Expert, ModelConfig, presets
from siren.model.params import expert_params, model_params
from siren.train import LossOf, TrainConfig, optimizer, train_step

# bf16 dense tensor-core peaks (vendor datasheets; where a sheet gives the 2:4-sparsity figure only, half of it),
# matched in order against torch's device name: the NVL and PCIe cards before the SXM ones whose names they contain.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H200 NVL", 835.5), ("H100", 989.4),
                    ("H200", 989.4), ("A100", 312.0), ("L40S", 362.0), ("L20", 119.5)]


@dataclass
class BenchConfig:
    scale: str = "small"  # CPU comparison: the 6-2 expert at this preset, the 1-12 model matched to 6 of them
    batch_size: int = 2
    crop_s: float = 3.0  # frames per clip = crop_s * 50 (training uses 6 s crops, appendix B; CPU-sized here)
    text_tokens: int = 16
    steps: int = 3  # timed steps per row (interleaved), after one untimed warm-up step
    threads: int = 0  # torch CPU threads; 0 = torch's default
    gpu_scale: str = "isolated-1.6b"
    gpu_batch_size: int = 24  # appendix B: 24 clips per GPU
    gpu_steps: int = 10
    gpu_crop_s: float = 6.0
    peak_tflops: float = 0.0  # 0: $SIREN_PEAK_TFLOPS, else by GPU name

    def __post_init__(self):
        check_numbers(self, positive=("batch_size", "crop_s", "text_tokens", "steps", "gpu_batch_size", "gpu_steps",
                                      "gpu_crop_s"), nonneg=("threads", "peak_tflops"))


def random_batch(batch_size: int, frames: int, text_tokens: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"codes": torch.randint(0, CODEBOOK_SIZE, (batch_size, N_LAYERS, frames), generator=g).to(device),
            "frame_mask": torch.ones(batch_size, frames, dtype=torch.bool, device=device),
            "text": torch.randn(batch_size, text_tokens, 768, generator=g).to(device),
            "text_mask": torch.ones(batch_size, text_tokens, dtype=torch.bool, device=device),
            "ids": [str(i) for i in range(batch_size)], "captions": [""] * batch_size}


def matched_single(expert_cfg: ModelConfig) -> ModelConfig:
    """The 1-12 config whose total parameters come closest to K experts of ``expert_cfg`` (by depth)."""
    target = sum(p.total for p in model_params(expert_cfg))
    single = lambda n: dataclasses.replace(expert_cfg, distribution="1-12", main_layers=n)  # noqa: E731
    one, two = (model_params(single(n))[0].total for n in (1, 2))  # linear in depth: one + (n - 1) * per layer
    return single(max(1, 1 + round((target - one) / (two - one))))


def peak_flops(cfg: BenchConfig, device: torch.device) -> tuple[float | None, str]:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12, "peak_tflops="
    if os.environ.get("SIREN_PEAK_TFLOPS"):
        return float(os.environ["SIREN_PEAK_TFLOPS"]) * 1e12, "$SIREN_PEAK_TFLOPS"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"table ({key})"
    return None, f"unknown GPU '{name}': set peak_tflops= or $SIREN_PEAK_TFLOPS"


@dataclass
class Row:
    name: str
    params: int
    frames: int  # per step
    seconds: float  # median wall time of a step
    cpu_seconds: float  # median CPU time of this process per step (all threads; robust to other load)
    memory_gb: float | None = None
    flops: int = 0  # model FLOPs of one step, counted (module docstring)

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds


def time_steps(configs: dict[str, ModelConfig], batch: dict, steps: int, tc: TrainConfig,
               device: torch.device) -> list[Row]:
    """Median step times of each config's expert 0, steps interleaved round-robin so that a busy
    shared machine slows every row alike; one untimed warm-up step each (allocation, kernel choice), whose
    FLOPs are counted."""
    from torch.utils.flop_counter import FlopCounterMode

    runs, flops = {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        expert = Expert(cfg, 0).to(device)
        opt = optimizer(expert, tc, device)
        runs[name] = (expert, LossOf(expert), opt, [], [])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)  # this GPU's queue
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for name, (expert, net, opt, wall, cpu) in runs.items():
        with FlopCounterMode(display=False) as counter:
            train_step(net, opt, [batch], tc, device, Stats())
        flops[name] = counter.get_total_flops()
    for _ in range(steps):
        for expert, net, opt, wall, cpu in runs.values():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(net, opt, [batch], tc, device, Stats())
            sync()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return [Row(name, expert_params(expert).total, batch["frame_mask"].numel(), statistics.median(wall),
                statistics.median(cpu), mem, flops[name]) for name, (expert, _, _, wall, cpu) in runs.items()]


def scale_config(name: str, distribution: str | None = None) -> ModelConfig:
    args = [f"scale={name}"] + ([f"distribution={distribution}"] if distribution else [])
    return load_config(ModelConfig, args, presets())


def cpu_table(cfg: BenchConfig) -> str:
    device = torch.device("cpu")
    frames = round(cfg.crop_s * FRAME_RATE)
    batch = random_batch(cfg.batch_size, frames, cfg.text_tokens, device)
    tc = TrainConfig(precision="fp32")
    siren = scale_config(cfg.scale, "6-2")
    single = matched_single(siren)
    rows = time_steps({f"6-2 expert ({cfg.scale}, {siren.main_layers} main)": siren,
                       f"1-12 single ({single.main_layers} main)": single}, batch, cfg.steps, tc, device)
    siren_total = sum(p.total for p in model_params(siren))
    lines = [f"CPU, {torch.get_num_threads()} threads, fp32; batch {cfg.batch_size} x {frames} frames "
             f"({cfg.crop_s:g} s), {cfg.text_tokens} text tokens; median of {cfg.steps} steps",
             f"Siren 6-2 total {siren_total / 1e6:.1f}M params; 1-12 single {rows[1].params / 1e6:.1f}M "
             f"(matched by depth at dim={siren.dim})", _table(rows)]
    ratio = rows[1].cpu_seconds / rows[0].cpu_seconds
    lines.append(f"by CPU time, one 6-2 expert step costs 1/{ratio:.2f} of a 1-12 step; all 6 experts over the same "
                 f"data cost {6 / ratio:.2f}x the single model's compute (as 6 independent jobs)")
    return "\n".join(lines)


def gpu_table(cfg: BenchConfig) -> str:
    device = torch.device("cuda")
    frames = round(cfg.gpu_crop_s * FRAME_RATE)
    batch = random_batch(cfg.gpu_batch_size, frames, cfg.text_tokens, device)
    tc = TrainConfig(precision="bf16")
    expert_cfg = scale_config(cfg.gpu_scale)
    row, = time_steps({f"{expert_cfg.distribution} expert ({cfg.gpu_scale})": expert_cfg}, batch, cfg.gpu_steps, tc,
                      device)
    peak, source = peak_flops(cfg, device)
    mfu = f"{row.flops_per_s / peak:.1%} of {peak / 1e12:.0f} TFLOP/s ({source})" if peak else f"n/a: {source}"
    return "\n".join([f"{torch.cuda.get_device_name(device)}, bf16 autocast, fused AdamW; batch "
                      f"{cfg.gpu_batch_size} x {frames} frames; median of {cfg.gpu_steps} steps",
                      _table([row]),
                      f"model FLOPs {row.flops / 1e12:.2f} T per step (counted): {row.flops_per_s / 1e12:.1f} "
                      f"TFLOP/s; MFU {mfu}"])


def _table(rows: list[Row]) -> str:
    head = f"| {'model':<34} | {'params':>9} | {'s/step':>8} | {'cpu s/step':>10} | {'frames/s':>9} |" + \
           (f" {'peak mem':>9} |" if rows[0].memory_gb is not None else "")
    out = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        out.append(f"| {r.name:<34} | {r.params / 1e6:>8.1f}M | {r.seconds:>8.3f} | {r.cpu_seconds:>10.3f} | "
                   f"{r.frames_per_s:>9.0f} |" + (f" {r.memory_gb:>7.1f}GB |" if r.memory_gb is not None else ""))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(BenchConfig, cli.start(argv))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(cpu_table(cfg), flush=True)
    if torch.cuda.is_available():
        print()
        print(gpu_table(cfg))
    else:
        print("\n(no CUDA device: the isolated-1.6b bf16 / MFU row needs a GPU)")


if __name__ == "__main__":
    cli.run(main, BenchConfig, __doc__)
