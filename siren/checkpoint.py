"""Stage-1 checkpoints: one directory per expert, safetensors + JSON, written atomically.

    run_dir/
      config.json                  what every expert of the run shares: model config, codec and
                                   text encoder ({id, weights, config}) (written by the first expert to start)
      expert_<k>/
        init.safetensors           the expert's weights at step 0 (task vectors are measured from them)
        train.lock                 held by the expert's training (rank 0) while it runs
        latest                     name of the newest complete checkpoint, e.g. "step_00001000"
        step_00001000/
          model.safetensors        the expert's weights (state_dict)
          trainer.safetensors      optimizer state tensors, RNG states (uint8)
          state.json               step, data position, optimizer scalars, model/train config,
                                   codec, text encoder, expert index, finished flag
        log.jsonl, tb/             training log (siren.train)

A checkpoint directory is built under a temporary name and renamed into place, then
``latest`` is rewritten (atomically): a job killed at any moment leaves either the old or
the new checkpoint, never half of one. Nothing here unpickles: tensors are safetensors,
everything else JSON.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from siren import io
from siren.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d+)$")




def expert_dir(run_dir: str | os.PathLike, k: int) -> Path:
    return Path(run_dir) / f"expert_{k}"


def expert_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The run's expert_<k>/ folders in k order; not the launcher's expert_<k>.done markers beside them."""
    return sorted((p for p in Path(run_dir).glob("expert_*") if p.is_dir() and p.name[7:].isdigit()),
                  key=lambda p: int(p.name[7:]))


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------- config checks

def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"d": 64}} -> {"model.d": 64}; tuples become lists so JSON round trips compare equal."""
    out: dict[str, Any] = {}
    for key, v in d.items():
        name = f"{prefix}{key}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """(dotted key, saved value, current value) for every key that differs, except under ``ignore``."""
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in ignore):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append((key, a.get(key, "<absent>"), b.get(key, "<absent>")))
    return out


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], where: str,
                 ignore: tuple[str, ...] = (), fix: str = "") -> None:
    """Raise naming every differing key: 'checkpoint X has model.d=256, this config has model.d=64'."""
    diff = config_diff(saved, current, ignore)
    if diff:
        has = ", ".join(f"{k}={v!r}" for k, v, _ in diff)
        want = ", ".join(f"{k}={v!r}" for k, _, v in diff)
        raise CheckpointError(f"{where} has {has}, this config has {want}." + (f" {fix}" if fix else ""))


# ---------------------------------------------------------------------------- reading

def read_run_json(path: Path) -> dict:
    """A JSON file of a run directory or checkpoint (siren.io.read_json's rules, as a CheckpointError whose fix is,
    in a checkpoint, the previous checkpoint)."""
    in_step = path.parent.name.startswith("step_")
    what = "checkpoint file" if in_step else "run file"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {what} {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        # a run's own file (config.json, alignment.json): fall_back's advice would delete the run's folder
        fix = fall_back(path) if in_step else "restore it from a copy, or start a new run folder"
        raise CheckpointError(f"corrupt {what} {path} ({e}); {fix}") from None


def read_commit_step(path: Path) -> int:
    """A stage-2 run's commit point (rl/state.json, which its fixes ask users to edit): the step every trained
    expert has a checkpoint of."""
    data = read_run_json(path)
    step = data.get("step") if isinstance(data, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:  # {"Step": 4}: a KeyError traceback
        raise CheckpointError(f'{path}: a commit point reads {{"step": N}}, N a step every trained expert has a '
                              f'checkpoint of (its step_<N> folder), got {json.dumps(data)[:80]}')
    return step


def fall_back(path: Path) -> str:
    """How to go back to an earlier checkpoint than the step directory holding ``path``."""
    step_dir = path.parent
    edir, run = step_dir.parent, step_dir.parent.parent
    if (run / "rl" / "state.json").is_file():  # stage 2: its commit point names the step every expert has
        return (f"delete {step_dir} and write an earlier step every trained expert has into "
                f'{run / "rl" / "state.json"} as {{"step": N}}')
    return f"delete {step_dir} and {edir / 'latest'} (the newest complete checkpoint is then used)"


def read_tensors(path: Path, sha256: str | None = None,
                 device_of: Callable[[str], str | torch.device] = lambda name: "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's tensor file, every tensor (``open_tensors``'s checks), each moved to ``device_of(name)`` as it
    is read; those left on the CPU are views of safetensors' mapping of the file."""
    with open_tensors(path, sha256) as f:
        return {k: f.get_tensor(k).to(device_of(k)) for k in f.keys()}


