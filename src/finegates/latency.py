"""A budget in predicted time: `GatesConfig.target_speedup` instead of `target_sparsity`.

The time of a forward pass is predicted from what compaction keeps, with a linear cost model measured once
per machine, model shape and batch shape (`calibrate`, `finegates bench --calibrate`; cached):

    time = fixed + gemm * kept GEMM weights + heads * kept heads + stream * residual width x layers

where the GEMM weights are those of the gated linears (with their coupled removals) and of the head
linears that read the stream, `heads` counts attention heads weighted by the share of their q/k and v dims
kept (the attention kernel's cost), and the stream term covers the per-dim work of norms and residual
adds. The budget then holds the removed share of predicted time at 1 - 1 / target_speedup, through the
same controller, projection and finalize as the parameter budget (`budget_fraction` is the one measure
they all read). Exact values come from the compaction plan; the gradient from the gates' open
probabilities, as for parameters.

>>> from finegates.workflows.bench import BenchConfig, calibrate
>>> cfg = BenchConfig(model="smollm2-135m", calibrate=True, batch_size=1, length=256)
>>> costs, path = calibrate(cfg)  # doctest: +SKIP
>>> GatesConfig(target_speedup=1.5, latency_costs=str(path))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from finegates.architectures import architecture_for
from finegates.coupling import BlockGates, find_blocks, full_shape
from finegates.io_utils import atomic_write_text
from finegates.layer import GatedLinear
from finegates.model import gates_config
from finegates.plan import compaction_plan, open_mask
from finegates.ties import TIES_ATTR, stream_modules

logger = logging.getLogger(__name__)

FEATURES = ("fixed", "gemm", "heads", "stream")
COSTS_VERSION = 1


@dataclass
class LatencyCosts:
    """Seconds per unit of each feature, fitted to the timings of `points` (features, seconds)."""

    model_shape: str
    machine: str
    batch_size: int
    length: int
    threads: int
    coefficients: dict[str, float]
    points: list[dict[str, float]] = field(default_factory=list)
    version: int = COSTS_VERSION

    def predict(self, features: dict[str, float | torch.Tensor]) -> float | torch.Tensor:
        return sum(self.coefficients[k] * features[k] for k in FEATURES)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LatencyCosts:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No latency costs at {path}: measure them with `finegates bench --calibrate --model ...`."
            )
        try:
            data = json.loads(path.read_text())
            if data.get("version") != COSTS_VERSION or set(data["coefficients"]) != set(FEATURES):
                raise ValueError("unknown version or features")
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is not a latency-costs file ({err}); calibrate again.") from None


def model_shape(config) -> str:
    """A key for the shapes that decide the costs (type, widths, depth, heads, vocabulary)."""
    c = config
    parts = [
        c.model_type.removeprefix("finegates_"),
        getattr(c, "hidden_size", getattr(c, "n_embd", 0)),
        getattr(c, "num_hidden_layers", getattr(c, "n_layer", 0)),
        getattr(c, "num_attention_heads", getattr(c, "n_head", 0)),
        getattr(c, "num_key_value_heads", None) or getattr(c, "num_attention_heads", getattr(c, "n_head", 0)),
        getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 0,
        c.vocab_size,
    ]
    return "-".join(str(p) for p in parts)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    return f"{platform.machine()}-{cpu}-{os.cpu_count()}cores-torch{torch.__version__}"


def default_costs_path(config, batch_size: int, length: int, threads: int) -> Path:
    root = Path(os.environ.get("FINEGATES_CACHE", Path.home() / ".cache" / "finegates")) / "latency"
    key = f"{model_shape(config)}_{batch_size}x{length}_{threads}t_{machine()}".replace("/", "_")
    return root / f"{key.replace(' ', '_')}.json"


# -- features -----------------------------------------------------------------------------------------
def _readers_out(model: nn.Module, hidden: int) -> int:
    """Output width of the linears outside the blocks that read the stream (the LM or task head)."""
    arch = architecture_for(model.config.model_type)
    return sum(full_shape(m)[0] for m in stream_modules(model, arch, hidden)["readers"].values())


def exact_features(model: nn.Module) -> dict[str, float]:
    """The cost-model features of what compaction keeps now (eval-mode gates)."""
    plan = compaction_plan(model)
    hidden = plan.hidden_size or model.config.hidden_size
    width = len(plan.residual) if plan.residual is not None else hidden
    gemm = sum(mp.shape[0] * mp.shape[1] for mp in plan.modules.values())
    blocks = find_blocks(model)
    alive = {b.name: int(BlockGates(b, open_mask).head_alive().sum()) for b in blocks}
    heads = sum(  # a layer with every head closed keeps a placeholder head in torch: not counted
        alive[name] * (a.qk_dims.shape[1] + a.vo_dims.shape[1]) / (2 * a.head_dim)
        for name, a in plan.attention.items()
    )
    layers = len(blocks)
    return {
        "fixed": 1.0,
        "gemm": float(gemm + _readers_out(model, hidden) * width),
        "heads": float(heads),
        "stream": float(width * layers),
    }


def dense_features(model: nn.Module) -> dict[str, float]:
    """The features of the model with every gate open."""
    blocks = find_blocks(model)
    gemm = 0
    for block in blocks:
        for _, module in block.modules.values():
            rows, cols = full_shape(module)
            gemm += rows * cols
    hidden = model.config.hidden_size
    return {
        "fixed": 1.0,
        "gemm": float(gemm + _readers_out(model, hidden) * hidden),
        "heads": float(sum(b.shape.num_heads for b in blocks if BlockGates(b, _ones).has_attention())),
        "stream": float(hidden * len(blocks)),
    }


def _ones(module: nn.Module, axis: str) -> torch.Tensor:
    rows, cols = full_shape(module)
    return torch.ones(rows if axis == "row" else cols)


def soft_features(model: nn.Module) -> dict[str, torch.Tensor]:
    """The features as expected under the gates' open probabilities (differentiable)."""
    from finegates.objectives import _kept_params, _prob_open

    hidden = model.config.hidden_size
    ties = getattr(model, TIES_ATTR, None)
    width = ties.residual.prob_open().sum() if ties is not None else torch.tensor(float(hidden))
    heads = []
    blocks = find_blocks(model)
    for block in blocks:
        g = BlockGates(block, _prob_open)
        if g.has_attention():
            heads.append(g.head_alive().sum())
    ungated = sum(
        full_shape(m)[0] * full_shape(m)[1]
        for b in blocks
        for _, m in b.modules.values()
        if not isinstance(m, GatedLinear)
    )
    return {
        "fixed": torch.tensor(1.0),
        "gemm": _kept_params(model, _prob_open) + ungated + _readers_out(model, hidden) * width,
        "heads": torch.stack(heads).sum() if heads else torch.tensor(0.0),
        "stream": width * len(blocks),
    }


