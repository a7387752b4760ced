"""Helpers the test modules share: stand-in codec tables, a tiny model config, the job-settings
probe that local and warm-started jobs run, and ``python -m`` run inside the test process. The fixtures_*
modules build on these; the real collate function
(siren.data.dataset.collate) batches everywhere."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import runpy
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from siren.codec import CODEBOOK_DIM, CODEBOOK_SIZE, N_LAYERS, CodeTables
from siren.model.config import ModelConfig


def in_ci() -> bool:
    """CI=1/true/yes/on: where a test that cannot run here must fail, not skip (CI=false or 0 is not CI)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def overridden(defaults: list[str], extra: tuple[str, ...] | list[str]) -> list[str]:
    """A test's key=value command line: ``defaults`` less the keys ``extra`` gives, then ``extra`` (a command line
    may not give one key two values: siren.config.given_once)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [d for d in defaults if d.split("=", 1)[0] not in keys] + list(extra)


def code_tables(seed: int = 0, proj_scale: float = 0.1) -> CodeTables:
    """Random stand-in codec tables (codebooks, out-projection, a non-zero out-projection bias)."""
    g = torch.Generator().manual_seed(seed)
    return CodeTables(torch.randn(N_LAYERS, CODEBOOK_SIZE, CODEBOOK_DIM, generator=g),
                      proj_scale * torch.randn(N_LAYERS, 1024, CODEBOOK_DIM, generator=g),
                      0.1 * torch.randn(N_LAYERS, 1024, generator=g))


def tiny_model_config(distribution: str = "6-2", codec: str = "test-random-tables") -> ModelConfig:
    """A CPU-millisecond model: d=32, one backbone and one decoder block."""
    return ModelConfig(distribution=distribution, dim=32, main_layers=1, decoder_layers=1, attn_heads=2, codec=codec)


def wait_for(condition, what: str, deadline_s: float = 60) -> None:
    """Polls until condition() holds; the deadline only stops a hung test, it measures nothing."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


def startup_env(path: str = "") -> dict:
    """The job settings (ablations.pipeline.JOB_ENV) as glibc and libgomp read them: the environment this
    process image started with (a job forked by the warm server shows the server's); written to ``path`` if given."""
    from ablations.pipeline import JOB_ENV

    entries = Path("/proc/self/environ").read_bytes().decode().split("\0")
    env = {k: v for k, _, v in (e.partition("=") for e in entries) if k in JOB_ENV}
    if path:
        Path(path).write_text(json.dumps(env))
    return env


def run_as_main(target: str, *args: str) -> tuple[int, str, str]:
    """``python -m target args...`` (a module) or ``python target args...`` (a ``.py`` file) as ``__main__`` in
    this process (runpy): (exit code, stdout, stderr). A new interpreter would import torch and the harness again,
    ~3 s each on 2 cores. The log handler the command's shell adds for the captured stderr is taken off again, so
    later tests log where pytest captures."""
    out, err, root = io.StringIO(), io.StringIO(), logging.getLogger()
    handlers, code = list(root.handlers), 0
    try:
        with (mock.patch.object(sys, "argv", [target, *args]), contextlib.redirect_stdout(out),
              contextlib.redirect_stderr(err)):
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        for h in set(root.handlers) - set(handlers):
            root.removeHandler(h)
    return code, out.getvalue(), err.getvalue()


def import_audioldm_eval(mp: pytest.MonkeyPatch):
    """The peer audioldm_eval 0.0.3, imported on these versions (.ci/setup installs it without its requirements):
    its unused LSD/SSIM imports (skimage, ssr_eval) stubbed and torchaudio.load read through soundfile."""
    import types

    import numpy as np
    import soundfile as sf
    import torchaudio

    for name, attrs in [("skimage", {}), ("skimage.metrics", {"peak_signal_noise_ratio": None,
                                                             "structural_similarity": None}),
                        ("ssr_eval", {}), ("ssr_eval.metrics", {"AudioMetrics": None})]:
        mp.setitem(sys.modules, name, types.SimpleNamespace(__name__=name, **attrs))

    def load(path):
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return torch.from_numpy(np.ascontiguousarray(wav.T)), sr
    mp.setattr(torchaudio, "load", load)
    import audioldm_eval
    return audioldm_eval


# The frozen DAC tables each expert holds (buffers, not parameters): 12 x (1024 x 8 codebook + 1024 x 8
# + 1024 out-projection)
FROZEN_DAC_TABLES = 12 * (1024 * 8 + 1024 * 8 + 1024)


def closed_form_params(cfg: ModelConfig) -> int:
    """Parameter count written out from the architecture (independent of module introspection),
    counted the official way: the frozen DAC tables (12 x (1024 x 8 codebook + 1024 x 8 + 1024
    out-projection)) included."""
    d, L, D, m, t = cfg.dim, cfg.main_layers, cfg.decoder_layers, cfg.layers_per_expert, cfg.text_dim
    hidden = cfg.mlp_hidden or {"swiglu": 256 * math.ceil((8 * d // 3) / 256), "gelu": 4 * d}[cfg.mlp]
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * hidden  # gate, up, down / up, down
    cross = 2 * d * d + 2 * t * d + (4 * d if cfg.cross_attn_bias else 0)  # q, out; k, v; biases
    frozen = FROZEN_DAC_TABLES
    embed = 12 * (1024 * d + d)
    main = d + L * (3 * d + 4 * d * d + cross + mlp) + d  # sos, blocks (3 norms, self-attn), final norm
    start = t * d + d if cfg.decoder_start == "text" else d
    pos = (m + 1) * d if cfg.decoder_positions == "learned" else 0
    decoder = 0 if cfg.conditioning == "none" else start + pos + D * (2 * d + 4 * d * d + mlp) + d
    heads = m * (d * 1024 + (1024 if cfg.head_bias else 0))
    return cfg.n_experts * (frozen + embed + main + decoder + heads)