@contextlib.contextmanager
def open_tensors(path: Path, sha256: str | None = None) -> Iterator:
    """A checkpoint's tensor file open to read tensor by tensor (safetensors' ``safe_open``: ``keys()``,
    ``get_tensor(name)``, ``get_slice(name).get_shape()``), for readers of several experts' weights that do not fit
    in memory whole. With ``sha256`` (recorded at save) its bytes are checked first: safetensors has no checksum of
    its own, so a flipped byte inside a tensor would load as a slightly other model. One file is hashed and read,
    even if another is renamed into its place or it is deleted meanwhile (a run pruning its checkpoints); one
    written in place while open is an error on leaving."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path} ({e.strerror})") from None
    with fh:
        def written() -> tuple[int, int]:  # size and mtime of the open file, not io.version: a deletion moves ctime
            st = os.fstat(fh.fileno())
            return st.st_size, st.st_mtime_ns

        before = written()
        try:
            # hashed in chunks, then mapped: a 3.3B model's AdamW state read into memory whole to hash it, then
            # loaded beside it, held twice its size at once
            if sha256 is not None:  # None: a checkpoint written before the digests were recorded
                if (got := io.hash_rest(hashlib.sha256(), fh).hexdigest()) != sha256:
                    raise CheckpointError(f"corrupt checkpoint file {path}: its sha256 is {got[:16]}..., state.json "
                                          f"recorded {sha256[:16]}... when it was written (a damaged disk or copy, "
                                          f"or an edit); {fall_back(path)}")
            f = safe_open(str(path), "pt")
            if os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino:  # another file renamed in since the hash
                raise CheckpointError(f"checkpoint file {path} was replaced while it was read (another process "
                                      "writing it?); load it again once nothing writes there")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"corrupt checkpoint file {path} ({e}); {fall_back(path)}") from None
        with f:
            yield f
        if written() != before:
            raise CheckpointError(f"checkpoint file {path} changed while it was read (another process writing "
                                  "it?); load it again once nothing writes there")


def step_dirs(edir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint directory in an expert directory, oldest first."""
    return sorted((int(m.group(1)), p) for p in edir.glob("step_*") if (m := STEP_DIR.match(p.name)) and p.is_dir())


def latest(edir: Path) -> Path | None:
    """The newest complete checkpoint of an expert directory, or None when it has none."""
    pointer = edir / "latest"
    if pointer.is_file():
        # a bare step_* name only: a path (`../other_run/...`, `/abs/...`) would load another run's weights
        name = pointer.read_text().strip()
        if not STEP_DIR.match(name) or not (edir / name).is_dir():
            raise CheckpointError(f"{pointer} names '{name}', which is not a checkpoint directory in {edir}; "
                                  f"write the name of an existing step_* directory into it or delete it")
        return edir / name
    # `latest` is written after the step directory is renamed into place: a job killed in
    # between leaves a complete step directory without its pointer.
    steps = step_dirs(edir)
    return steps[-1][1] if steps else None


