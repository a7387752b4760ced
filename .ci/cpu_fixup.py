"""Make PyPI's CUDA builds of torchvision/torchaudio importable beside a CPU-only torch.

PyPI ships torchvision and torchaudio only as CUDA builds. Next to a CPU build of torch
their compiled extensions cannot load (libc10_cuda.so is missing), and:
  - ``import torchaudio`` raises, and with it ``import dac`` (audiotools imports it);
  - ``import torchvision`` raises ("operator torchvision::nms does not exist"), and with it
    ``import laion_clap`` and transformers' model imports.
Both libraries run their pure-Python parts without the extension (torchaudio's resample and
MelSpectrogram; torchvision's transforms and FrozenBatchNorm2d, all this project uses), so on
a CPU-only torch we set the unloadable extension files aside and guard torchvision's two
unconditional fake-kernel registrations. On a CUDA build of torch nothing is touched.

Run by ``.ci/setup`` as ``python .ci/cpu_fixup.py`` (install tooling, not part of the library); idempotent.
"""
from __future__ import annotations

import importlib.util
import py_compile
import re
import subprocess
import sys
from pathlib import Path

DISABLED_SUFFIX = ".cpu-disabled"


def _import_errors(modules) -> dict[str, str]:
    """{module: the last line of its import error} for those of ``modules`` that do not import. Each is
    tried in a fresh interpreter (3-6 s, mostly importing torch), all at once."""
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for m in modules}
    errors = {}
    for m, proc in procs.items():
        lines = proc.communicate()[1].strip().splitlines()
        if proc.returncode:
            errors[m] = lines[-1] if lines else f"exit status {proc.returncode}"
    return errors


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"cpu_fixup: {name} is not installed; run .ci/setup again")
    return Path(list(spec.submodule_search_locations)[0])


def _set_aside(files: list[Path]) -> None:
    for f in files:
        f.rename(f.with_name(f.name + DISABLED_SUFFIX))
        print(f"cpu_fixup: set aside {f} (CUDA-only extension)")


def fix_torchaudio() -> None:
    _set_aside(sorted((_package_dir("torchaudio") / "lib").glob("*.so")))


_FAKE = re.compile(r'^@torch\.library\.register_fake\("(torchvision::\w+)"\)$', re.M)


def fix_torchvision() -> None:
    pkg = _package_dir("torchvision")
    _set_aside([p for p in [pkg / "_C.so"] if p.exists()])
    meta = pkg / "_meta_registrations.py"
    text = meta.read_text()
    patched = _FAKE.sub(
        r'@(torch.library.register_fake("\1") if torchvision.extension._has_ops() else (lambda f: f))', text
    )
    if patched != text:
        meta.write_text(patched)
        py_compile.compile(str(meta))  # .ci/setup byte-compiled the packages before this ran
        print(f"cpu_fixup: guarded fake-kernel registrations in {meta}")


FIXES = {"torchaudio": fix_torchaudio, "torchvision": fix_torchvision}  # run only for a module that fails to import


def main() -> int:
    import torch

    if torch.version.cuda is not None:
        print(f"cpu_fixup: torch {torch.__version__} is a CUDA build; nothing to do")
        return 0
    broken = _import_errors(FIXES)
    for m in broken:
        FIXES[m]()
    failed = _import_errors(broken)  # a module that imported at once is not tried again
    for m, err in failed.items():
        print(f"cpu_fixup: {m} still does not import: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
