"""The exact compaction plan: which rows and columns of every linear layer survive.

`sparsity_report` counts parameters from this plan and `compress` slices along it, so the report
predicts the compacted model's size to the parameter.

Attention layout (exact and batched): every kept query head of a layer keeps the same number of
q/k dims and of v dims, so one `scaled_dot_product_attention` call serves the layer. A KV group that
keeps fewer dims than the layer's widest group is padded with its own closed dims (their folded
weights are zero, so the result is unchanged). Query heads map to KV heads through an index, so
KV groups may keep different numbers of query heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from finegates.coupling import READERS, WRITERS, Block, BlockGates, find_blocks, full_shape, open_where
from finegates.gates import Gate
from finegates.model import all_gates, gated_layers, gates_config
from finegates.ties import runtime_gates


@dataclass
class ModulePlan:
    rows: torch.Tensor  # kept output indices
    cols: torch.Tensor  # kept input indices
    out_features: int
    in_features: int
    scatter_rows: bool = False  # kept outputs are written back into a full-width residual
    gather_cols: bool = False  # kept inputs are gathered from a full-width residual

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)


@dataclass
class AttentionPlan:
    heads: torch.Tensor  # kept query heads (original indices)
    kv_heads: torch.Tensor  # kept KV heads (original indices)
    kv_index: torch.Tensor  # for each kept query head, the position of its KV head in kv_heads
    qk_dims: torch.Tensor  # (len(kv_heads), n_qk): kept q/k dims within a head, per KV head
    vo_dims: torch.Tensor  # (len(kv_heads), n_vo): kept v dims within a head, per KV head
    head_dim: int  # original head size (the softmax scale stays 1 / sqrt(head_dim))


@dataclass
class CompactionPlan:
    modules: dict[str, ModulePlan] = field(default_factory=dict)
    attention: dict[str, AttentionPlan] = field(default_factory=dict)
    ffn: dict[str, torch.Tensor] = field(default_factory=dict)  # block name -> kept channels
    # structure="runtime": the residual dims the whole model keeps (None: per-layer gathers/scatters)
    residual: torch.Tensor | None = None
    hidden_size: int | None = None  # the stream's full width, with `residual`


# 1.0 where a gate's eval value is non-zero (ungated modules and axes: all ones)
open_mask = open_where(Gate.closed)


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().flatten()


def _residual(mask: torch.Tensor, min_removed: int) -> tuple[torch.Tensor, bool]:
    closed = int((mask == 0).sum())
    if closed == 0 or closed < min_removed:
        return torch.arange(len(mask), device=mask.device), False
    return _nonzero(mask), True


def _padded_dims(alive: torch.Tensor, minimum: int = 1) -> torch.Tensor:
    """(groups, n) kept dims per group, padded with the group's own closed dims to a common n."""
    width = max(int(alive.sum(1).max()), minimum)
    # A stable sort puts live dims first (in order), then closed dims to pad with.
    order = torch.sort(-alive, dim=1, stable=True).indices[:, :width]
    return torch.sort(order, dim=1).values