class Checkpoint:
    """One step directory: ``state`` (state.json) plus lazily read tensor files."""

    def __init__(self, path: Path):
        self.path = path
        self.state = read_run_json(path / "state.json")
        if not isinstance(self.state, dict):  # valid JSON of another shape ([1]): an AttributeError traceback
            self.state = {}
        self.require("format", "step")
        if self.state.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path / 'state.json'} has format {self.state.get('format')!r}, "
                                  f"this code reads format {FORMAT_VERSION}")

    def require(self, *keys: str) -> None:
        """Refuse a state.json without ``keys`` (a hand-edited or foreign file): its readers' KeyError tracebacks."""
        missing = [k for k in keys if k not in self.state]
        if missing:
            raise CheckpointError(f"{self.path / 'state.json'}: not a checkpoint's state (no {', '.join(missing)}); "
                                  f"{fall_back(self.path / 'state.json')}")

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def model_state(self) -> dict[str, torch.Tensor]:
        return self._tensors("model.safetensors")

    def trainer_state(self, optimizer_device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """trainer.safetensors; the optimizer's moments on ``optimizer_device`` (its parameters'), its step counts,
        the RNG states and the log's sums on the CPU, where a fresh run keeps them (a non-fused AdamW reads a step
        on a GPU with one wait per parameter). safetensors maps the file and its tensors are views of the mapping:
        what a resume reads stays the file's page cache, which the kernel may drop, not the process's own memory
        (docs/measurements.md, "What a resume holds in host memory")."""
        return read_tensors(self.path / "trainer.safetensors", self._sha256("trainer.safetensors"),
                            lambda k: optimizer_device if k.startswith("optim.") and not k.endswith(".step")
                            else "cpu")

    def open_model(self):
        """``model.safetensors`` open to read tensor by tensor (``open_tensors``)."""
        return open_tensors(self.path / "model.safetensors", self._sha256("model.safetensors"))

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        return read_tensors(self.path / name, self._sha256(name))

    def _sha256(self, name: str) -> str | None:
        return self.state.get("sha256", {}).get(name)


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """load_state_dict, with an error naming the file and the first mismatching tensors."""
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    bad = sorted(n for n in set(own) & set(tensors) if own[n].shape != tensors[n].shape)
    if missing or extra or bad:
        parts = ([f"missing {missing[:5]}"] if missing else []) + ([f"unexpected {extra[:5]}"] if extra else []) + \
                ([f"{n} is {tuple(tensors[n].shape)} in the file, {tuple(own[n].shape)} in the model"
                  for n in bad[:5]])
        raise CheckpointError(f"{where} does not fit this model: " + "; ".join(parts))
    module.load_state_dict(tensors)


def load_latest(edir: Path) -> Checkpoint | None:
    path = latest(edir)
    return Checkpoint(path) if path else None


def check_finite(tensors: Mapping[str, torch.Tensor], where: str, fix: str = "") -> None:
    """Refuse weights holding NaN/inf: training on them, or saving them, only loses good state."""
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{where} holds non-finite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}). "
                              + (fix or "The run diverged: lower the learning rate or check the data."))


def check_finite_checkpoint(c: Checkpoint, tensors: Mapping[str, torch.Tensor], fix: str | None = None) -> None:
    """A resume from non-finite weights is refused with the fix: fall back to an earlier step (stage 1: the expert's
    ``latest``; stage 2 resumes from its own commit point and passes its ``fix``)."""
    earlier = sorted(p.name for p in c.path.parent.glob("step_*") if STEP_DIR.match(p.name) and p != c.path)
    fix = fix or (f"Delete {c.path} and point {c.path.parent / 'latest'} at an earlier checkpoint "
                  f"({', '.join(earlier)}) to resume from there." if earlier else
                  f"It has no earlier checkpoint: delete {c.path.parent} to start this expert again.")
    check_finite(tensors, f"checkpoint {c.path / 'model.safetensors'}", fix)


# ---------------------------------------------------------------------------- optimizer and RNG state

def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state -> tensors ('optim.<param index>.<name>') + JSON-able param groups."""
    sd = opt.state_dict()
    return {f"optim.{i}.{name}": t for i, st in sd["state"].items() for name, t in st.items()}, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], groups: list[dict],
                   where: Path) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = t
    sizes = [len(g["params"]) for g in opt.param_groups]
    if [len(g["params"]) for g in groups] != sizes:
        raise CheckpointError(f"{where}/trainer.safetensors holds optimizer state for parameter groups of sizes "
                              f"{[len(g['params']) for g in groups]}, this model has {sizes}")
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(ranks, device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG states (CPU, and this rank's CUDA device), as uint8 tensors on rank 0."""
    import torch.distributed as dist

    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if ranks.world == 1:
        return {f"rng.{k}.rank0": v for k, v in mine.items()}
    out = {}
    for k, v in mine.items():
        parts = [torch.empty_like(v, device=device) for _ in range(ranks.world)]
        dist.all_gather(parts, v.to(device))
        out.update({f"rng.{k}.rank{r}": p.cpu() for r, p in enumerate(parts)})
    return out


