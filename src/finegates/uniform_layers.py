"""`GatesConfig.uniform_layers`: every layer keeps the same numbers of KV groups, query heads per group and
FFN channels (Sheared-LLaMA's target shape), so the compacted model is a stock config and class.

After the budget's projection (every optimizer step, and in `finalize_gates`), `equalize_layers` sets each
layer's count of open units to one common count: the mean over layers, rounded to the nearest. In finalize,
where at least the target must be removed, FFN channels (the finest unit) then leave in every layer alike
until it is: rounding the KV groups or heads down instead would take a whole group or head out of every
layer at once (on SmolLM2 at 40%: 3 KV groups -> 1, 46.3% removed). In every layer the units with the
largest gate margins stay open, so a layer gives up its weakest units and takes back its strongest closed
ones: the ranking stays the gates' own. Query heads count inside the kept KV groups (a head of a closed
group reads nothing). In finalize the kept residual dims are also cut down to a multiple of the head
count, the stock config's rule for `hidden_size`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from finegates.gates import Gate, gate_margin, landed
from finegates.latency import budget_fraction
from finegates.ties import RuntimeGates, runtime_gates

logger = logging.getLogger(__name__)


def _keep_top(gate: Gate, keep: torch.Tensor, landing: float) -> int:
    """Open exactly the units in `keep` (bool mask), moving the others just past their closing point and
    the closed ones in `keep` just past it the other way; returns how many gates moved."""
    margin = gate_margin(gate)
    close, reopen = ~keep & (margin > 0), keep & (margin <= 0)
    with torch.no_grad():
        gate.param.copy_(landed(gate, gate.param, close, reopen, landing))
    return int(close.sum() + reopen.sum())


def _top_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[scores.argsort(descending=True, stable=True)[:count]] = True
    return keep


def _common(counts: list[float], minimum: int = 1) -> int:
    """The count nearest to the mean of `counts` (at least `minimum`)."""
    return max(minimum, round(sum(counts) / len(counts)))


def _open_count(gate: Gate) -> int:
    return int((gate_margin(gate) > 0).sum())


def _equalize_channels(ties: RuntimeGates, landing: float, fewer: int = 0) -> int:
    """Equal FFN channel counts (`fewer` below the common count)."""
    blocks = [b for b in ties.blocks if "channels" in b]
    if not blocks:
        return 0
    n = max(1, _common([_open_count(b["channels"]) for b in blocks]) - fewer)
    return sum(_keep_top(b["channels"], _top_mask(gate_margin(b["channels"]), n), landing) for b in blocks)


def _equalize_heads(ties: RuntimeGates, landing: float) -> int:
    blocks = [b for b in ties.blocks if "heads" in b]
    if not blocks:
        return 0
    if not all("kv_heads" in b for b in blocks):  # one head per KV group: equal head counts
        n = _common([_open_count(b["heads"]) for b in blocks])
        return sum(_keep_top(b["heads"], _top_mask(gate_margin(b["heads"]), n), landing) for b in blocks)
    groups = len(blocks[0]["kv_heads"].param)
    heads = [gate_margin(b["heads"]).view(groups, -1) for b in blocks]
    # a group is alive while its KV gate and one of its query heads are open: scored by the weaker of them
    scores = [torch.minimum(gate_margin(b["kv_heads"]), h.max(1).values) for b, h in zip(blocks, heads)]
    n_kv = _common([int((score > 0).sum()) for score in scores])
    kept = [_top_mask(score, n_kv) for score in scores]
    m = _common([int((h[k] > 0).sum()) / n_kv for h, k in zip(heads, kept)])
    moved = 0
    for b, h, k in zip(blocks, heads, kept):
        moved += _keep_top(b["kv_heads"], k, landing)
        keep = torch.zeros_like(h, dtype=torch.bool)
        for g in k.nonzero().flatten().tolist():
            keep[g] = _top_mask(h[g], m)
        moved += _keep_top(b["heads"], keep.flatten(), landing)
    return moved


def head_count(ties: RuntimeGates) -> int:
    """Query heads every layer keeps (after `equalize_layers`), counting only open KV groups."""
    b = next((b for b in ties.blocks if "heads" in b), None)
    if b is None:
        return 1
    heads = gate_margin(b["heads"]) > 0
    if "kv_heads" in b:
        groups = len(b["kv_heads"].param)
        heads = heads.view(groups, -1) & (gate_margin(b["kv_heads"]) > 0)[:, None]
    return max(int(heads.sum()), 1)


def equalize_layers(
    model: nn.Module, landing: float, final: bool = False, target: float | None = None
) -> int:
    """Give every layer the same counts of open KV groups, query heads per group and FFN channels (the
    nearest to their means); with `final`, also cut the kept residual dims to a multiple of the head count,
    then, while the removed fraction is below `target`, drop FFN channels in every layer alike. Returns how
    many gates moved."""
    ties = runtime_gates(model)
    if ties is None:
        raise ValueError("uniform_layers needs structure='runtime' (per-unit gates shared across a layer).")
    moved = _equalize_heads(ties, landing) + _equalize_channels(ties, landing)
    if final:
        heads = head_count(ties)
        kept = _open_count(ties.residual)
        width = max(heads, kept // heads * heads)
        if width != kept:
            logger.info(
                "uniform_layers: %d residual dims kept, cut to %d (a multiple of %d heads)",
                kept,
                width,
                heads,
            )
            moved += _keep_top(ties.residual, _top_mask(gate_margin(ties.residual), width), landing)
        while target is not None and budget_fraction(model) < target:
            step = _equalize_channels(ties, landing, fewer=1)
            if step == 0:
                raise ValueError(
                    f"uniform_layers cannot remove {target:.2%}: the smallest equal-layer shape it reached, "
                    f"{uniform_shape(ties)}, removes {budget_fraction(model):.2%}. Lower the target to at "
                    "most that, or train without uniform_layers (per-layer widths)."
                )
            moved += step
    return moved


def uniform_shape(ties: RuntimeGates) -> str:
    """The equal-layer shape the open gates keep, in words (KV groups, heads, FFN channels, residual)."""
    b = next((b for b in ties.blocks if "heads" in b), None)
    parts = []
    if b is not None and "kv_heads" in b:
        parts.append(f"{_open_count(b['kv_heads'])} KV groups")
    if b is not None:
        parts.append(f"{head_count(ties)} query heads")
    channels = next((b["channels"] for b in ties.blocks if "channels" in b), None)
    if channels is not None:
        parts.append(f"{_open_count(channels)} FFN channels")
    parts.append(f"{_open_count(ties.residual)} residual dims")
    return ", ".join(parts) + " per layer"
