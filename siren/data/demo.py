"""The embedded demo dataset: 15 synthetic sound classes, made locally from a seed (no download).

It is what the default commands and the tests run on: short clips (1-2 s at 16 kHz) whose
classes have distinct spectro-temporal signatures (15 classes, as the paper's semantic probe
in Figure 2-c), parameters drawn per clip so clips of one class differ, captions in natural
language with some variation, labels = class names.

    python -m siren.data.demo out=data/demo_source      # write wavs + train.csv/test.csv (a few seconds)
    python -m siren.data.prepare manifest=demo out=data/demo codec.weights=random text.weights=random

Sizes: 20 train + 6 test clips per class (300 + 90 clips, about 590 s of audio; generated in a
few seconds). The semantic probe pools each clip's frames over time: 300 training examples, 90 held out.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

from siren.codec import SAMPLE_RATE
from siren.config import check_numbers, load_config
from siren.io import atomic_path, check_folder

SR = SAMPLE_RATE
DURATION_S = (1.0, 2.0)  # clip length range; prepared with AUDIO (crop at the max: no padding in the data)
AUDIO = {"audio.policy": "crop", "audio.duration_s": DURATION_S[1]}
# Clips per class. 6 test clips per class (90) so the reference set's Inception Score, averaged over
# 10 splits, can exceed 3 (a split of n clips caps it at n); 20 train clips per class for the codec,
# the metric backbones and the experts to learn from.
N_TRAIN, N_TEST = 20, 6
VERSION = 1  # bump when a generator changes: the files (and so every cache key) change with it


def _t(n: int) -> np.ndarray:
    return np.arange(n) / SR


def _decay(n: int, tau: float, attack: float = 0.002) -> np.ndarray:
    t = _t(n)
    return np.minimum(1.0, t / attack) * np.exp(-t / tau)


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """White noise restricted to [lo, hi] Hz (FFT mask), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec[(f < lo) | (f > hi)] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _tone(freq: np.ndarray | float, n: int, harmonics=(1.0,)) -> np.ndarray:
    """Sum of harmonics k*f(t) with amplitudes ``harmonics`` (those above Nyquist left out: no aliasing)."""
    freq = np.broadcast_to(freq, (n,))
    phase = 2 * np.pi * np.cumsum(freq) / SR
    return sum(a * np.sin((k + 1) * phase) for k, a in enumerate(harmonics) if a and (k + 1) * freq.max() < SR / 2)


def _add(out: np.ndarray, ev: np.ndarray, start: float) -> None:
    i = int(start * SR)
    if 0 <= i < len(out):
        m = min(len(ev), len(out) - i)
        out[i:i + m] += ev[:m]


def _events(rng, n, rate_lo, rate_hi, first=(0.0, 0.15)):
    """Onset times (s) with intervals drawn around a rate (events/s)."""
    t, out = rng.uniform(*first), []
    while t < n / SR:
        out.append(t)
        t += 1 / rng.uniform(rate_lo, rate_hi)
    return out


# Each generator: (rng, n samples) -> (waveform, caption fields).

def dog_bark(rng, n):
    out, f0 = np.zeros(n), rng.uniform(350, 700)
    barks = _events(rng, n, 2.5, 4.0)
    for t in barks:
        m = int(rng.uniform(0.12, 0.22) * SR)
        f = f0 * np.linspace(1.0, rng.uniform(0.6, 0.8), m)  # falling pitch
        ev = _tone(f, m, [1, .7, .5, .35, .25, .15]) + 0.4 * _band_noise(rng, m, 400, 3000)
        _add(out, ev * _decay(m, 0.06, 0.008), t)
    return out, {"n": len(barks), "size": "small" if f0 > 550 else "large"}


def siren(rng, n):
    fm, fc, dev = rng.uniform(0.7, 3.0), rng.uniform(650, 1000), rng.uniform(200, 400)
    f = fc + dev * np.sin(2 * np.pi * fm * _t(n) + rng.uniform(0, 2 * np.pi))
    return _tone(f, n, [1, .4, .2, .1]), {"kind": rng.choice(["a police car", "an ambulance", "a fire engine"])}


def engine(rng, n):
    rev = rng.random() < 0.5
    f0 = rng.uniform(25, 55) * (np.linspace(1, rng.uniform(1.6, 2.2), n) if rev else 1.0)
    harm = [1 / k ** 0.7 for k in range(1, 31)]
    am = 1 + 0.3 * np.sin(2 * np.pi * np.cumsum(np.broadcast_to(f0, (n,))) / SR / 2)  # firing pulses
    return _tone(f0, n, harm) * am + 0.3 * _band_noise(rng, n, 30, 600), {"rev": rev}


