"""The shapes of a compacted model, as stored in its config.json under `finegates_compact`.

Per-layer widths differ, so the stock config cannot describe a compacted model. The spec records, per
replaced module, its kept shape and whether it gathers its inputs from / scatters its outputs into the
full-width residual stream; the kept indices themselves are int64 tensors in the safetensors file.
Names are relative to the base model (`model.base_model`), so a checkpoint saved from a
ForCausalLM loads into the bare model class too; `head_linears` live outside the base model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SPEC_VERSION = 1
FAMILIES = ("rope", "bert", "gpt2")  # which compact attention module replaces the stock one


@dataclass(frozen=True)
class LinearSpec:
    out_features: int  # kept rows
    in_features: int  # kept columns
    bias: bool
    scatter_to: int | None = None  # full output width when kept rows are scattered into the residual
    gather_from: int | None = None  # full input width when kept columns are gathered from the residual

    @property
    def wrapped(self) -> bool:
        return self.scatter_to is not None or self.gather_from is not None


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int  # kept query heads
    num_kv_heads: int  # kept key/value heads
    qk_dim: int  # q/k dims kept per head (the same for every head of the layer)
    v_dim: int  # v dims kept per head
    head_dim: int  # original head size: the softmax scale stays 1 / sqrt(head_dim)
    group_size: int  # query heads per KV head when groups are regular; 0: map heads through kv_index
    rope: bool
    qk_norm: bool = False  # per-head RMSNorm of q and k over the original head_dim (Qwen3)


@dataclass(frozen=True)
class NormSpec:
    full_width: int  # a LayerNorm over kept residual dims keeps the statistics of this original width


@dataclass
class CompactSpec:
    family: str
    linears: dict[str, LinearSpec] = field(default_factory=dict)
    attention: dict[str, AttentionSpec] = field(default_factory=dict)
    head_linears: dict[str, LinearSpec] = field(default_factory=dict)
    norms: dict[str, NormSpec] = field(default_factory=dict)
    # the original residual width when the whole model keeps fewer dims (structure="runtime")
    residual_from: int | None = None
    head_norm_eps: float | None = None  # per-head q/k norms' own epsilon, where it differs from the config's
    version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompactSpec:
        """Parse and validate; a damaged config fails here (ValueError / TypeError) naming the entry."""
        _check_keys("finegates_compact", data, {f.name for f in dataclasses.fields(cls)})
        if data.get("version") != SPEC_VERSION:
            raise ValueError(f"finegates_compact version {data.get('version')!r} is not {SPEC_VERSION}.")
        if data.get("family") not in FAMILIES:
            raise ValueError(f"finegates_compact family {data.get('family')!r} is not one of {FAMILIES}.")
        return cls(
            family=data["family"],
            linears=_parse(LinearSpec, data.get("linears", {})),
            attention=_parse(AttentionSpec, data.get("attention", {})),
            head_linears=_parse(LinearSpec, data.get("head_linears", {})),
            norms=_parse(NormSpec, data.get("norms", {})),
            residual_from=_count("residual_from", data.get("residual_from")),
            head_norm_eps=_epsilon(data.get("head_norm_eps")),
        )


def _count(name: str, value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"finegates_compact {name}={value!r} is not a positive count.")
    return value


def _epsilon(value: Any) -> float | None:
    if value is not None and (not isinstance(value, (int, float)) or not 0 <= value < 1):
        raise ValueError(f"finegates_compact head_norm_eps={value!r} is not an epsilon in [0, 1).")
    return value


def _check_keys(where: str, data: Any, known: set[str], required: set[str] | None = None) -> None:
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a JSON object, got {type(data).__name__}.")
    unknown, missing = set(data) - known, (required or set()) - set(data)
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}.")


def _parse(kind: type, entries: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(entries, dict):
        raise TypeError(f"finegates_compact {kind.__name__} entries must be a JSON object.")
    fields = dataclasses.fields(kind)
    required = {f.name for f in fields if f.default is dataclasses.MISSING}
    parsed = {}
    for name, entry in entries.items():
        _check_keys(f"finegates_compact entry {name!r}", entry, {f.name for f in fields}, required)
        for key, value in entry.items():
            if value is not None and not isinstance(value, int) or (isinstance(value, int) and value < 0):
                raise ValueError(f"finegates_compact entry {name!r}: {key}={value!r} is not a count.")
        parsed[name] = kind(**entry)
    return parsed
