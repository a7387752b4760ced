"""File I/O every module shares: atomic writes (a reader never sees a half-written file, a killed
job never leaves one), the digests of data and files, and loading third-party torch weights
without executing code from them.

Files come out with the mode ``open()`` would give them (0o666 minus the umask), not mkstemp's
0600: a shared ``$SIREN_CACHE`` or run folder must be readable by the rest of the group.
"""
from __future__ import annotations

import collections
import errno
import functools
import hashlib
import json
import os
import pickle
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from siren.errors import CheckpointError, ConfigError, DataError


def umask() -> int:
    """The process umask, read without changing it where Linux reports it (no race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode a plain ``open(path, "w")`` creates a file with: 0o666 minus the umask."""
    return 0o666 & ~umask()


def fsync(path: str | os.PathLike) -> None:
    """Make a file's bytes, or the renames in a folder, durable (a node crash right after must not lose them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(dest: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success it is renamed onto ``dest``, else removed. ``durable``: the
    bytes are on disk before the rename and the rename after it, for records that vouch for other files (done
    markers, results, commit points): delayed allocation could otherwise keep the name and lose the bytes."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode())  # mkstemp made it 0600
        if durable:
            fsync(tmp)
        os.replace(tmp, dest)
        if durable:
            fsync(dest.parent)
    except Exception as e:
        if _disk_full(e, tmp):  # one error naming the file (siren.cli), not the writer's own traceback
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _disk_full(e: Exception, tmp: str) -> bool:
    """Whether a write failed for want of space. Python's own writes say so (ENOSPC, EDQUOT: without the file's
    name); safetensors' and torch's writers raise their own errors, and libsndfile's says only "system error",
    so for those the space left where the file was written decides (with the failed file still there)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        st = os.statvfs(tmp)
    except OSError:
        return False
    return not isinstance(e, OSError) and st.f_bavail * st.f_frsize < 1 << 20


def cache_dir() -> Path:
    """The assets cache (``SIREN_CACHE``, default ~/.cache/siren): pretrained files, embeddings, prepared demo data."""
    return Path(os.environ.get("SIREN_CACHE", Path.home() / ".cache" / "siren")).expanduser()


def check_folder(path: str | os.PathLike, key: str) -> None:
    """``key=path`` names a folder a command writes into: its nearest existing part must be a folder. Checked
    when parsed; a file there ended in a NotADirectoryError / FileExistsError traceback at the first write,
    after the models were built or everything was computed. A control character is refused: the folder goes
    into SLURM scripts, where submitit's quoting does not stop a newline from starting a shell command."""
    if any(ord(c) < 32 or ord(c) == 127 for c in str(path)):
        raise ConfigError(f"{key}={str(path)!r}: a control character (newline, tab, ...) in a folder name; give "
                          f"{key}= a name without one")
    path = Path(path)
    there = next(p for p in (path, *path.parents) if os.path.lexists(p))  # "." (or "/") at the latest
    if there.is_symlink() and not there.exists():
        raise ConfigError(f"{key}={path}: {there} is a symbolic link to {os.readlink(there)}, which is not there; "
                          f"remove the link or give another {key}=")
    if not there.is_dir():
        raise ConfigError(f"{key}={path}: {there} is a file, not a folder; give {key}=FOLDER")