def rain(rng, n):
    heavy = rng.random() < 0.5
    out = _band_noise(rng, n, 1000, 7500) * (0.6 if heavy else 0.25)
    for t in rng.uniform(0, n / SR, int(rng.uniform(150, 300) if heavy else rng.uniform(40, 90))):
        m = int(0.004 * SR)
        _add(out, rng.uniform(0.3, 1.5) * _band_noise(rng, m, 2000, 7900) * _decay(m, 0.001, 0.0003), t)
    return out, {"heavy": heavy}


def birdsong(rng, n):
    out = np.zeros(n)
    motif = [(rng.uniform(2500, 6500), rng.uniform(2500, 6500), rng.uniform(0.04, 0.11))
             for _ in range(rng.integers(2, 5))]
    t = rng.uniform(0, 0.15)
    while t < n / SR:
        for f1, f2, d in motif:
            m = int(d * SR)
            _add(out, _tone(np.linspace(f1, f2, m), m, [1, .1]) * np.hanning(m), t)
            t += d + rng.uniform(0.02, 0.06)
        t += rng.uniform(0.1, 0.3)
    return out, {}


def bell(rng, n):
    out, f0 = np.zeros(n), rng.uniform(300, 800)
    strikes = _events(rng, n, 0.8, 1.5, first=(0.0, 0.1))
    ratios, amps = [0.5, 1.0, 1.19, 1.56, 2.0, 2.51, 2.66, 3.01], [.6, 1, .7, .5, .6, .3, .25, .2]
    for t in strikes:
        m = n - int(t * SR)
        ev = sum(a * np.sin(2 * np.pi * r * f0 * _t(m) + rng.uniform(0, 6.3)) * _decay(m, 1.2 / r)
                 for r, a in zip(ratios, amps))
        _add(out, ev, t)
    return out, {"church": f0 < 450, "n": len(strikes)}


def footsteps(rng, n):
    out = np.zeros(n)
    for i, t in enumerate(_events(rng, n, 1.6, 2.4)):
        m = int(0.12 * SR)
        ev = _band_noise(rng, m, 80, 900) * _decay(m, 0.025) + 0.3 * _band_noise(rng, m, 2000, 6000) * _decay(m, 0.004)
        _add(out, ev * (1.0 if i % 2 else 0.75), t)
    return out, {"surface": rng.choice(["a wooden floor", "a hard floor", "the pavement", "tiles"])}


def clapping(rng, n):
    out, crowd = np.zeros(n), rng.random() < 0.3
    for t in _events(rng, n, 12, 25) if crowd else _events(rng, n, 3, 6):
        m = int(0.05 * SR)
        _add(out, rng.uniform(0.6, 1) * _band_noise(rng, m, 700, 4500) * _decay(m, 0.008, 0.0005), t)
    return out, {"crowd": crowd}


def phone_ring(rng, n):
    fa, fb = rng.uniform(400, 1200), rng.uniform(400, 1200)
    tr = rng.uniform(15, 25)
    gate = (np.sin(2 * np.pi * tr * _t(n)) > 0).astype(float)  # bell trill
    on, off = rng.uniform(0.4, 0.9), rng.uniform(0.2, 0.4)
    cadence = ((_t(n) + rng.uniform(0, on + off)) % (on + off)) < on
    return (_tone(fa, n, [1, .3]) + _tone(fb, n, [1, .3])) * (0.4 + 0.6 * gate) * cadence, {}


def drum_beat(rng, n):
    out, beat = np.zeros(n), 60 / rng.uniform(90, 150)
    for i, t in enumerate(np.arange(0, n / SR, beat / 2)):
        m = int(0.25 * SR)
        if i % 4 == 0:  # kick: sine with falling pitch
            _add(out, _tone(45 + 110 * np.exp(-_t(m) / 0.03), m) * _decay(m, 0.12), t)
        if i % 4 == 2:  # snare: noise + body tone
            _add(out, (0.8 * _band_noise(rng, m, 1000, 6000) + 0.4 * _tone(185, m)) * _decay(m, 0.06), t)
        _add(out, 0.25 * _band_noise(rng, m, 7000, 7900) * _decay(m, 0.015), t)  # hi-hat eighths
    return out, {"tempo": "fast" if beat < 0.5 else "steady"}


def wind(rng, n):
    t = _t(n)
    gust = 0.5 + sum(rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * rng.uniform(0.2, 1.2) * t + rng.uniform(0, 6.3))
                     for _ in range(3))
    howl_f = rng.uniform(300, 700) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t))
    howl = 0.3 * _tone(howl_f, n) * (_band_noise(rng, n, 0.5, 8) * 0.3 + 1)
    return (_band_noise(rng, n, 40, 1200) + howl) * np.clip(gust, 0.05, None), {"strong": bool(gust.mean() > 0.55)}