def restore_rng(tensors: Mapping[str, torch.Tensor], ranks, device: torch.device, reseed: int) -> None:
    """This rank's RNG states; saved with another number of processes: reseed from ``reseed``."""
    cpu = tensors.get(f"rng.cpu.rank{ranks.rank}")
    if cpu is None or f"rng.cpu.rank{ranks.world}" in tensors:
        log.warning("checkpoint RNG states are for another number of processes; reseeding rank %d", ranks.rank)
        torch.manual_seed(reseed)
        return
    torch.set_rng_state(cpu)
    if device.type == "cuda" and f"rng.cuda.rank{ranks.rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{ranks.rank}"], device)


# ---------------------------------------------------------------------------- writing

def save(edir: Path, step: int, model_state: Mapping[str, torch.Tensor], trainer_tensors: Mapping[str, torch.Tensor],
         state: Mapping[str, Any], keep_last: int) -> Path:
    """Write step_<step>/ atomically, point ``latest`` at it, keep the newest ``keep_last``."""
    check_finite(model_state, f"the weights of {edir.name} at step {step}",
                 "Nothing was saved; the newest checkpoint stays the last finite one.")
    final = edir / step_name(step)
    writer = f"{socket.gethostname()}-{os.getpid()}"  # pids repeat across the nodes of a shared filesystem
    tmp = edir / f".{final.name}.tmp-{writer}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        digests = {f: io.save_tensors(tmp / f, dict(tensors), {"format": "pt"})
                   for f, tensors in (("model.safetensors", model_state), ("trainer.safetensors", trainer_tensors))}
        io.write_json(tmp / "state.json", {**state, "format": FORMAT_VERSION, "step": step, "sha256": digests})
        for f in tmp.iterdir():  # the files' bytes too: the renames below must not outlive them in a node crash
            io.fsync(f)
        io.fsync(tmp)
        trash = edir / f".{final.name}.old-{writer}"
        shutil.rmtree(trash, ignore_errors=True)  # a former writer's of this name (a reused pid)
        if final.exists():  # same step written again (e.g. a fresh run over a directory without `latest`)
            os.replace(final, trash)
        os.replace(tmp, final)
        io.fsync(edir)
        shutil.rmtree(trash, ignore_errors=True)  # only now: killed while deleting, `latest` still names a step
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    io.write_text(edir / "latest", final.name + "\n")
    io.fsync(edir / "latest")
    io.fsync(edir)  # before the older steps go
    olds = sorted((int(m.group(1)), p) for p in edir.glob("step_*") if (m := STEP_DIR.match(p.name)))
    for s, p in olds[:-keep_last] if keep_last > 0 else []:
        if s != step:
            shutil.rmtree(p, ignore_errors=True)
    _remove_stale(edir)
    return final


def drop_after(edir: Path, step: int) -> None:
    """Delete an expert's step folders newer than ``step`` and point ``latest`` at it: stage 2 resumes from its
    commit point, and a newer step of one expert (a save killed before the others') would otherwise count among
    the next save's ``keep_last`` and push the committed step out."""
    newer = [p for p in edir.glob("step_*") if (m := STEP_DIR.match(p.name)) and int(m.group(1)) > step]
    for p in newer:
        log.info("removing %s, a step saved after the commit point %d (not by every expert)", p, step)
        shutil.rmtree(p)
    if newer:
        io.write_text(edir / "latest", step_name(step) + "\n")


STALE_S = 3600  # a half-written step of another process this old is a killed job's (writing one takes minutes)


def _remove_stale(edir: Path) -> None:
    """Remove the temporary step folders a killed job left (``kill -9``, a node lost mid-save): at paper scale
    each is a whole checkpoint. A live writer's are at most minutes old; this process's own are gone already."""
    now = time.time()
    for p in list(edir.glob(".step_*.tmp-*")) + list(edir.glob(".step_*.old-*")):
        try:
            if now - p.lstat().st_mtime > STALE_S:
                shutil.rmtree(p)
                log.info("removed %s, a half-written checkpoint left by a killed job", p)
        except OSError:  # removed by another process meanwhile
            pass
