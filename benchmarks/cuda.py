"""One GPU run: stage-1 train step + MFU, KV-cached generation + decoding, evaluation backbones.

    python -m benchmarks.cuda out=$OUT/cuda_bench.json     # GPU: all sections (about 2 min on an H100 or H200)
    python -m benchmarks.cuda sections=train,generate train_batch=24
    python -m benchmarks.cuda device=cpu scale=tiny train_batch=2 train_s=1 train_steps=2 gen_batch=2 gen_s=1 \\
        eval_clips=2 eval_batch=2                                         # CPU check of the script, < 1 minute

The model and codec have random weights (timing only); the eval backbones ``eval_weights``'. Each section runs
on its own: one that fails is logged, recorded as ``{"error": ...}`` in the JSON and the next one runs (exit code
1 if any failed). Each times the code path the harness runs, with its settings: torch's defaults, which the harness
leaves as they are (fp32 matrix products without TF32; cuDNN convolutions, the codec's and the metric networks',
in TF32 on Ampere and later GPUs, as in the peers' own code, so GPU numbers differ from CPU ones at about 1e-3).

1. ``train``: one expert of ``scale`` (6-2; default ``isolated-1.6b``, 1/6 of its 1.6B) at appendix B's batch
   (24 clips of 6 s crops per GPU) timed by ``benchmarks.train.time_steps``: ``siren.train.train_step``
   (forward, Eq. 6 loss, backward, clipping, fused AdamW) in bf16 autocast on random codes, median of
   ``train_steps`` after one warm-up step. MFU = the model FLOPs of a step, counted over the warm-up step by
   torch's FlopCounterMode (benchmarks.train), / step time / peak bf16 FLOP/s. Code tokens/s = frames/s x the
   m RVQ layers the expert predicts (2 for 6-2).
2. ``generate``: the whole 6-2 CollaborativeModel at ``scale`` in fp32, as ``siren.load`` gives it to eval's
   sampler (``siren.sample.generate_with_info``), batch ``gen_batch`` x
   ``gen_s`` seconds, KV caches, random text states [B, text_tokens, 768]; then ``siren.codec.Codec``
   (weights=random: the full DAC 16 kHz architecture, fp32) decodes the codes. One untimed run of each first
   (lazy CUDA init; the decoder's at the timed shape). Real-time factor = audio seconds / wall seconds. Without
   the ``dac`` package the model gets zero code tables and decoding is skipped.
3. ``eval``: the three metric networks (``eval.backbones.PannsCnn14`` for FD/KL/IS, ``VGGish`` for FAD,
   ``ClapAudio`` for CLAP) built with their own ``device`` option (the eval code path: ``embed_batch`` on the
   prepared CPU tensors, copy in, results back to numpy) on ``eval_clips`` clips of ``eval_clip_s`` seconds of
   noise at each backbone's rate, ``eval_batch`` per call; and CLAP's text tower on ``eval_clips`` captions.
   Per-clip ``prepare`` (CPU resampling; VGGish's log-mel examples) is not timed. One warm-up call, then
   ``eval_repeats`` timed passes over the clips; the median pass is reported (all of them in the JSON).
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.train import peak_flops, random_batch, scale_config, time_steps
from siren import cli
from siren.assets import WEIGHTS_MODES
from siren.codec import FRAME_RATE
from siren.config import ConfigError, check_numbers, load_config
from siren.errors import SirenError
from siren.io import write_json
from siren.runtime import resolve_device
from siren.train import TrainConfig

log = logging.getLogger("benchmarks.cuda")  # not __name__ (__main__ under -m): the shell shows benchmarks.* INFO
SECTIONS = ("train", "generate", "eval")


@dataclass
class CudaBenchConfig:
    device: str = "cuda"  # cpu: check the script with tiny sizes (scale=tiny) before spending GPU time
    scale: str = "isolated-1.6b"  # model preset of sections 1 and 2 (distribution 6-2)
    sections: str = "train,generate,eval"  # comma-separated subset of train, generate, eval
    out: str = ""  # JSON file for all results (written after each section); empty = none
    seed: int = 0
    text_tokens: int = 32  # L of the random text states [B, L, 768]
    train_batch: int = 24  # appendix B: 24 clips per GPU
    train_s: float = 6.0  # crop length of a training row (appendix B: 6 s): frames = 50 * train_s
    train_steps: int = 10  # timed steps, after one warm-up step
    peak_tflops: float = 0.0  # 0: $SIREN_PEAK_TFLOPS, else benchmarks.train's table by GPU name
    gen_batch: int = 16
    gen_s: float = 10.0  # generated seconds per clip: frames = 50 * gen_s
    eval_weights: str = "random"  # random | demo | pretrained (timing does not depend on them)
    eval_clips: int = 256
    eval_clip_s: float = 10.0
    eval_batch: int = 32
    eval_repeats: int = 5  # timed passes over the clips, the median reported (one pass took 0.13-0.26 s on a GPU)

    def __post_init__(self):
        check_numbers(self, positive=("text_tokens", "train_batch", "train_s", "train_steps", "gen_batch", "gen_s",
                                      "eval_clips", "eval_clip_s", "eval_batch", "eval_repeats"),
                      nonneg=("peak_tflops",))
        unknown = set(self.section_list) - set(SECTIONS)
        if unknown or not self.section_list:
            raise ConfigError(f"sections={self.sections!r}: give a comma-separated subset of {', '.join(SECTIONS)}")
        # named now, in one line: inside a section they were a traceback per section, on lent GPU time
        scale_config(self.scale, "6-2")
        if self.eval_weights not in WEIGHTS_MODES:
            raise ConfigError(f"eval_weights must be random, demo or pretrained, got {self.eval_weights!r}")
        if self.out:  # written after the first section: a folder there was a traceback after its compute
            there = next(p for p in Path(self.out).resolve().parents if p.exists())
            if not there.is_dir():
                raise ConfigError(f"out={self.out}: {there} is a file, not a folder; give out=FOLDER/FILE.json")
            if Path(self.out).is_dir():
                raise ConfigError(f"out={self.out} is a folder; give the path of the JSON file to write")

    @property
    def section_list(self) -> list[str]:
        return [s.strip() for s in self.sections.split(",") if s.strip()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def table(title: str, rows: list[tuple[str, object]]) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join([f"### {title}", "", "| quantity | value |", "|---|---|",
                      *(f"| {k} | {fmt(v)} |" for k, v in rows)])


def bench_train(cfg: CudaBenchConfig, device: torch.device) -> tuple[dict, str]:
    frames = round(cfg.train_s * FRAME_RATE)
    batch = random_batch(cfg.train_batch, frames, cfg.text_tokens, device, cfg.seed)
    expert_cfg = scale_config(cfg.scale, "6-2")
    log.info("train: one %s expert, batch %d x %d frames, %d steps", cfg.scale, cfg.train_batch, frames,
             cfg.train_steps)
    row, = time_steps({"expert 0": expert_cfg}, batch, cfg.train_steps, TrainConfig(precision="bf16"), device)
    flops = row.flops_per_s
    peak, source = peak_flops(cfg, device) if device.type == "cuda" else (None, "no peak on CPU")
    m = expert_cfg.layers_per_expert
    r = dict(scale=cfg.scale, params=row.params, batch=cfg.train_batch, frames_per_step=row.frames,
             step_s=row.seconds, cpu_s_per_step=row.cpu_seconds, frames_per_s=row.frames_per_s,
             code_tokens_per_s=row.frames_per_s * m, flops_per_step=row.flops, achieved_tflops=flops / 1e12,
             flops_rule="counted (torch FlopCounterMode; attention as full T x T)",
             peak_tflops=peak / 1e12 if peak else None, peak_source=source, mfu=flops / peak if peak else None,
             peak_memory_gb=row.memory_gb)
    title = (f"1. train step, one {cfg.scale} expert (6-2), bf16 autocast, fused AdamW on CUDA; "
             f"median of {cfg.train_steps} steps")
    return r, table(title, [("params", f"{row.params / 1e6:.1f}M"), ("batch x frames", f"{cfg.train_batch} x {frames}"),
                            ("frames/step", row.frames), ("step time s", row.seconds),
                            ("frames/s", round(r["frames_per_s"])),
                            (f"code tokens/s (x{m} layers predicted)", round(r["code_tokens_per_s"])),
                            ("model FLOPs per step (counted)", f"{row.flops / 1e12:.2f} T"),
                            ("achieved TFLOP/s", r["achieved_tflops"]),
                            ("MFU", f"{r['mfu']:.1%} of {r['peak_tflops']:.0f} TFLOP/s ({source})" if peak
                             else f"n/a ({source})"),
                            ("peak memory GB", row.memory_gb)])


def bench_generate(cfg: CudaBenchConfig, device: torch.device) -> tuple[dict, str]:
    from siren.model import CollaborativeModel
    from siren.sample import SampleConfig, generate_with_info

    model_cfg = scale_config(cfg.scale, "6-2")
    try:
        from siren.codec import Codec, CodecConfig
        codec = Codec(CodecConfig(weights="random", seed=cfg.seed)).to(device)
        decode_note = "DAC 16 kHz, random weights, fp32"
    except ImportError as e:
        codec, decode_note = None, f"decode skipped: {e}"
        log.warning("generate: %s (the model gets zero code tables)", decode_note)
    log.info("generate: building the %s 6-2 model on %s", cfg.scale, device)
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # initialised in place: no 1.6B-parameter copy from the CPU
        model = CollaborativeModel.from_codec(model_cfg, codec) if codec else CollaborativeModel(model_cfg)
    model = model.to(device).eval()  # fp32, as siren.load gives it to eval's sampler
    params = sum(p.numel() for p in model.parameters())
    frames = round(cfg.gen_s * FRAME_RATE)
    g = torch.Generator().manual_seed(cfg.seed)
    text = (torch.randn(cfg.gen_batch, cfg.text_tokens, 768, generator=g),
            torch.ones(cfg.gen_batch, cfg.text_tokens, dtype=torch.bool))
    generate_with_info(model, text, min(4, frames), SampleConfig(), cfg.seed, progress=False)  # warm-up
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    codes, info = generate_with_info(model, text, frames, SampleConfig(), cfg.seed)
    sync(device)
    sample_s, sample_mem = time.perf_counter() - t0, peak_gb(device)
    del model
    decode_s = decode_mem = None
    if codec is not None:
        codec.decode(codes)  # warm-up at the timed shape (allocation, kernel choice)
        sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        codec.decode(codes)
        sync(device)
        decode_s, decode_mem = time.perf_counter() - t0, peak_gb(device)
    audio_s = cfg.gen_batch * frames / FRAME_RATE
    total_s = sample_s + (decode_s or 0.0)
    r = dict(scale=cfg.scale, params=params, batch=cfg.gen_batch, frames=frames, audio_s=audio_s, sample_s=sample_s,
             ms_per_frame_step=1e3 * sample_s / frames, decode_s=decode_s, decode=decode_note,
             rtf_sampling=audio_s / sample_s, rtf_total=audio_s / total_s, collapsed=int(info.collapsed.sum()),
             peak_memory_gb_sampling=sample_mem, peak_memory_gb_decode=decode_mem)
    title = (f"2. generation, {cfg.scale} 6-2 ({params / 1e6:.0f}M params, fp32, KV cache), batch {cfg.gen_batch} "
             f"x {cfg.gen_s:g} s")
    return r, table(title, [("sampling s", sample_s), ("ms per frame step", r["ms_per_frame_step"]),
                            ("decoding s", decode_s if codec else decode_note), ("decoder", decode_note),
                            ("audio s generated", audio_s), ("real-time factor, sampling", r["rtf_sampling"]),
                            ("real-time factor, sampling + decoding", r["rtf_total"]),
                            ("peak memory GB, sampling", sample_mem), ("peak memory GB, decoding", decode_mem)])


def bench_eval(cfg: CudaBenchConfig, device: torch.device) -> tuple[dict, str]:
    from eval.audio import make_clip
    from eval.backbones import ClapAudio, PannsCnn14, VGGish
    from eval.cache import embed_texts

    results, rows = {}, []
    for name, cls in (("panns_cnn14", PannsCnn14), ("vggish", VGGish), ("clap_audio", ClapAudio)):
        try:
            t0 = time.perf_counter()
            backbone = cls(cfg.eval_weights, cfg.seed, device)
            backbone.net  # noqa: B018 (built on first use: time it here, apart from the embedding)
            build_s = time.perf_counter() - t0
            n = round(cfg.eval_clip_s * backbone.sample_rate)
            g = torch.Generator().manual_seed(cfg.seed)
            noise = (0.1 * torch.randn(cfg.eval_batch, n, generator=g)).numpy()  # one batch of noise, reused
            xs = [backbone.prepare(make_clip(str(i), x, backbone.sample_rate)) for i, x in enumerate(noise)]
            backbone.embed_batch(xs[:min(cfg.eval_batch, cfg.eval_clips)])  # warm-up
            sync(device)
            reset_peak(device)
            log.info("eval: %s, %d clips of %g s", name, cfg.eval_clips, cfg.eval_clip_s)
            passes = []
            for _ in range(cfg.eval_repeats):
                t0 = time.perf_counter()
                for i in range(0, cfg.eval_clips, cfg.eval_batch):
                    backbone.embed_batch(xs[:min(cfg.eval_batch, cfg.eval_clips - i)])
                sync(device)
                passes.append(time.perf_counter() - t0)
            seconds = statistics.median(passes)
            results[name] = dict(weights=cfg.eval_weights, build_s=build_s, clips=cfg.eval_clips, seconds=seconds,
                                 passes_s=passes,
                                 clips_per_s=cfg.eval_clips / seconds,
                                 audio_s_per_s=cfg.eval_clips * cfg.eval_clip_s / seconds,
                                 peak_memory_gb=peak_gb(device))
            rows += [(f"{name}: clips/s", results[name]["clips_per_s"]),
                     (f"{name}: audio s/s", results[name]["audio_s_per_s"]),
                     (f"{name}: peak memory GB", results[name]["peak_memory_gb"])]
            if cls is ClapAudio:  # the CLAP score's other half: one text embedding per caption (uncached)
                captions = [f"caption {i}: a dog barks while rain falls on a tin roof" for i in range(cfg.eval_clips)]
                embed_texts(backbone, captions[:4])  # warm-up
                sync(device)
                t0 = time.perf_counter()
                embed_texts(backbone, captions)
                sync(device)
                results["clap_text"] = dict(weights=cfg.eval_weights, captions=cfg.eval_clips,
                                            seconds=time.perf_counter() - t0)
                results["clap_text"]["captions_per_s"] = cfg.eval_clips / results["clap_text"]["seconds"]
                rows.append(("clap_text: captions/s", results["clap_text"]["captions_per_s"]))
        except Exception as e:  # a missing package (panns_inference, laion_clap, ...) must not lose the other ones
            log.exception("eval: %s failed", name)
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            rows.append((f"{name}", f"skipped: {type(e).__name__}: {e}"))
    title = (f"3. evaluation backbones ({cfg.eval_weights} weights, device option of eval.backbones), "
             f"{cfg.eval_clips} clips of {cfg.eval_clip_s:g} s, batch {cfg.eval_batch}; median of "
             f"{cfg.eval_repeats} passes")
    return results, table(title, rows)


def environment(device: torch.device) -> dict:
    """What the numbers depend on besides the config, for the JSON: device, driver, library and code versions."""
    from siren.runtime import code_version

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "code_version": code_version(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", memory_gb=props.total_memory / 2**30,
                   driver=_driver())
    return env


def _driver() -> str | None:
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str]) -> int:
    cfg = load_config(CudaBenchConfig, argv)
    device = resolve_device(cfg.device)
    where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.type == "cuda"
             else f"CPU ({torch.get_num_threads()} threads)")
    header = (f"{where}, torch {torch.__version__}; model and codec random weights (timing only), eval backbones "
              f"{cfg.eval_weights} weights")
    print(f"## benchmarks.cuda: {header}", flush=True)
    results = {"header": header, "config": dataclasses.asdict(cfg), "environment": environment(device)}
    failed = False
    for name in cfg.section_list:
        try:
            results[name], text = {"train": bench_train, "generate": bench_generate, "eval": bench_eval}[name](
                cfg, device)
            print(f"\n{text}", flush=True)
        except SirenError:  # the user's input (a missing weights file, ...): one error line, exit 2
            raise
        except Exception as e:  # record and go on: one failing section must not lose the others
            log.exception("section %s failed", name)
            results[name], failed = {"error": f"{type(e).__name__}: {e}"}, True
            print(f"\n### {name}: FAILED ({type(e).__name__}: {e})", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if cfg.out:
            write_json(cfg.out, results)
    failed |= any("error" in v for v in results.get("eval", {}).values() if isinstance(v, dict))
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main, CudaBenchConfig, __doc__)
