"""One shell for every command of the harness (``python -m siren.train``, ``python -m eval.audiocaps``,
``python ablations/run.py``, ``python -m analysis.<probe>``, ...):

- ``--help``: the command's docstring and every ``key=value`` it takes, with its default;
- one logging format for status lines on stderr (results go to stdout);
- a ``SirenError`` (bad input the user can fix) ends in one ``error: ...`` line and exit code 2,
  a disk-full error in one line naming the path, Ctrl-C in one line and exit code 130;
  anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Mapping, NoReturn, Sequence

from siren.errors import SirenError

LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
EXIT_ERROR = 2  # bad input (as argparse)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
PACKAGES = ("siren", "eval", "ablations", "analysis", "benchmarks")  # whose INFO lines are shown
# The pinned libraries' notices about their own internals, which nothing a user sets here changes (the DAC's
# weight_norm, laion_clap's timm import and HTSAT's meshgrid): printed by every command that built the codec or
# CLAP. Matched by category and the message's start, so any other warning still prints.
LIBRARY_NOTICES = ((FutureWarning, r"`torch\.nn\.utils\.weight_norm` is deprecated"),
                   (FutureWarning, r"Importing from timm\.models\.layers is deprecated"),
                   (UserWarning, r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing"))


def start(argv: Sequence[str] | None) -> list[str]:
    """First line of every command's ``main(argv)``: the arguments (``sys.argv`` when None), with the
    one log format set up (also when a job calls ``main`` directly, not through ``run``)."""
    setup_logging()
    return list(sys.argv[1:] if argv is None else argv)


class _BetweenBars(logging.StreamHandler):
    """A log line between progress bars, not inside one: tqdm.write clears the bars on the stream, writes the line
    and draws them again (a warning logged while a bar was drawn ended up in the middle of its line)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler reports, never raises
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """The one log format; idempotent (a job that runs several commands in one process sets it once)."""
    root = logging.getLogger()
    if not any(getattr(h, "_siren", False) for h in root.handlers):
        handler = _BetweenBars(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler._siren = True
        root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries (matplotlib's font subsetting, ...): warnings only
    # submitit gives its logger two handlers of its own when imported (stdout, and stderr for warnings): cleared,
    # so each of its warnings prints once, in our format
    logging.getLogger("submitit").handlers.clear()
    # "__main__": the module run by `python -m siren.x` logs under that name, not under its package's
    for name in (*PACKAGES, "__main__"):
        logging.getLogger(name).setLevel(level)
    for category, message in LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message, category)


def help_text(schema: type | None, doc: str | None, presets: Mapping[str, Mapping] | None = None) -> str:
    """The docstring, then every settable key of ``schema`` with its default, then the presets' names."""
    lines = [(doc or "").strip(), ""]
    if schema is not None:
        from siren.config import defaults

        lines.append("keys (key=value; dotted for nested groups):")
        lines += [f"  {k}={v!r}" for k, v in defaults(schema).items()]
    if presets:
        lines.append("presets (group=name: sets of the keys above, applied before the keys given):")
        lines += [f"  {group}=" + "|".join(names) for group, names in presets.items()]
    return "\n".join(lines).strip() + "\n"


def folder_keys(filename, schema: type | None = None) -> str:
    """Which setting moves the write that failed: the assets cache's is not out= (SIREN_CACHE, or an evaluation's
    cache_dir= / cache=false), every other the command's own folder key (out=, or siren.train's run_dir=)."""
    from siren.io import cache_dir

    try:
        cached = filename is not None and Path(filename).resolve().is_relative_to(cache_dir().resolve())
    except (OSError, ValueError, TypeError):
        cached = False
    if cached:
        return (f" (the assets cache {cache_dir()}: set SIREN_CACHE=, or for an evaluation's embeddings cache_dir= or "
                f"cache=false)")
    if not dataclasses.is_dataclass(schema):  # a command of subcommands (siren.demo_assets): theirs is out=
        return " (out=...)"
    keys = {f.name for f in dataclasses.fields(schema)}
    return next((f" ({k}=...)" for k in ("out", "run_dir") if k in keys), " (the command's output folder)")


def run(main: Callable[[list[str]], int | None], schema: type | None = None, doc: str | None = None,
        argv: Sequence[str] | None = None, presets: Mapping[str, Mapping] | None = None) -> NoReturn:
    """Run a command's ``main(argv)`` under the shell's help, logging and error handling, then exit."""
    sys.exit(call(main, argv, schema, doc, presets))


def own_words(e: Exception) -> str:
    """An error's message; one raised in a DataLoader worker comes back re-raised by type with the worker's
    traceback as its message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): its own
    words are those after the traceback's last "<module>.<Class>: "."""
    text = str(e)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        head, sep, rest = lines[i].partition(": ")
        if sep and head.rsplit(".", 1)[-1] == type(e).__name__:
            return "\n".join([rest, *lines[i + 1:]])
    return text


def call(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, schema: type | None = None,
         doc: str | None = None, presets: Mapping[str, Mapping] | None = None) -> int:
    """``run`` without the exit: the command's exit code (for entry points that return one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        sys.stdout.write(help_text(schema, doc, presets))
        return 0
    setup_logging()
    try:
        code = main(argv)
    except SirenError as e:
        print(f"error: {own_words(e)}", file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): what was checkpointed or written is kept; run the same command again to "
              "continue", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        if e.errno == errno.EACCES:  # a file read (a manifest, weights) as much as one written
            fix = (f": {e.filename}" if e.filename else "") + "; give this user access to it, or use your own folder"
        else:
            fix = (f" writing {e.filename}" if e.filename else "") + "; free space or choose a writable folder"
        fix += folder_keys(e.filename, schema)
        print(f"error: {e.strerror}{fix}, then run the same command again: completed work is kept", file=sys.stderr)
        code = EXIT_ERROR
    return code or 0
