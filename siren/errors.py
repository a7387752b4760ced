"""The project's error classes, under one base: every CLI maps a ``SirenError`` to one clean
line on stderr and exit code 2 (``siren.cli``); anything else is a bug and keeps its traceback.

A message names the file, line or key at fault and says the fix.
"""
from __future__ import annotations


class SirenError(Exception):
    """Bad input, files or environment that the user can fix; the message says how."""


class ConfigError(SirenError, ValueError):
    """A config key or value the schema does not accept."""


class DataError(SirenError, ValueError):
    """Bad input data (manifest, audio file, prepared directory)."""


class ManifestError(DataError):
    """A manifest (CSV/JSONL of id, audio, caption[, label]) that cannot be used as it is."""


class AudioError(DataError):
    """An audio file that cannot be read or used."""


class CheckpointError(SirenError, RuntimeError):
    """A checkpoint that is missing, unreadable, non-finite or made for another config."""


class SchedulerError(SirenError, RuntimeError):
    """SLURM cannot be driven from here (no ``sbatch`` or ``scancel`` on PATH, or it refused); the command's words."""


class MissingWeightsError(SirenError, FileNotFoundError):
    """A weights file that is not where it is expected; the message names the prefetch command."""


class WeightsMismatchError(CheckpointError, ValueError):
    """A weights file that is not the model the config asks for (another codec, another size)."""


class NonFiniteError(SirenError, FloatingPointError):
    """A NaN/inf loss, gradient, logit or reward: the run stops before the update (or the clip) it would spoil."""