def _attention_plan(g: BlockGates) -> AttentionPlan:
    s = g.block.shape
    alive = g.head_alive()
    if alive.sum() == 0:  # keep one head so the layer still has an attention call (its output is 0)
        alive = torch.zeros_like(alive)
        alive[0] = 1
    heads = _nonzero(alive)
    kv_of_head = heads // s.group_size
    kv_heads = torch.unique(kv_of_head)
    kv_index = torch.searchsorted(kv_heads, kv_of_head)
    qk = g.qk_units(alive)[kv_heads]
    qk_units = _padded_dims(qk)
    if g.unit == 2:  # a kept RoPE pair keeps dims u and u + d/2
        qk_dims = torch.cat([qk_units, qk_units + s.head_dim // 2], dim=1)
    else:
        qk_dims = qk_units
    vo_dims = _padded_dims(g.vo_units(alive)[kv_heads])
    return AttentionPlan(heads, kv_heads, kv_index, qk_dims, vo_dims, s.head_dim)


def _expand(heads: torch.Tensor, dims: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Flat row/col indices of `dims` (one row per head) inside heads of size head_dim."""
    return (heads[:, None] * head_dim + dims).flatten()


def _block_plans(block: Block, min_removed: int, plan: CompactionPlan) -> None:
    g = BlockGates(block, open_mask)
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    if g.has_attention():
        a = _attention_plan(g)
        plan.attention[block.name] = a
        q = _expand(a.heads, a.qk_dims[a.kv_index], a.head_dim)
        k = _expand(a.kv_heads, a.qk_dims, a.head_dim)
        v = _expand(a.kv_heads, a.vo_dims, a.head_dim)
        cols["o"] = _expand(a.heads, a.vo_dims[a.kv_index], a.head_dim)
        if block.has("qkv"):
            q_size = block.shape.num_heads * a.head_dim
            kv_size = block.shape.num_kv_heads * a.head_dim
            rows["qkv"] = torch.cat([q, k + q_size, v + q_size + kv_size])
        else:
            rows.update(q=q, k=k, v=v)
    if g.has_ffn():
        channels = _nonzero(g.ffn_units())
        plan.ffn[block.name] = channels
        rows.update({r: channels for r in ("up", "gate") if block.has(r)})
        cols["down"] = channels
    for role, (name, module) in block.modules.items():
        out_features, in_features = full_shape(module)
        mp = ModulePlan(
            rows.get(role, torch.arange(out_features)),
            cols.get(role, torch.arange(in_features)),
            out_features,
            in_features,
        )
        if plan.residual is not None:  # the stream itself is narrower: no gathers or scatters
            mp.cols = plan.residual if role in READERS else mp.cols
            mp.rows = plan.residual if role in WRITERS else mp.rows
        else:
            if role in READERS:
                mp.cols, mp.gather_cols = _residual(g.cols(role), min_removed)
            if role in WRITERS:
                mp.rows, mp.scatter_rows = _residual(g.rows(role), min_removed)
        plan.modules[name] = mp


# The last plan of a model, with what it was computed from: which gates are closed, the gated layers, the
# config entry it reads. A training step asks for it up to three times (the budget objective in the
# forward pass, the projection after the optimizer step, the log), and most steps close or reopen no gate.
_PLAN_CACHE = "_finegates_plan_cache"


def _plan_inputs(model: nn.Module) -> tuple[torch.Tensor, tuple]:
    with torch.no_grad():  # the plan reads nothing of the gates but Gate.closed
        closed = [gate.closed() for gate in all_gates(model)]
    layers = tuple(id(m) for m in gated_layers(model).values())
    masks = torch.cat(closed) if closed else torch.zeros(0, dtype=torch.bool)
    return masks, (layers, gates_config(model).residual_min_removed)


def compaction_plan(model: nn.Module) -> CompactionPlan:
    """The exact plan for the model's current (eval-mode) gates.

    The result is kept on the model and returned again while the same gates are closed (compared by
    value, however the gates were changed) and its gated layers and `residual_min_removed` are
    unchanged; treat it as read-only.
    """
    values, structure = _plan_inputs(model)
    cached = model.__dict__.get(_PLAN_CACHE)
    if cached is not None and cached[1] == structure and torch.equal(cached[0], values):
        return cached[2]
    plan = _build_plan(model)
    model.__dict__[_PLAN_CACHE] = (values, structure, plan)
    return plan


def _build_plan(model: nn.Module) -> CompactionPlan:
    min_removed = gates_config(model).residual_min_removed
    plan = CompactionPlan()
    ties = runtime_gates(model)
    if ties is not None:
        kept = _nonzero(~ties.residual.closed())
        # every dim closed: keep one (zero everywhere), so that the stream keeps a width
        plan.residual = kept if len(kept) else torch.zeros(1, dtype=torch.long)
        plan.hidden_size = len(ties.residual.param)
    with torch.no_grad():
        for block in find_blocks(model):
            _block_plans(block, min_removed, plan)
        for name, layer in gated_layers(model).items():
            if name in plan.modules:
                continue
            out_features, in_features = full_shape(layer)
            rows, scatter = _residual(open_mask(layer, "row"), min_removed)
            cols, gather = _residual(open_mask(layer, "col"), min_removed)
            plan.modules[name] = ModulePlan(rows, cols, out_features, in_features, scatter, gather)
    return plan