def water_drip(rng, n):
    out = np.zeros(n)
    drops = _events(rng, n, 2.0, 6.0)
    for t in drops:
        m, f0 = int(0.08 * SR), rng.uniform(700, 1600)
        f = f0 * (1 + rng.uniform(0.5, 1.2) * np.minimum(1, _t(m) / 0.03))  # bubble: rising pitch
        _add(out, _tone(f, m) * _decay(m, 0.02, 0.001), t)
    return out, {"n": len(drops)}


def whistle(rng, n):
    notes = rng.uniform(1200, 2800, rng.integers(1, 4))
    f = np.repeat(notes, -(-n // len(notes)))[:n] * (1 + rng.uniform(0.01, 0.03)
                                                     * np.sin(2 * np.pi * rng.uniform(5, 7) * _t(n)))
    edge = np.minimum(1, np.minimum(_t(n), _t(n)[::-1]) / 0.05)
    return (_tone(f, n, [1, .08]) + 0.05 * _band_noise(rng, n, notes.min() * 0.8, notes.max() * 1.2)) * edge, {
        "tune": len(notes) > 1}


def alarm_beeps(rng, n):
    f, d = rng.uniform(2000, 3500), rng.uniform(0.07, 0.15)
    gate = ((_t(n) % (2 * d)) < d).astype(float)
    return _tone(f, n, [1, 0, 1 / 3, 0, 1 / 5]) * gate, {"fast": d < 0.1}


def thunder(rng, n):
    t0 = rng.uniform(0, 0.3)
    m = n - int(t0 * SR)
    rumble = (_band_noise(rng, m, 20, rng.uniform(120, 250)) * np.minimum(1, _t(m) / 0.1)
              * np.exp(-_t(m) / rng.uniform(0.6, 1.5)))
    rumble *= 1 + 0.5 * _band_noise(rng, m, 0.5, 6)  # rolling
    crack = rng.random() < 0.5
    if crack:
        k = int(0.15 * SR)
        rumble[:k] += 1.5 * _band_noise(rng, k, 200, 6000) * _decay(k, 0.03)
    out = np.zeros(n)
    _add(out, rumble, t0)
    return out, {"crack": crack}


@dataclass(frozen=True)
class SoundClass:
    name: str
    make: Callable[[np.random.Generator, int], tuple[np.ndarray, dict]]
    captions: Callable[[dict], list[str]]  # candidate captions for one clip


def _pick(rng, xs):
    return xs[int(rng.integers(len(xs)))]


CLASSES = [
    SoundClass("dog_bark", dog_bark, lambda p: [f"A {p['size']} dog barks {p['n']} times",
                                                   f"A {p['size']} dog barking", "A dog barks repeatedly nearby"]),
    SoundClass("siren", siren, lambda p: [f"The siren of {p['kind']} wails",
                                             f"{p['kind'].capitalize()} passes with its siren sweeping up and down",
                                             "An emergency siren blaring"]),
    SoundClass("engine", engine,
               lambda p: ["A car engine revs up", "An engine accelerates with a rising roar"] if p["rev"]
               else ["An engine idles with a low rumble", "A motor hums steadily", "A truck engine idling"]),
    SoundClass("rain", rain, lambda p: (["Heavy rain pours down", "Rain falls hard on a roof"] if p["heavy"] else
                                           ["Light rain patters on a surface", "Gentle rain falling"])),
    SoundClass("birdsong", birdsong,
               lambda p: ["A bird chirps and sings", "Birds tweeting", "A songbird sings a rapid melody"]),
    SoundClass("bell", bell, lambda p: (["A church bell tolls", "A large bell rings out"] if p["church"] else
                                           ["A small bell rings", "A bell is struck and rings"])),
    SoundClass("footsteps", footsteps, lambda p: [f"Footsteps walking on {p['surface']}",
                                                     "A person walks with steady footsteps", "Someone walking"]),
    SoundClass("clapping", clapping, lambda p: (["A crowd applauds", "Applause from an audience"] if p["crowd"] else
                                                   ["A person claps their hands", "Hands clapping"])),
    SoundClass("phone_ring", phone_ring,
               lambda p: ["A telephone rings", "A phone is ringing", "An old telephone bell ringing"]),
    SoundClass("drum_beat", drum_beat, lambda p: [f"Drums play a {p['tempo']} beat",
                                                     "A drummer plays a simple rock beat",
                                                     "A kick drum and snare keep a rhythm"]),
    SoundClass("wind", wind, lambda p: (["Strong wind gusting", "Wind howls loudly"] if p["strong"] else
                                           ["Wind blows", "A gentle breeze howls softly"])),
    SoundClass("water_drip", water_drip, lambda p: ["Water drips", "Water droplets fall into a puddle",
                                                       f"A leaking tap drips {p['n']} times"]),
    SoundClass("whistle", whistle, lambda p: (["A person whistles a tune", "Someone whistling a melody"] if p["tune"]
                                                 else ["A long high-pitched whistle", "Someone whistles one note"])),
    SoundClass("alarm_beeps", alarm_beeps,
               lambda p: (["A smoke alarm beeps rapidly", "An electronic alarm beeping fast"] if p["fast"] else
                          ["An alarm beeps repeatedly", "A beeping alarm"])),
    SoundClass("thunder", thunder, lambda p: (["A thunderclap followed by a long rumble", "Thunder cracks and rolls"]
                                                 if p["crack"] else
                                                 ["Distant thunder rumbles", "Thunder rolls in the distance"])),
]


def clip(cls_index: int, split: str, k: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """One demo clip (float32 [N] at 16 kHz, peak-normalised) and its caption; pure function of its arguments."""
    rng = np.random.default_rng([seed, cls_index, ("train", "test").index(split), k, VERSION])
    c = CLASSES[cls_index]
    n = int(rng.uniform(*DURATION_S) * SR)
    x, params = c.make(rng, n)
    x = x / (np.abs(x).max() + 1e-12) * rng.uniform(0.3, 0.9)
    x = x + 1e-3 * rng.standard_normal(n)  # faint noise floor
    return np.clip(x, -1, 1).astype(np.float32), str(_pick(rng, c.captions(params)))


def _wav_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False  # identical file kept (mtime untouched)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


def make_demo(out_dir: str | Path, seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """Write the demo set under ``out_dir``; returns the train manifest (``test.csv`` lies beside it).

    Idempotent: the same arguments give byte-identical files, and files already identical are
    left untouched; a file that differs (edited, older generator) is rewritten.
    """
    out_dir = Path(out_dir)
    for split, count in (("train", n_train), ("test", n_test)):
        rows = []
        for ci, c in enumerate(CLASSES):
            for k in range(count):
                x, caption = clip(ci, split, k, seed)
                rel = f"audio/{split}/{c.name}_{k:02d}.wav"
                _write_if_changed(out_dir / rel, _wav_bytes(x))
                rows.append({"id": f"{c.name}-{split}-{k:02d}", "audio": rel, "caption": caption, "label": c.name})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["id", "audio", "caption", "label"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        _write_if_changed(out_dir / f"{split}.csv", buf.getvalue().encode())
    spec = {"version": VERSION, "seed": seed, "n_train": n_train, "n_test": n_test, "sample_rate": SR,
            "duration_s": list(DURATION_S), "classes": [c.name for c in CLASSES], "prepare_audio": AUDIO}
    _write_if_changed(out_dir / "demo.json", (json.dumps(spec, indent=2) + "\n").encode())
    return out_dir / "train.csv"


@dataclass(frozen=True)
class DemoSet:
    """The embedded demo set on disk: what every place asking for "demo" gets (``demo_set``)."""
    train: Path  # manifest (id, audio, caption, label)
    test: Path

    @classmethod
    def at(cls, root: str | Path) -> "DemoSet":
        """Where the demo set under ``root`` lies (made or not: ``demo_set`` makes it)."""
        root = Path(root)
        return cls(root / "train.csv", root / "test.csv")


def demo_set(root: str | Path | None = None, seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST) -> DemoSet:
    """The demo set under ``root`` (default ``$SIREN_CACHE/demo``), made on first use (idempotent:
    identical files are left untouched). The one provider of "demo" data: prepare (``manifest=demo``),
    eval (``ref=demo``), the analysis probes (``data=demo``) and the grids all call it."""
    if root is None:
        from siren.assets import cache_dir

        root = cache_dir() / "demo"
    make_demo(root, seed, n_train, n_test)
    return DemoSet.at(root)


@dataclass
class DemoConfig:
    out: str = "data/demo_source"
    seed: int = 0
    n_train: int = N_TRAIN  # clips per class
    n_test: int = N_TEST

    def __post_init__(self):
        check_numbers(self, positive=("n_train",), nonneg=("n_test", "seed"))


def main(argv: list[str] | None = None) -> int:
    import time

    from siren import cli

    cfg = load_config(DemoConfig, cli.start(argv))
    check_folder(cfg.out, "out")
    t = time.perf_counter()
    train = make_demo(cfg.out, cfg.seed, cfg.n_train, cfg.n_test)
    print(f"demo set ({len(CLASSES)} classes, {cfg.n_train}+{cfg.n_test} clips per class, seed {cfg.seed}) in "
          f"{time.perf_counter() - t:.1f} s: {train} and {train.with_name('test.csv')}")
    return 0


if __name__ == "__main__":
    from siren.cli import run

    run(main, DemoConfig, __doc__)
