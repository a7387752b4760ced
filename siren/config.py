"""Config as dataclasses, overridden from the command line.

    python -m siren.train model.dim=32 scale=tiny run_dir=runs/x     # tiny's keys, then dim 32

``key=value`` sets one field (dotted for nested dataclasses); ``group=name`` selects a
named preset, which is itself a set of key=value pairs applied before the explicit ones,
wherever it stands on the line (presets in the order given). A key that is neither a field
nor a group is an error listing the valid keys.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import typing
from typing import Any, Mapping, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from siren.errors import ConfigError

T = TypeVar("T")

Presets = Mapping[str, Mapping[str, Mapping[str, Any]]]  # group -> preset name -> {dotted key: value}

# A schema is a class, fixed once imported: what is derived from it alone is computed once per process.
# (A grid launch parses every row's config with several schemas; uncached, the type hints (string
# annotations, compiled per field) and OmegaConf's structured build were ~0.1 s per parse on 2 cores.)


@functools.cache
def _type_hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _sub_schema(schema: type, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``schema``, or None for a leaf."""
    t = _type_hints(schema).get(name)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


@functools.cache
def field_paths(schema: type) -> tuple[str, ...]:
    """Every settable dotted key of a (nested) dataclass schema."""
    out: list[str] = []
    for f in dataclasses.fields(schema):
        sub = _sub_schema(schema, f.name)
        out += [f"{f.name}.{p}" for p in field_paths(sub)] if sub else [f.name]
    return tuple(out)


@functools.cache
def _structured(schema: type):
    """OmegaConf's typed config of ``schema`` at its defaults: copied by each ``load_config``, never changed."""
    return OmegaConf.structured(schema)


def default_of(schema: type, key: str) -> Any:
    """The default of dotted ``key`` in ``schema`` (``dataclasses.MISSING`` where the schema has no such key)."""
    return OmegaConf.select(_structured(schema), key) if key in field_paths(schema) else dataclasses.MISSING


def _unknown(key: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys: {', '.join(sorted(valid))}")


def split_args(args: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for a in args:
        if "=" not in a:
            raise ConfigError(f"expected key=value, got '{a}'")
        k, v = a.split("=", 1)
        pairs.append((k.strip(), v))
    return pairs


def given_once(args: Sequence[str]) -> list[tuple[str, str]]:
    """``split_args`` of a command line whose keys each have one value: the later silently won
    (`is_splits=2 ... is_splits=3` ran with 3, `scale=tiny scale=small` trained small)."""
    pairs = split_args(args)
    for i, (key, value) in enumerate(pairs):
        was = next((v for k, v in pairs[:i] if k == key and v != value), None)
        if was is not None:
            raise ConfigError(f"'{key}' given twice, as {was!r} and as {value!r}: give it once")
    return pairs


def expand(pairs: Sequence[tuple[str, str]], presets: Presets) -> list[tuple[str, Any]]:
    """The presets' key=value pairs (each group=name, in order), then the explicit pairs (in order): an explicit
    key wins over a preset wherever it stands (``model.dim=32 scale=tiny`` silently trained tiny's dim 64)."""
    chosen: list[tuple[str, Any]] = []
    explicit: list[tuple[str, Any]] = []
    for k, v in pairs:
        if k in presets:
            if v not in presets[k]:
                raise ConfigError(f"unknown {k} '{v}'. Valid {k} presets: {', '.join(sorted(presets[k]))}")
            chosen += list(presets[k][v].items())
        else:
            explicit.append((k, v))
    return chosen + explicit


def load_config(schema: type[T], args: Sequence[str] = (), presets: Presets | None = None,
                defaults: Sequence[str] = ()) -> T:
    """Build ``schema`` from ``defaults`` then ``args`` (both key=value / group=name strings; each expanded by
    ``expand``, so any of ``args`` wins over ``defaults``)."""
    presets = presets or {}
    valid = field_paths(schema)
    cfg = copy.deepcopy(_structured(schema))
    for key, value in [*expand(split_args(defaults), presets), *expand(given_once(args), presets)]:
        if key not in valid:
            raise _unknown(key, [*valid, *presets])
        if isinstance(value, str) and ("${" in value or value.strip() == "???"):
            # OmegaConf would resolve ${oc.env:VAR} (any environment variable into a config) or fail later
            # with a traceback (${x}, ???): values are literals here
            raise ConfigError(f"bad value for '{key}': {value!r} (interpolations and '???' are not config values; "
                              f"give the value itself)")
        try:
            OmegaConf.update(cfg, key, OmegaConf.create({"v": value})["v"] if isinstance(value, str) else value,
                             merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad value for '{key}': {value!r} ({str(e).splitlines()[0]})") from None
    try:
        out = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config: {str(e).splitlines()[0]}") from None
    _check_finite(out)
    return out


def _check_finite(cfg: Any, prefix: str = "") -> None:
    """Every float of every config is finite: nan/inf in a config is always a typo or a bug."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            _check_finite(v, f"{prefix}{f.name}.")
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{prefix}{f.name} must be a finite number, got {v}")


def check_numbers(cfg: Any, prefix: str = "", positive: Sequence[str] = (), nonneg: Sequence[str] = ()) -> None:
    """Range checks for a config's __post_init__: ``positive`` fields > 0, ``nonneg`` fields >= 0."""
    for names, ok, word in ((positive, lambda v: v > 0, "> 0"), (nonneg, lambda v: v >= 0, ">= 0")):
        for name in names:
            v = getattr(cfg, name)
            if not ok(v) or (isinstance(v, float) and not math.isfinite(v)):
                raise ConfigError(f"{prefix}{name} must be {word}, got {v}")


def defaults(schema: type) -> dict[str, Any]:
    """Every settable dotted key of ``schema`` with its default value (for --help)."""
    flat, stack = {}, [("", dataclasses.asdict(schema()))]
    while stack:
        prefix, d = stack.pop()
        for k, v in d.items():
            if isinstance(v, dict) and _is_group(schema, f"{prefix}{k}"):
                stack.append((f"{prefix}{k}.", v))
            else:
                flat[f"{prefix}{k}"] = v
    return {k: flat[k] for k in field_paths(schema) if k in flat}


def _is_group(schema: type, dotted: str) -> bool:
    for name in dotted.split("."):
        schema = _sub_schema(schema, name) if schema else None
    return schema is not None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(schema: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Rebuild a dataclass from a dict (e.g. a checkpoint's JSON); unknown keys are errors."""
    valid = {f.name for f in dataclasses.fields(schema)}
    extra = set(data) - valid
    if extra:
        raise ConfigError(f"{where}: unknown keys {sorted(extra)} for {schema.__name__}; valid: {sorted(valid)}")
    kwargs = {}
    for name, v in data.items():
        sub = _sub_schema(schema, name)
        kwargs[name] = from_dict(sub, v, f"{where}.{name}") if sub and isinstance(v, Mapping) else v
    return schema(**kwargs)
