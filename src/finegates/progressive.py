"""Progressive compaction: what the gates closed in training leaves the frozen weights while training goes on.

Every `GatesConfig.compact_every` steps, the FFN channels and attention heads (and with them KV groups left
without a head) whose gates are past their closing point by `compact_margin` x the edge (0.1: where the
budget projection lands the gates it closes) are cut out of the frozen weights of their layers
(`GatedLinear.keep_`), so the remaining steps multiply smaller matrices.

- **Closed for good.** A removed unit's gates are marked `removed` and held closed: the budget projection and
  `finalize_gates` never reopen them, and the marks travel in checkpoints and adapters.
- **Nothing to re-index.** Gate vectors, trained biases, the optimizer's state and the multipliers keep the
  base model's length (a layer reads them at its kept indices), so checkpoints resume and `save_gates` loads
  on the original base model as before; the gate vectors are a few hundred thousandths of the weights.
- **Stock modules.** The attention modules read their head count off the projections' widths; the
  architecture table names the attributes that count heads (`Architecture.head_attrs`). Under grouped-query
  attention every KV group keeps the same number of query heads, padded with its own dead heads.
- **The stream narrows too** (the runtime structure): residual dims whose shared gate is closed past the
  margin leave every reader's columns and writer's rows, the embeddings' outputs, the norms (over the
  kept dims with the full width's statistics: the closed dims are zero) and the frozen heads outside the
  blocks (an LM head: a copy of its kept columns); a trained head reads the stream scattered back to the
  full width (`narrow_stream`). The stock weights of the embeddings, norms and heads are kept, so
  `compress`, reports and a bypassed teacher read them as before.
- **What stays until `compress`:** the fine structure's residual dims (per layer) and partial head dims (its
  q/k and v/o dims inside a live head): cutting them needs gathers or the compact attention module.
- **Teachers.** Distillation runs the same weights with the gates bypassed, so it needs the full weights:
  `keep_dense=True` keeps them beside the cut copy.

>>> compact_closed(model)  # doctest: +SKIP
Cut(heads=3, kv_heads=1, channels=120, weights=95232, residual=0)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import TrainerCallback

from finegates.architectures import architecture_for
from finegates.coupling import READERS, WRITERS, Block, BlockGates, find_blocks, full_shape, open_where
from finegates.gates import Gate, TiedGate, gate_margin
from finegates.layer import LINEAR_TYPES, GatedLinear
from finegates.model import HEAD_ATTRS, gated_layers, gates_config
from finegates.ties import (
    StreamLayerNorm,
    StreamReader,
    StreamRMSNorm,
    _ScatterToFullWidth,
    rms_norm_over_kept,
    runtime_gates,
    stream_modules,
)

logger = logging.getLogger(__name__)

ATTENTION_ROLES = (("q", "k", "v", "o"), ("qkv", "o"))
FFN_ROLES = ("up", "down")


@dataclass
class Cut:
    """What one compaction took out: query heads, KV groups, FFN channels, frozen weight entries."""

    heads: int = 0
    kv_heads: int = 0
    channels: int = 0
    weights: int = 0
    residual: int = 0  # residual-stream dims (the runtime structure's shared mask)

    def __add__(self, other: Cut) -> Cut:
        return Cut(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


_present = open_where(lambda gate: gate.removed)


def _closed_past(margin: float):
    # closed, and `margin` past closing (a relative slack: gates the projection landed exactly there count)
    def closed(gate: Gate) -> torch.Tensor:
        return gate.removed | (gate.closed() & (gate_margin(gate) <= -margin * gate.edge * (1 - 1e-6)))

    return closed


def _removable(margin: float):
    return open_where(_closed_past(margin))


def _gated(block: Block, roles: tuple[str, ...]) -> bool:
    return all(isinstance(block.modules.get(r, (None, None))[1], GatedLinear) for r in roles)


def _has_attention(block: Block) -> bool:
    return any(_gated(block, roles) for roles in ATTENTION_ROLES)


def _has_ffn(block: Block) -> bool:
    return _gated(block, FFN_ROLES) and (not block.has("gate") or _gated(block, ("gate",)))


# -- deciding what goes ------------------------------------------------------------------------------


def _kept_heads(live: torch.Tensor, present: torch.Tensor, groups: int) -> torch.Tensor:
    """Query heads to keep: the live ones, and in every KV group that keeps one, as many present dead
    heads as it takes for every kept group to hold the same number (stock grouped-query attention)."""
    live, present = live.view(groups, -1), present.view(groups, -1)
    counts = live.sum(1)
    if counts.sum() == 0:  # keep one head, so the layer still has an attention call (its output is 0)
        keep = torch.zeros_like(present)
        first = int(present.flatten().nonzero()[0])
        keep.view(-1)[first] = True
        return keep.flatten()
    width = int(counts.max())
    # in each kept group: live heads first, then present dead heads, in index order
    rank = torch.cumsum(present & ~live, 1) + counts[:, None]
    keep = live | (present & ~live & (rank <= width))
    return (keep & (counts > 0)[:, None]).flatten()


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row mask of per-head mask `heads`."""
    return heads.repeat_interleave(head_dim)