def open_no_link(path: str | os.PathLike, flags: int) -> int:
    """``os.open`` (creating the file) that refuses a symbolic link at ``path``: logs and locks are opened in
    place, and a link put in an output folder shared with a group would have them append to, or truncate,
    whatever file it names."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link (to {os.readlink(path)}); the harness writes its logs "
                              f"and locks only into plain files: remove the link") from None
        raise


def open_append(path: str | os.PathLike, mode: str = "a", **kw):
    """A log file opened for appending (``mode`` "a", "ab" or "ab+"; ``kw`` for ``open``), never through a
    symbolic link."""
    return os.fdopen(open_no_link(path, (os.O_RDWR if "+" in mode else os.O_WRONLY) | os.O_APPEND), mode, **kw)


def write_text(dest: str | os.PathLike, text: str, durable: bool = False) -> None:
    with atomic_path(dest, durable) as tmp:
        tmp.write_text(text)


def write_json(dest: str | os.PathLike, obj: Any, durable: bool = False) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", durable)


# safetensors' dtype names, in the order its writer sorts tensors (widest first, then by name): each stays aligned
_SAFETENSORS_DTYPES = {"torch.bool": "BOOL", "torch.uint8": "U8", "torch.int8": "I8", "torch.float8_e5m2": "F8_E5M2",
                       "torch.float8_e4m3fn": "F8_E4M3", "torch.int16": "I16", "torch.uint16": "U16",
                       "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.int32": "I32", "torch.uint32": "U32",
                       "torch.float32": "F32", "torch.float64": "F64", "torch.int64": "I64", "torch.uint64": "U64"}
_SAFETENSORS_RANK = {name: i for i, name in enumerate(_SAFETENSORS_DTYPES.values())}


def save_tensors(dest: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> str:
    """Write tensors as a safetensors file, atomically; returns its sha256. The bytes are those of safetensors'
    own ``save_file`` (tests/test_checkpoint.py compares them), written one tensor at a time and hashed as they
    go: ``save_file`` takes host tensors, so a GPU run's whole state was copied to the host before the first byte
    was written (a 3.3B model's AdamW state: 26 GB in the saving process, rank 0, at each checkpoint), and the
    digest read the file back. Unlike ``save_file`` it does not refuse tensors sharing memory (each is written
    whole), and it writes the metadata's keys in one order."""
    import torch

    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"safetensors metadata maps strings to strings, got {metadata!r}")
    entries, offset = [], 0
    for name, t in tensors.items():
        if str(t.dtype) not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} is {t.dtype}, which siren.io.save_tensors does not write (it writes "
                            f"{', '.join(_SAFETENSORS_DTYPES)})")
        entries.append((name, t, _SAFETENSORS_DTYPES[str(t.dtype)]))
    entries.sort(key=lambda e: (-_SAFETENSORS_RANK[e[2]], e[0]))
    # metadata keys sorted: safetensors' writer orders them as its hash map iterates, another order in each process
    # (its files of two or more keys differ from run to run); with one key, its bytes
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    for name, t, dtype in entries:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        def write(block) -> None:
            view = memoryview(block)
            for i in range(0, len(view), 1 << 20):  # hashed while the 1 MB just written is in the cache
                f.write(view[i:i + (1 << 20)])
                digest.update(view[i:i + (1 << 20)])

        write(len(head).to_bytes(8, "little"))
        write(head)
        for _, t, _ in entries:  # little-endian bytes in C order, through a view: a CPU tensor is not copied
            write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def sha256(data: bytes | str) -> str:
    """Hex sha256 of bytes, or of a string's UTF-8 encoding."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def sha256_file(*paths: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (of several files' bytes, concatenated), read in chunks."""
    return file_digest(*paths)


def version(st: os.stat_result) -> list[int]:
    """A file's version as a cache can trust without reading it: size, mtime and ctime. The ctime is what a
    same-size file put in place with its old mtime (``cp -p``, ``rsync -a``, ``touch -r``) cannot keep: the
    kernel sets it on every write, rename or ``utime``, and no call sets it back."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def sha256_file_once(path: str | os.PathLike) -> str:
    """``sha256_file`` of one file, computed once per version of it (path, ``version``) in a process."""
    return _sha256_of_version(str(Path(path).resolve()), *version(os.stat(path)))


@functools.lru_cache(maxsize=256)
def _sha256_of_version(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return file_digest(path)


def weights_tag(weights_sha256: str) -> str:
    """A network's weights in its id (cache keys): 16 hex digits of its file's sha256, or a seeded random
    network's whole ``random-seed<k>`` (cut to 16 characters, seeds 123456 and 123457 shared one id)."""
    return weights_sha256 if weights_sha256.startswith("random-seed") else weights_sha256[:16]


