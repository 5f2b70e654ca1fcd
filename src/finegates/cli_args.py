"""argparse options generated from config dataclasses, so the CLI and the Python API cannot drift.

Precedence when building the configs: dataclass defaults < `--config FILE` < flags on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import types
import typing
from typing import Any

from finegates.config import dataclass_from_dict
from finegates.workflows.run_config import read_config_file, split_sections

NONE_WORDS = ("none", "null")
_REGEX_CHARS = re.compile(r"[*?\[\]()|^$\\+{}]")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _members(annotation: Any) -> list[Any]:
    """The types of a union annotation (`int | None` -> [int, NoneType]), or the annotation itself."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return list(typing.get_args(annotation))
    return [annotation]


def _unwrap(annotation: Any) -> tuple[set[type], bool]:
    """(the non-None types of an annotation, whether None is allowed)."""
    args = _members(annotation)
    optional = type(None) in args
    return {typing.get_origin(a) or a for a in args if a is not type(None)}, optional


def check_types(cls: type, data: dict[str, Any], where: str) -> None:
    """Refuse values of the wrong type for `cls`'s fields (a bool must be a bool, a number a number), as a
    config file can hold any: one line naming the file, the key and the expected type."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name not in hints:
            continue
        expected = _members(hints[name])
        if not any(_is_instance(value, kind) for kind in expected):
            names = " or ".join(_type_name(kind) for kind in expected)
            raise ValueError(f"{where}: {name} must be {names}, got {value!r} ({type(value).__name__}).")


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


def _scalar(kind: type, optional: bool):
    def convert(text: str):
        if optional and text.lower() in NONE_WORDS:
            return None
        return kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in its error messages
    return convert


def _describe(field: dataclasses.Field, defaults: dict[str, Any]) -> str:
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = None
    default = defaults.get(field.name, default)
    return (field.metadata.get("help", "") + f" (default: {default})").replace("%", "%%")


def changed_fields(config: Any) -> dict[str, Any]:
    """The fields of a workflow's default config that differ from its dataclass's own defaults."""
    stock = type(config)()
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(stock, f.name)
    }


def add_dataclass_arguments(
    group: argparse._ActionsContainer, cls: type, defaults: dict[str, Any] | None = None
) -> None:
    """One option per field of `cls`; absent options are left out of the namespace (SUPPRESS). `defaults`:
    the values a workflow uses instead of the dataclass's, shown in the help."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kinds, optional = _unwrap(hints[field.name])
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": _describe(field, defaults or {}),
        }
        if kinds == {bool}:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif list in kinds:
            kwargs.update(nargs="+", metavar=field.name.upper())
        else:
            kind = next(iter(kinds))
            kwargs.update(type=_scalar(kind, optional), metavar=kind.__name__.upper())
        group.add_argument(flag_name(field.name), **kwargs)


def _list_value(values: list[str], kinds: set[type]) -> list[str] | str | None:
    """CLI words of a list field: 'none' -> None; one 'all-linear' or regex word -> a string (if allowed)."""
    if len(values) == 1 and values[0].lower() in NONE_WORDS:
        return None
    if str in kinds and len(values) == 1 and (values[0] == "all-linear" or _REGEX_CHARS.search(values[0])):
        return values[0]
    return values


def _cli_values(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    given = vars(namespace)
    out = {}
    for field in dataclasses.fields(cls):
        if field.name in given:
            kinds, _ = _unwrap(hints[field.name])
            value = given[field.name]
            out[field.name] = (
                _list_value(value, kinds) if list in kinds and isinstance(value, list) else value
            )
    return out


def build_configs(
    namespace: argparse.Namespace,
    sections: dict[str, type],
    defaults: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Config objects per section from `defaults` (else the dataclass defaults), the optional `--config`
    file, and the given flags, each overriding the one before."""
    config_file = getattr(namespace, "config", None)
    values = {name: dict((defaults or {}).get(name, {})) for name in sections}
    if config_file:
        from_file = split_sections(read_config_file(config_file), sections, str(config_file))
        for name, cls in sections.items():
            check_types(cls, from_file[name], str(config_file))
            values[name].update(from_file[name])
    configs = {}
    for name, cls in sections.items():
        values[name].update(_cli_values(namespace, cls))
        configs[name] = dataclass_from_dict(cls, values[name], f"{cls.__name__} options")
    return configs


def configure_logging(quiet: bool) -> None:
    """INFO logs (or only warnings, without progress bars, with `quiet`) for a command's run."""
    import transformers

    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("finegates").setLevel(level)
    transformers.logging.set_verbosity_error() if quiet else transformers.logging.set_verbosity_warning()
    if quiet:
        transformers.logging.disable_progress_bar()
        _quiet_datasets()


def _quiet_datasets() -> None:
    try:
        import datasets
    except ImportError:
        return
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