def _mark(module: GatedLinear, axis: str, mask: torch.Tensor, bound: float | None) -> None:
    gate = module.gates().get(axis)
    if gate is None or not mask.any():
        return
    if isinstance(gate, TiedGate):
        gate.source.remove_(gate.units(mask), bound)
    else:
        gate.remove_(mask, bound)


def _role_masks(block: Block, role_rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Row masks per role, with a fused qkv projection's three parts concatenated."""
    if not block.has("qkv"):
        return role_rows
    rest = {role: mask for role, mask in role_rows.items() if role not in ("q", "k", "v")}
    return {**rest, "qkv": torch.cat([role_rows["q"], role_rows["k"], role_rows["v"]])}


def _mark_block(block: Block, margin: float, bound: float | None) -> Cut:
    cut = Cut()
    removable = BlockGates(block, _removable(margin))
    present = BlockGates(block, _present)
    layers = {role: module for role, (_, module) in block.modules.items()}
    if _has_ffn(block):
        dead = (removable.ffn_units() == 0) & (present.ffn_units() > 0)
        for role in ("up", "gate"):
            if block.has(role):
                _mark(layers[role], "row", dead, bound)
        _mark(layers["down"], "col", dead, bound)
        cut.channels = int(dead.sum())
    if _has_attention(block):
        s = block.shape
        here = present.head_alive() > 0
        keep = _kept_heads((removable.head_alive() > 0) & here, here, s.num_kv_heads)
        gone = here & ~keep
        kv_gone = here.view(s.num_kv_heads, -1).any(1) & ~keep.view(s.num_kv_heads, -1).any(1)
        head_rows, kv_rows = _rows(gone, s.head_dim), _rows(kv_gone, s.head_dim)
        rows = _role_masks(block, {"q": head_rows, "k": kv_rows, "v": kv_rows})
        for role, mask in rows.items():
            _mark(layers[role], "row", mask, bound)
        _mark(layers["o"], "col", head_rows, bound)
        cut.heads, cut.kv_heads = int(gone.sum()), int(kv_gone.sum())
    return cut


# -- cutting the weights to what is marked --------------------------------------------------------------


def _indices(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().flatten()


def _attention_widths(model: nn.Module, block: Block, arch) -> dict[str, torch.Tensor]:
    """Kept rows of the attention projections and the output's kept cols ("o_cols"); resets the stock
    attention module's head-counting attributes to match."""
    s = block.shape
    heads = BlockGates(block, _present).head_alive() > 0
    per_group = heads.view(s.num_kv_heads, -1).sum(1)
    groups = per_group > 0
    if len(set(per_group[groups].tolist())) != 1:
        raise ValueError(
            f"{block.name}: the removed heads leave KV groups with {per_group.tolist()} query heads; stock "
            "grouped-query attention needs the same number in every group (a damaged checkpoint?)."
        )
    q, kv = _rows(heads, s.head_dim), _rows(groups, s.head_dim)
    projection = block.modules["qkv" if block.has("qkv") else "q"][0]
    module = model.get_submodule(projection.rpartition(".")[0])
    values = {"group_size": int(per_group[groups][0]), "q_width": int(heads.sum()) * s.head_dim}
    compact = {attr: values[what] for attr, what in arch.head_attrs.items()}
    # a bypassed (dense) forward needs the stock values back: `set_gates_enabled` switches them
    saved = module.__dict__.setdefault(HEAD_ATTRS, {True: {}, False: {}})
    for attr, value in compact.items():
        saved[False].setdefault(attr, getattr(module, attr))
        saved[True][attr] = value
        setattr(module, attr, value)
    return {**_role_masks(block, {"q": q, "k": kv, "v": kv}), "o_cols": q}


def _stream_kept(model: nn.Module) -> torch.Tensor | None:
    """The residual dims the stream keeps (a mask; at least one), None where it cannot narrow: the fine
    structure, or a block that reads or writes the stream through a layer progressive compaction cannot
    cut."""
    ties = runtime_gates(model)
    if ties is None or not ties.residual.removed.any():
        return None
    for block in find_blocks(model):
        for role, (_, module) in block.modules.items():
            if role in READERS + WRITERS and not (
                isinstance(module, GatedLinear) and isinstance(module.base_layer, LINEAR_TYPES)
            ):
                return None
    kept = ~ties.residual.removed
    if not kept.any():
        kept = kept.clone()
        kept[0] = True  # the stream keeps one dim (zero): the layers still have an input
    return kept


def apply_removed(model: nn.Module, keep_dense: bool = False) -> int:
    """Cut every gated layer's frozen weight to the units its gates' `removed` marks leave (after
    `compact_closed` marked them, or a checkpoint or adapter with marks was loaded into a full model),
    and narrow the runtime structure's stream to its kept residual dims; returns the number of weight
    entries the model no longer multiplies."""
    arch = architecture_for(model.config.model_type)
    stream = _stream_kept(model)
    if stream is not None:
        check_stream_norms(model)
    for block in find_blocks(model):
        rows: dict[str, torch.Tensor] = {}
        cols: dict[str, torch.Tensor] = {}
        if stream is not None:
            cols.update({role: stream for role in block.modules if role in READERS})
            rows.update({role: stream for role in block.modules if role in WRITERS})
        if _has_attention(block):
            widths = _attention_widths(model, block, arch)
            cols["o"] = widths.pop("o_cols")
            rows.update(widths)
        if _has_ffn(block):
            channels = BlockGates(block, _present).ffn_units() > 0
            rows.update({r: channels for r in ("up", "gate") if block.has(r)})
            cols["down"] = channels
        for role in rows.keys() | cols.keys():
            layer = block.modules[role][1]
            out_features, in_features = full_shape(layer)
            keep_rows = _indices(rows[role]) if role in rows else torch.arange(out_features)
            keep_cols = _indices(cols[role]) if role in cols else torch.arange(in_features)
            had_rows, had_cols = layer.kept_axes()
            if len(keep_rows) != len(had_rows) or len(keep_cols) != len(had_cols):
                layer.keep_(keep_rows, keep_cols, keep_dense)
    if stream is not None:
        narrow_stream(model, _indices(stream))
    return removed_weights(model)


def narrow_stream(model: nn.Module, kept: torch.Tensor) -> None:
    """Make the runtime structure's stream carry only the residual dims `kept` (sorted indices) outside
    the gated layers, whose weights `apply_removed` cuts: the embeddings' stream mask keeps those dims of
    their outputs, the norms compute over them with the full width's statistics, a frozen linear head
    outside the blocks multiplies them by its kept columns, and a trained one gets its input scattered
    back to the full width. The stock weights stay as they are."""
    ties = runtime_gates(model)
    first = ties.stream_kept is None
    ties.stream_kept = kept = kept.to(ties.residual.param.device)
    parts = _stream_parts(model)
    if first:
        for norm in parts["norms"].values():
            if not isinstance(norm, StreamLayerNorm):
                _mix_in(norm, StreamRMSNorm, ties)
        for module in parts["readers"].values():
            if type(module) is nn.Linear and not any(p.requires_grad for p in module.parameters()):
                _mix_in(module, StreamReader, ties)
            else:  # a trained head reads the full width again: its parameters keep their shape
                module.register_forward_pre_hook(_ScatterToFullWidth(ties))
    for module in parts["readers"].values():
        if isinstance(module, StreamReader):
            module.register_buffer(
                "narrow_weight", module.weight.detach().index_select(1, kept).contiguous(), persistent=False
            )


@functools.cache
def _mixed_class(mixin: type, base: type) -> type:
    return type(f"Stream{base.__name__}", (mixin, base), {})


def _mix_in(module: nn.Module, mixin: type, ties) -> None:
    """Give `module` the narrowed forward of `mixin` (same state) and a reference to the shared gates."""
    module.__class__ = _mixed_class(mixin, type(module))
    object.__setattr__(module, "finegates_ties", ties)  # a reference, not a submodule


def _stream_parts(model: nn.Module) -> dict[str, dict[str, nn.Module]]:
    ties = runtime_gates(model)
    return stream_modules(model, architecture_for(model.config.model_type), len(ties.residual.param))


def _check_compressible(model: nn.Module) -> None:
    """Progressive compaction cuts with compress's own code and ends in a compressed model: a model class
    compress does not know (e.g. a token-classification head, which reads the stream the runtime structure
    narrows) is refused before training, not at the first cut."""
    from finegates.compress.models import compact_class_for

    try:
        compact_class_for(model)
    except NotImplementedError as err:
        raise ValueError(f"compact_every: {err} Leave compact_every unset for this model.") from err


def check_stream_norms(model: nn.Module) -> None:
    """Refuse, naming it, a norm on the runtime structure's stream that a narrowed stream cannot take: not
    a LayerNorm (`StreamLayerNorm`) and not an RMSNorm of LLaMA's form, checked on its own output for a
    random input with zeros at some dims. Runs before anything is cut."""
    ties = runtime_gates(model)
    if ties is None:
        return
    for name, norm in _stream_parts(model)["norms"].items():
        if isinstance(norm, StreamLayerNorm | StreamRMSNorm):
            continue
        width = len(norm.weight)
        kept = torch.arange(0, width, 2, device=norm.weight.device)
        x = torch.zeros(2, width, dtype=norm.weight.dtype, device=norm.weight.device)
        # a generator of its own: checking must not move the run's random stream (data order, gate noise)
        sample = torch.randn(2, len(kept), generator=torch.Generator().manual_seed(0))
        x[:, kept] = sample.to(dtype=x.dtype, device=x.device)
        # the two sums differ by float32 rounding, which a bfloat16 / float16 output can round a step apart
        tol = max(1e-5, 2 * torch.finfo(x.dtype).eps)
        with torch.no_grad():
            ok = hasattr(norm, "variance_epsilon") and torch.allclose(
                rms_norm_over_kept(norm, x[:, kept], kept), norm(x)[:, kept], atol=tol, rtol=tol
            )
        if not ok:
            raise TypeError(
                f"Progressive compaction cannot narrow the stream through {name} ({type(norm).__name__}): it "
                "is not a LayerNorm or an RMSNorm of LLaMA's form. Leave compact_every unset, or use "
                "structure='fine'."
            )


def removed_weights(model: nn.Module) -> int:
    """Frozen weight entries of the gated layers that progressive compaction has cut out."""
    total = 0
    for layer in gated_layers(model).values():
        rows, cols = layer.kept_axes()
        total += layer.out_features * layer.in_features - len(rows) * len(cols)
    return total


def gated_weight_count(model: nn.Module) -> int:
    """Weight entries of the gated layers at the base model's width."""
    return sum(layer.out_features * layer.in_features for layer in gated_layers(model).values())


def weights_cut(model: nn.Module) -> float:
    """The share of the gated layers' weights that progressive compaction has cut out."""
    return removed_weights(model) / gated_weight_count(model)


def compact_closed(model: nn.Module, keep_dense: bool = False, margin: float | None = None) -> Cut:
    """Mark the heads and FFN channels whose gates are closed past `margin` (default
    `GatesConfig.compact_margin`) as removed for good, and cut them out of the frozen weights.

    Exact: in eval mode the model computes what it computed before (the cut units' gates were closed).
    """
    cfg = gates_config(model)
    margin = cfg.compact_margin if margin is None else margin
    before = removed_weights(model)
    cut = Cut()
    with torch.no_grad():
        for block in find_blocks(model):
            cut = cut + _mark_block(block, margin, cfg.param_bound)
        ties = runtime_gates(model)
        if ties is not None:
            residual = ties.residual
            dims = _closed_past(margin)(residual)
            cut.residual = int((dims & ~residual.removed).sum())
            residual.remove_(dims, cfg.param_bound)
    cut.weights = apply_removed(model, keep_dense) - before
    if cut.weights:
        logger.info("Progressive compaction: %s", cut)
    return cut


class ProgressiveCompaction(TrainerCallback):
    """Calls `compact_closed` every `every` optimizer steps (after the budget projection of that step)."""

    def __init__(self, model: nn.Module, every: int, keep_dense: bool = False) -> None:
        if every < 1:
            raise ValueError(f"compact_every must be >= 1, got {every}.")
        _check_compressible(model)
        check_stream_norms(model)  # before training, not at the first compaction
        self.model, self.every, self.keep_dense = model, every, keep_dense

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            compact_closed(self.model, self.keep_dense)
        return control