def file_digest(*paths: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest (``hashlib`` algorithm name) of the files' bytes, concatenated, read in chunks."""
    h = hashlib.new(algorithm)
    for p in paths:
        with open(p, "rb") as f:
            hash_rest(h, f)
    return h.hexdigest()


def hash_rest(h, f, chunk: int = 1 << 20):
    """``h`` updated with the rest of the open file ``f``, read in chunks; returns ``h``."""
    while block := f.read(chunk):
        h.update(block)
    return h


def load_hashed(path: str | os.PathLike, load: Callable[[BinaryIO], Any], sha256: str | None = None) -> tuple[Any, str]:
    """``(load(f), the file's sha256)`` with ``f`` the file at ``path`` opened once, hashed, and rewound: the
    weights loaded and the hash recorded for them (ids, cache keys, cards) are of one version of the file even
    when it is replaced meanwhile (hashed and loaded by path, the results of one file were filed under the
    other's hash). ``sha256``: the hash the run recorded before a lazy load; another is a CheckpointError."""
    with open(path, "rb") as f:
        h = hashlib.sha256()
        hash_rest(h, f)
        same_file(path, sha256, h.hexdigest())
        f.seek(0)
        return load(f), h.hexdigest()


def same_file(path: str | os.PathLike, recorded: str | None, got: str) -> None:
    """A CheckpointError when a file's sha256 is not the one the run recorded for it (``None``: none recorded)."""
    if recorded is not None and got != recorded:
        raise CheckpointError(f"{path} changed while this run was using it (sha256 {recorded[:16]}... when the run "
                              f"began, {got[:16]}... now): run it again, on one version of the file")


def _safe_globals() -> list:
    import numpy as np

    # numpy scalars (epoch, lr, ...) as training scripts store them: harmless constructors.
    return [np.core.multiarray.scalar, np.dtype] + list({type(np.dtype(t)) for t in "?bhilqBHILQefdgFD"})


def _allowed_globals() -> dict:
    import torch

    allowed = dict(torch._weights_only_unpickler._get_allowed_globals())
    allowed.update({f"{g.__module__}.{g.__qualname__}": g for g in _safe_globals()})
    return allowed


class _RestrictedUnpickler(pickle._Unpickler):
    """torch's weights_only rules for files written with pickle protocol >= 3, whose opcodes torch's
    weights_only unpickler rejects ("Unsupported operand 140"): LAION-CLAP's published checkpoints.

    Python's own unpickler (its pure-Python twin, so that each risky opcode can be replaced) with
    torch's rules: globals from torch's allow-list (+ numpy scalars) only; REDUCE and NEWOBJ call only
    those; BUILD sets state only on instances of allowed types (tensors, OrderedDict, numpy dtypes),
    never on a class or function (a BUILD on an allowed function rewrote its ``__defaults__`` for the
    rest of the process); the opcodes that instantiate or import otherwise (INST, OBJ, NEWOBJ_EX,
    EXT1/2/4) are refused."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args, **kwargs):
        import torch

        super().__init__(*args, **kwargs)
        self._allowed = _allowed_globals()
        self._callables = {id(v) for v in self._allowed.values()}
        self._buildable = {torch.Tensor, torch.nn.Parameter, collections.OrderedDict,
                           *(v for v in self._allowed.values() if isinstance(v, type))}

    def find_class(self, module: str, name: str):
        if f"{module}.{name}" not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not a tensor/weight type)")
        return self._allowed[f"{module}.{name}"]

    def _check_callable(self, func, op: str) -> None:
        if id(func) not in self._callables:
            raise pickle.UnpicklingError(f"refusing {op} of {type(func).__name__} {func!r:.80} (not allow-listed)")

    def load_reduce(self):
        self._check_callable(self.stack[-2], "REDUCE")
        pickle._Unpickler.load_reduce(self)

    def load_newobj(self):
        self._check_callable(self.stack[-2], "NEWOBJ")
        pickle._Unpickler.load_newobj(self)

    def load_build(self):
        inst = self.stack[-2]
        if isinstance(inst, type) or type(inst) not in self._buildable:
            raise pickle.UnpicklingError(f"refusing BUILD on {type(inst).__name__} {inst!r:.80} (only tensors, "
                                         "OrderedDict and allow-listed types take state)")
        pickle._Unpickler.load_build(self)

    def refuse(self):
        raise pickle.UnpicklingError("refusing an opcode that instantiates or imports outside the allow-list")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build
    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = refuse
    del _op


class _RestrictedPickle:
    Unpickler = _RestrictedUnpickler
    __name__ = "siren_restricted_pickle"

    @staticmethod
    def load(f, **kwargs):
        return _RestrictedUnpickler(f, **kwargs).load()


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """A JSON file the harness wrote; one that does not parse (edited by hand, damaged on disk) is a DataError
    naming it and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e}); {fix}") from None


def torch_load_reason(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line. torch's own message is a page of advice,
    part of it to turn the check off, which would run code from the file: not advice to pass on."""
    if isinstance(e, pickle.UnpicklingError):
        cause = re.search(r"(Unsupported operand \d+|unsupported GLOBAL \S+|Unsupported global: GLOBAL \S+)", str(e))
        return "torch.load with weights_only=True refused it" + (f": {cause.group(1)}" if cause else "")
    return " ".join(str(e).split(". ")[0].split())[:300]


def load_torch_file(path: str | os.PathLike | BinaryIO, **kwargs) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU (``path``: a file name or an open binary file); a file it
    cannot read (truncated, not torch, code in it) is a CheckpointError naming the file and why, in one line."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path.name if hasattr(path, 'read') else path}: not a readable torch file "
                              f"({torch_load_reason(e)})") from None


def load_torch_mmap(f: BinaryIO) -> Any:
    """``load_torch_file`` of an open file, memory-mapped: torch maps a file by its path only, so the path is then
    checked to still name the open (hashed, ``load_hashed``) file, not one put there meanwhile."""
    out = load_torch_file(f.name, mmap=True)
    opened, now = os.fstat(f.fileno()), os.stat(f.name)
    if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (
            opened.st_dev, opened.st_ino, opened.st_size, opened.st_mtime_ns):
        raise CheckpointError(f"{f.name} was replaced while this run loaded it: run it again, on one version of it")
    return out


def load_torch_weights(f: BinaryIO) -> dict:
    """A torch checkpoint (an open binary file) without executing code from it: weights_only=True, or for pickle
    protocols weights_only cannot parse, the same rules through a restricted unpickler."""
    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported operand" not in str(e):
            raise pickle.UnpicklingError(f"{f.name}: not loadable as plain weights ({torch_load_reason(e)})") from None
    f.seek(0)
    try:  # weights_only=False hands the file to _RestrictedPickle, which keeps weights_only's rules
        return torch.load(f, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{f.name}: not loadable as plain weights ({e})") from None