# -- the budget's one measure -----------------------------------------------------------------------
def budget_target(cfg) -> float:
    """The removed share the budget holds: of predicted time (1 - 1 / target_speedup) or of parameters."""
    return 1 - 1 / cfg.target_speedup if cfg.target_speedup else cfg.target_sparsity


@functools.lru_cache(maxsize=8)
def _cached_costs(path: str, mtime: float, shape: str) -> LatencyCosts:
    """The costs file, checked once against the model shape it is used for (read once per file version)."""
    costs = LatencyCosts.load(path)
    if costs.model_shape != shape:
        raise ValueError(
            f"{path} holds latency costs of another model shape ({costs.model_shape}; this model is "
            f"{shape}): calibrate this model with `finegates bench --calibrate --model ...`."
        )
    if costs.machine != machine():
        logger.warning(
            "%s was calibrated on another machine (%s; this one is %s): its predicted times may not hold",
            path,
            costs.machine,
            machine(),
        )
    return costs


def costs_for(model: nn.Module) -> LatencyCosts:
    """The cost model the model's config names (read once per file version)."""
    path = gates_config(model).latency_costs
    if not path:
        raise ValueError(
            "target_speedup needs latency_costs: measure them with `finegates bench --calibrate --model "
            "...` and pass the file it writes."
        )
    mtime = os.path.getmtime(path) if os.path.exists(path) else 0.0
    return _cached_costs(path, mtime, model_shape(model.config))


def predicted_speedup(model: nn.Module, costs: LatencyCosts | None = None) -> float:
    costs = costs or costs_for(model)
    return float(costs.predict(dense_features(model)) / costs.predict(exact_features(model)))


def budget_fraction(model: nn.Module) -> float:
    """The removed share the budget measures, exactly: of gated parameters, or (`target_speedup`) of the
    predicted time."""
    from finegates.report import sparsity_report

    if not gates_config(model).target_speedup:
        return sparsity_report(model).removed_fraction
    return 1 - 1 / predicted_speedup(model)


def soft_time_fraction(model: nn.Module) -> torch.Tensor:
    """The removed share of predicted time under the open probabilities (differentiable)."""
    costs = costs_for(model)
    return 1 - costs.predict(soft_features(model)) / costs.predict(dense_features(model))
