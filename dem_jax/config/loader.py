"""The one config loader: typed dataclasses from YAML, with dotted command-line overrides.

    config = load_run_config("configs/tiny.yaml", ["train.steps=20", "data.seq_len=64"])

Nested dataclasses are built from the YAML mapping by their type hints; an
unknown key or a value of the wrong type is a DemError naming the file and the
dotted field.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dem_jax.config.run import RunConfig
from dem_jax.errors import DemError, did_you_mean


def build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and types.

    Field metadata extends the schema: ``{"inline": True}`` on a dataclass-typed
    field (default None) reads that dataclass's keys from this same mapping, and
    ``{"unsupported": "what"}`` names a key that is refused with its own message.
    A DemError from ``cls.__post_init__`` is prefixed with ``where`` unless it
    already starts with it.
    """
    if not isinstance(data, dict):
        raise DemError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = dict(data)
    for name, f in fields.items():
        if "unsupported" in f.metadata and name in data:
            raise DemError(
                f"{_join(where, name)}: {f.metadata['unsupported']} is not supported by dem-jax"
            )
    inline = {
        name: _inline_type(hints[name]) for name, f in fields.items() if f.metadata.get("inline")
    }
    inline_values = {}
    for name, inner in inline.items():
        keys = [f.name for f in dataclasses.fields(inner)]
        given = {k: data.pop(k) for k in keys if k in data}
        inline_values[name] = build(inner, given, where) if given else None
    known = [
        n for n, f in fields.items() if "unsupported" not in f.metadata and n not in inline
    ] + [f.name for inner in inline.values() for f in dataclasses.fields(inner)]
    unknown = sorted(set(data) - set(fields) | (set(data) & set(inline)), key=str)
    if unknown:
        raise DemError(
            f"{where or 'top level'}: unknown key {unknown[0]!r} "
            f"({did_you_mean(unknown[0], known)}known: {', '.join(known)})"
        )
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in data.items()}
    kwargs.update(inline_values)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise DemError(f"{where or 'top level'}: missing required key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except DemError as e:
        if not where or str(e).startswith(where):
            raise
        raise DemError(f"{where}: {e}") from None


def _inline_type(hint: Any) -> type:
    """The dataclass of an inline field typed ``X | None``."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if len(options) != 1 or not dataclasses.is_dataclass(options[0]):
        raise TypeError(f"an inline field must be typed `Dataclass | None`, got {hint}")
    return options[0]


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a type hint, converting where YAML is looser (int -> float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except DemError as e:
                errors.append(str(e))
        raise DemError(errors[0] if len(errors) == 1 else f"{where}: unexpected value {value!r}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise DemError(f"{where}: expected a mapping, got {value!r}")
        return {
            _coerce(key_type, k, where): _coerce(value_type, v, _join(where, k))
            for k, v in value.items()
        }
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise DemError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return origin(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "3e-4" as a string
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))
    ):
        raise DemError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries (values parsed as YAML) in a nested mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DemError(f"override {item!r}: expected key=value, e.g. train.steps=20")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DemError(f"override {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = _yaml_value(raw, item) if raw else None
    return data


def _yaml_value(raw: str, item: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise DemError(f"override {item!r}: invalid YAML value ({problem})") from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping from a UTF-8 file, with a DemError naming the file on failure
    (missing, a directory, not text, not YAML, empty, or not a mapping)."""
    path = Path(path)
    if path.is_dir():
        raise DemError(f"{path}: is a directory, expected a YAML config file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise DemError(f"{path}: config file not found") from None
    except OSError as e:
        raise DemError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DemError(
            f"{path}: not a YAML file (byte 0x{e.object[e.start]:02x} at offset {e.start} "
            "is not UTF-8 text)"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise DemError(f"{path}:{line} invalid YAML ({problem})") from None
    except (ValueError, RecursionError) as e:  # e.g. a date such as 2024-13-45
        raise DemError(f"{path}: invalid YAML ({e})") from None
    if data is None:
        raise DemError(f"{path}: the file is empty (expected a YAML mapping)")
    if not isinstance(data, dict):
        raise DemError(
            f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}"
        )
    return data


def resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make the data file and model paths in a config relative to the config's folder."""

    def fix(value):
        # Absolute paths and URLs (gs://...) are taken as they are.
        if value is None or os.path.isabs(value) or "://" in value:
            return value
        return str(base / value)

    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        model["path"] = fix(model["path"])
    dcfg = data.get("data")
    if isinstance(dcfg, dict):
        if isinstance(dcfg.get("tokenizer"), str):
            dcfg["tokenizer"] = fix(dcfg["tokenizer"])
        dists = dcfg.get("distributions")
        for dist in dists.values() if isinstance(dists, dict) else ():
            if isinstance(dist, dict):
                for key in ("train", "validation"):
                    if isinstance(dist.get(key), str):
                        dist[key] = fix(dist[key])
    if isinstance(data.get("output_dir"), str):
        data["output_dir"] = fix(data["output_dir"])


def parse_config(cls: type, data: Any, source: str | os.PathLike) -> Any:
    """Dataclass ``cls`` built from a parsed YAML mapping; every error names ``source``."""
    try:
        return build(cls, data, "")
    except DemError as e:
        raise DemError(f"{source}: {e}") from None


def load_run_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config YAML, apply overrides, validate. Relative paths in the
    file are relative to the file's folder; paths in overrides are taken as given
    relative to the current directory."""
    path = Path(path)
    data = load_yaml(path)
    resolve_paths(data, path.parent)
    apply_overrides(data, list(overrides or []))
    return parse_config(RunConfig, data, path)
