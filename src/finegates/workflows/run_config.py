"""Run configs: dataclasses that round-trip through JSON, read from YAML/JSON files, written per run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finegates.io_utils import atomic_write_text

RUN_CONFIG_NAME = "run_config.json"


@dataclass
class PrecisionOptions:
    """The training step's floating-point precision."""

    bf16: bool = field(
        default=False,
        metadata={
            "help": "Train with bfloat16 autocast (transformers' bf16=True): the GEMMs of both passes run in "
            "bfloat16, weights, gates and optimizer state stay float32. Faster on CPUs with AVX512-BF16 or "
            "AMX and on GPUs with bfloat16 (Ampere and later); evaluation stays float32."
        },
    )


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
    if not isinstance(data, dict):  # a user's file, not an argument: the CLI's one-line error
        raise ValueError(f"Config file {path} must hold a mapping of option names to values.")  # noqa: TRY004
    return data


def run_config_payload(sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{section: dataclass}` as the JSON-ready mapping `run_config.json` holds."""
    return json.loads(json.dumps({name: dataclasses.asdict(value) for name, value in sections.items()}))


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


def base_model_of(adapter: Path, given: str | None = None) -> str:
    """The base model of a gate adapter: `given`, else the model its run's run_config.json names."""
    if given:
        return given
    run_config = Path(adapter).parent / RUN_CONFIG_NAME
    if not run_config.is_file():
        raise ValueError(
            f"{adapter} is a gate adapter with no {RUN_CONFIG_NAME} next to it to read its base model from: "
            "pass --base-model."
        )
    try:
        sections = json.loads(run_config.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{run_config} cannot be read ({err}): pass --base-model.") from None
    if not isinstance(sections, dict):
        raise ValueError(f"{run_config} is not a run's config (not a mapping): pass --base-model.")  # noqa: TRY004
    models = [s["model"] for s in sections.values() if isinstance(s, dict) and "model" in s]
    if not models:
        raise ValueError(f"{run_config} names no model: pass --base-model.")
    return models[0]
