"""Peak memory of `siren.data.prepare` on one long file under ``audio.policy=segment`` (random codec, CPU).

    python benchmarks/prepare_memory.py minutes=5                  # the whole file
    python benchmarks/prepare_memory.py minutes=60 max_calls=24    # stop after 24 codec calls

Writes a tone-plus-noise file of ``minutes`` (PCM16 at ``sample_rate`` with ``channels``), prepares it
with 10 s segments and ``batch_size`` segments per codec call, and prints the peak resident memory
(ru_maxrss) once the codec and text encoder are built and at the end. ``max_calls=K`` stops the encode
after K codec calls: the file is still read, checked and cut in full, and every call holds the same
batch, so the peak is reached in the first calls; what the rest would add is the file's codes
(12 x 500 int16 per segment: 4.3 MB an hour). Run it in a fresh process per measurement.
"""
from __future__ import annotations

import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/prepare_memory.py`: import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import soundfile as sf

from siren import cli
from siren.config import check_numbers, load_config


@dataclass
class MemoryConfig:
    minutes: float = 5.0
    sample_rate: int = 16_000
    channels: int = 1
    batch_size: int = 1  # segments per codec call (prepare's batch_size)
    max_calls: int = 0  # > 0: stop the encode after this many codec calls
    threads: int = 1

    def __post_init__(self):
        check_numbers(self, positive=("minutes", "sample_rate", "channels", "batch_size", "threads"),
                      nonneg=("max_calls",))


class _Stop(Exception):
    pass


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def write_long_file(path: Path, minutes: float, sr: int, channels: int) -> None:
    """A 200 Hz tone wobbling by 50 Hz plus noise: no segment is silent. Written a minute at a time."""
    rng, n = np.random.default_rng(0), int(minutes * 60 * sr)
    with sf.SoundFile(path, "w", sr, channels, subtype="PCM_16") as f:
        for s in range(0, n, 60 * sr):
            t = np.arange(s, min(n, s + 60 * sr)) / sr
            x = 0.3 * np.sin(2 * np.pi * (200 + 50 * np.sin(t / 7)) * t) + 0.05 * rng.standard_normal(t.size)
            f.write(np.repeat(x[:, None], channels, 1).astype(np.float32))


def main(argv: list[str] | None = None) -> None:
    import torch

    from siren.codec import Codec, CodecConfig
    from siren.data.audio import AudioConfig
    from siren.data.prepare import prepare
    from siren.text import TextConfig, TextEncoder

    cfg = load_config(MemoryConfig, cli.start(argv))
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="siren-mem-") as tmp:
        tmp = Path(tmp)
        write_long_file(tmp / "long.wav", cfg.minutes, cfg.sample_rate, cfg.channels)
        (tmp / "m.csv").write_text("id,audio,caption\nlong,long.wav,a wobbling tone with noise\n")
        codec, text = Codec(CodecConfig(weights="random")), TextEncoder(TextConfig(weights="random"))
        models_mb, calls, encode = _peak_mb(), [], codec.encode

        def counted(x):
            if cfg.max_calls and len(calls) == cfg.max_calls:
                raise _Stop
            calls.append(len(x))
            return encode(x)

        codec.encode = counted
        t0 = time.perf_counter()
        try:
            prepare(tmp / "m.csv", tmp / "out", codec=codec, text_encoder=text, audio=AudioConfig("segment", 10.0),
                    batch_size=cfg.batch_size, progress=False)
        except _Stop:
            pass
        print(f"{cfg.minutes:g} min, {cfg.sample_rate} Hz x {cfg.channels} ch, batch_size={cfg.batch_size}, "
              f"random codec and text weights (memory only): "
              f"{len(calls)} codec calls ({sum(calls)} segments"
              f"{', stopped early' if cfg.max_calls and len(calls) == cfg.max_calls else ''}) in "
              f"{time.perf_counter() - t0:.0f} s; peak RSS {models_mb:.0f} MB with the models built, "
              f"{_peak_mb():.0f} MB at the end")


if __name__ == "__main__":
    cli.run(main, MemoryConfig, __doc__)
