"""What each kind of run records in its metrics.json: one dataclass per run kind.

A workflow fills its record as it goes and writes `record.to_dict()`; `read_result` reads a run folder
back into the record of its kind (`run` in the file; folders written before it existed are told by their
keys, and their older key names are read too).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from finegates.config import dataclass_from_dict

METRICS_NAME = "metrics.json"


@dataclass
class RunResult:
    """Base of the records: `to_dict` adds the run kind."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.kind, **dataclasses.asdict(self)}


@dataclass
class FinetuneResult(RunResult):
    """`finegates finetune`: accuracies (dense baseline, gated, compacted), parameters, the sparsity report
    without its per-layer rows (`layers` holds them), the budget's outcome, latency and timings."""

    kind: ClassVar[str] = "finetune"
    model: str
    task: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float | None] = field(default_factory=dict)
    validation: list[dict[str, float]] = field(default_factory=list)
    parameters: dict[str, int | None] = field(default_factory=dict)
    sparsity: dict[str, Any] = field(default_factory=dict)
    full_widths: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    compress: dict[str, float | None] = field(default_factory=dict)
    budget: dict[str, Any] | None = None
    latency: dict[str, Any] = field(default_factory=dict)
    report: str | None = None


@dataclass
class PosttrainResult(RunResult):
    """`finegates posttrain`: held-out perplexity and zero-shot accuracy of the dense, gated (FineGates
    only) and compacted models, with their prefill and decode speed; the sparsity report and budget."""

    kind: ClassVar[str] = "posttrain"
    dense: dict[str, float]
    method: str = "finegates"  # folders from before the baselines have no entry: FineGates
    model_params: int = 0
    compacted: dict[str, float] = field(default_factory=dict)
    gated: dict[str, float] | None = None
    sparsity: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] | None = None
    trainable_params: int = 0
    train_s: float = 0.0
    prefill_speedup: float | None = None
    decode_speedup: float | None = None


@dataclass
class PretrainResult(RunResult):
    """`finegates pretrain`: the dense and the gated model trained from scratch at equal steps."""

    kind: ClassVar[str] = "pretrain"
    dense: dict[str, Any]
    gated: dict[str, Any]
    sparsity: dict[str, Any]
    bits_per_byte: dict[str, float]
    compacted: dict[str, Any] = field(default_factory=dict)  # perplexity, parameters, speed (older: none)


RESULTS: dict[str, type[RunResult]] = {c.kind: c for c in (FinetuneResult, PosttrainResult, PretrainResult)}
# Keys of folders written before the records: posttrain's compacted model was "compressed".
_OLD_KEYS = {"posttrain": {"compressed": "compacted"}}


def result_from_dict(data: dict[str, Any], where: str = METRICS_NAME) -> RunResult:
    """The record of a metrics.json mapping (any version)."""
    data = dict(data)
    kind = data.pop("run", None) or _kind_by_keys(data)
    if kind not in RESULTS:
        raise ValueError(f"{where}: unknown run kind {kind!r}; known: {sorted(RESULTS)}.")
    for old, new in _OLD_KEYS.get(kind, {}).items():
        if old in data:
            data[new] = data.pop(old)
    try:
        return dataclass_from_dict(RESULTS[kind], data, where)
    except TypeError as err:  # a required entry is missing
        raise ValueError(f"{where} is not a complete {kind} record: {err}.") from err


def read_result(directory: str | Path) -> RunResult:
    """The record in a run folder's metrics.json."""
    path = Path(directory) / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {directory} a finished finegates run?")
    return result_from_dict(json.loads(path.read_text()), str(path))


def _kind_by_keys(data: dict[str, Any]) -> str:
    if "compressed" in data or "compacted" in data:
        return "posttrain"
    return "pretrain" if "bits_per_byte" in data else "finetune"
