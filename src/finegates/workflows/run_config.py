"""Run configs: dataclasses that round-trip through JSON, read from YAML/JSON files, written per run."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from finegates.io_utils import atomic_write_text

RUN_CONFIG_NAME = "run_config.json"
T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build `cls` from `data`, rejecting keys the dataclass does not have."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}. Known keys: {sorted(known)}.")
    return cls(**data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping (by file suffix; YAML is a superset of JSON, so other suffixes read as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"Config file {path} is not UTF-8 text ({err.reason} at byte {err.start})."
        ) from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"Config file {path} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})."
            ) from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise ValueError(
                f"Config file {path} is not valid YAML: {getattr(err, 'problem', None) or err}{at}."
            ) from None
    if data is None:
        raise ValueError(f"Config file {path} is empty.")
    if not isinstance(data, dict):
        raise TypeError(f"Config file {path} must hold a mapping of option names to values.")
    return data


def run_config_payload(sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{section: dataclass}` as the JSON-ready mapping `run_config.json` holds."""
    return json.loads(json.dumps({name: dataclasses.asdict(value) for name, value in sections.items()}))


def check_types(cls: type, data: dict[str, Any], where: str) -> None:
    """Refuse values of the wrong type for `cls`'s fields (a bool must be a bool, a number a number), as a
    config file can hold any: one line naming the file, the key and the expected type."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name not in hints:
            continue
        expected = _expected_types(hints[name])
        if not any(_is_instance(value, kind) for kind in expected):
            names = " or ".join(_type_name(kind) for kind in expected)
            raise ValueError(f"{where}: {name} must be {names}, got {value!r} ({type(value).__name__}).")


def _expected_types(annotation: Any) -> list[Any]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return list(typing.get_args(annotation))
    return [annotation]


def _is_instance(value: Any, kind: Any) -> bool:
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind) or (Any,)
        return isinstance(value, list) and (item is Any or all(_is_instance(v, item) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, kind) if isinstance(kind, type) else True


def _type_name(kind: Any) -> str:
    if kind is type(None):
        return "null"
    if kind is bool:
        return "true or false"
    if typing.get_origin(kind) is list:
        return f"a list of {_type_name(typing.get_args(kind)[0])}" if typing.get_args(kind) else "a list"
    return {int: "an integer", float: "a number", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind))
    )


def write_run_config(directory: str | Path, sections: dict[str, Any]) -> Path:
    """Write `{section: dataclass}` as `run_config.json` (sorted keys), the file `--config` reads back."""
    text = json.dumps(run_config_payload(sections), indent=2, sort_keys=True)
    return atomic_write_text(Path(directory) / RUN_CONFIG_NAME, text)


def split_sections(data: dict[str, Any], sections: dict[str, type], where: str) -> dict[str, dict[str, Any]]:
    """Per-section option dicts from a nested file ({"finetune": {...}, "gates": {...}}) or a flat one."""
    if data and set(data) <= set(sections):
        return {name: dict(data.get(name) or {}) for name in sections}
    owners = {f.name: name for name, cls in sections.items() for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(owners))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}. Known keys: {sorted(owners)}.")
    out: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in data.items():
        out[owners[key]][key] = value
    return out
