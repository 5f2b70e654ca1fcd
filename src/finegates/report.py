"""`sparsity_report`: what compaction will remove, per layer and in total, counted from the exact plan."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from finegates.architectures import architecture_for
from finegates.coupling import full_shape, has_bias
from finegates.model import CONTROLLER_ATTR, gate_parameter_ids, gated_layers, gates_config
from finegates.plan import CompactionPlan, compaction_plan
from finegates.ties import stream_modules


@dataclass
class LayerRow:
    name: str
    gated: bool
    shape: tuple[int, int]
    kept_shape: tuple[int, int]
    params: int
    kept_params: int

    @property
    def removed(self) -> int:
        return self.params - self.kept_params


@dataclass
class BlockRow:
    name: str
    heads: int
    kv_heads: int
    qk_dims: int
    vo_dims: int
    ffn_channels: int | None


@dataclass
class SparsityReport:
    target: float | None  # of gated parameters; None when the budget is in predicted time (below)
    layers: list[LayerRow] = field(default_factory=list)
    blocks: list[BlockRow] = field(default_factory=list)
    model_params: int = 0
    target_speedup: float | None = None

    @property
    def gated_params(self) -> int:
        return sum(r.params for r in self.layers if r.gated)

    @property
    def gated_removed(self) -> int:
        return sum(r.removed for r in self.layers if r.gated)

    @property
    def removed_fraction(self) -> float:
        """Fraction of gated-layer parameters that compaction removes."""
        return self.gated_removed / max(self.gated_params, 1)

    @property
    def model_removed(self) -> int:
        return sum(r.removed for r in self.layers)

    @property
    def model_removed_fraction(self) -> float:
        return self.model_removed / max(self.model_params, 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            gated_params=self.gated_params,
            gated_removed=self.gated_removed,
            removed_fraction=self.removed_fraction,
            model_removed=self.model_removed,
            model_removed_fraction=self.model_removed_fraction,
        )
        return out

    def __str__(self) -> str:
        goal = (
            f"target speedup {self.target_speedup:.2f}x (predicted time)"
            if self.target_speedup
            else f"target sparsity {self.target:.1%}"
        )
        lines = [
            (
                f"{goal} | removed {self.removed_fraction:.2%} of gated-layer "
                f"params ({self.gated_removed:,d} / {self.gated_params:,d}) | whole model: "
                f"{self.model_removed:,d} / {self.model_params:,d} ({self.model_removed_fraction:.2%})"
            ),
            f"{'layer':<56} {'shape':>12} {'kept':>12} {'removed':>8}",
        ]
        for r in self.layers:
            shape, kept = "x".join(map(str, r.shape)), "x".join(map(str, r.kept_shape))
            lines.append(f"{r.name:<56} {shape:>12} {kept:>12} {r.removed / r.params:>8.1%}")
        for b in self.blocks:
            lines.append(
                f"{b.name}: heads {b.heads} (kv {b.kv_heads}), qk dims {b.qk_dims}, v dims {b.vo_dims}, "
                f"ffn channels {b.ffn_channels}"
            )
        return "\n".join(lines)


def _layer_rows(model: nn.Module, plan: CompactionPlan) -> list[LayerRow]:
    gated = gated_layers(model)
    rows = []
    for name, mp in plan.modules.items():
        module = model.get_submodule(name)
        bias = has_bias(module)
        out_k, in_k = mp.shape
        rows.append(
            LayerRow(
                name=name,
                gated=name in gated,
                shape=(mp.out_features, mp.in_features),
                kept_shape=(out_k, in_k),
                params=mp.out_features * mp.in_features + (mp.out_features if bias else 0),
                kept_params=out_k * in_k + (out_k if bias else 0),
            )
        )
    return rows


def _stream_rows(model: nn.Module, plan: CompactionPlan) -> list[LayerRow]:
    """With a shared residual mask: the embeddings, norms and head linears that the narrower stream
    shrinks too (an LM head tied to the embeddings is counted once)."""
    arch = architecture_for(model.config.model_type)
    full, kept = plan.hidden_size, len(plan.residual)
    parts = stream_modules(model, arch, full)
    rows = []

    def add(name: str, other: int, extra: int = 0) -> None:
        """A module of `other` x residual-width parameters (+ `extra`)."""
        rows.append(
            LayerRow(name, False, (other, full), (other, kept), other * full + extra, other * kept + extra)
        )

    for name, embedding in parts["embeddings"].items():
        add(name, embedding.num_embeddings)
    for name, norm in parts["norms"].items():
        add(name, 2 if getattr(norm, "bias", None) is not None else 1)
    tied_to = {id(e.weight) for e in parts["embeddings"].values()}
    for name, module in parts["readers"].items():
        out_features, _ = full_shape(module)
        bias = out_features if has_bias(module) else 0
        if id(module.weight) not in tied_to:  # a tied head shrinks with the embedding it shares
            add(name, out_features, bias)
    return rows


def _block_rows(plan: CompactionPlan) -> list[BlockRow]:
    names = list(dict.fromkeys([*plan.attention, *plan.ffn]))
    rows = []
    for name in names:
        a = plan.attention.get(name)
        ffn = plan.ffn.get(name)
        rows.append(
            BlockRow(
                name=name,
                heads=len(a.heads) if a else 0,
                kv_heads=len(a.kv_heads) if a else 0,
                qk_dims=a.qk_dims.shape[1] if a else 0,
                vo_dims=a.vo_dims.shape[1] if a else 0,
                ffn_channels=len(ffn) if ffn is not None else None,
            )
        )
    return rows


def base_parameter_count(model: nn.Module) -> int:
    """Parameters of the underlying model: gates and the controller excluded; a weight that progressive
    compaction freed counts at its original size."""
    gate_ids = gate_parameter_ids(model)
    freed = {
        id(layer.weight): layer.out_features * layer.in_features
        for layer in gated_layers(model).values()
        if not layer.dense_kept
    }
    return sum(
        freed.get(id(p), p.numel())
        for n, p in model.named_parameters()
        if id(p) not in gate_ids and not n.startswith(CONTROLLER_ATTR)
    )


# The report of the cached compaction plan (`plan.compaction_plan`): a training step asks for the removed
# fraction two or three times on the same gates. Treat it as read-only.
_REPORT_CACHE = "_finegates_report_cache"


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Per-layer and total kept widths and removable parameters of a gated model (eval-mode gates).

    >>> print(sparsity_report(model))  # doctest: +SKIP
    """
    plan, cfg = compaction_plan(model), gates_config(model)
    # a budget in predicted time (`target_speedup`) ignores target_sparsity: no parameter target then
    target = (None, cfg.target_speedup) if cfg.target_speedup else (cfg.target_sparsity, None)
    cached = model.__dict__.get(_REPORT_CACHE)
    if cached is not None and cached[0] is plan and cached[1] == target:
        return cached[2]  # the plan is the cached one: the gates have not changed since
    stream = _stream_rows(model, plan) if plan.residual is not None else []
    report = SparsityReport(
        target=target[0],
        layers=_layer_rows(model, plan) + stream,
        blocks=_block_rows(plan),
        model_params=base_parameter_count(model),
        target_speedup=target[1],
    )
    model.__dict__[_REPORT_CACHE] = (plan, target, report)
    return report
