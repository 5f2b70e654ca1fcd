"""Uniform-width export: every layer cut to the same widths, loadable by the stock class without finegates.

Serving engines load stock architectures only, and a stock config has one FFN width and one head
layout for all layers. Every layer therefore keeps the widest layer's count: a layer that keeps
fewer is padded with its own closed channels / dead heads, whose folded weights make them contribute
exactly zero. The export is thus exact (no accuracy cost); its cost is size: it removes less than
`compress` (compare parameter counts). What a stock config can express:
- FFN channels (all families): one `intermediate_size` (`n_inner` for GPT-2);
- whole attention heads, for the LLaMA family only (its config carries `head_dim`): the same number
  of KV heads per layer and of query heads per KV head. BERT and GPT-2 derive the head size from the
  hidden size, RoPE derives its frequencies from the head size, and no stock class gathers residual
  dims per layer, so head sizes stay full;
- the runtime structure's shared residual mask (`GatesConfig.structure="runtime"`), for RMSNorm models:
  a narrower `hidden_size` with the norms' eps and weights rescaled (`finegates.compress.stream`), stock
  modules only, the kept dims padded with closed ones to a multiple of the head count (the stock config's
  rule). LayerNorm models (a stock LayerNorm over fewer dims is not exact) and Qwen3 (its per-head q/k
  norms would read the rescaled eps too: the stock config has one value) keep the full width, closed
  dims zero; their compact classes (`compress`) narrow exactly.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import PreTrainedModel

from finegates.architectures import architecture_for
from finegates.compress.assemble import family, load_into
from finegates.compress.slicing import folded_linear, keep_cols, keep_rows
from finegates.compress.stream import narrow_config, stream_state
from finegates.coupling import READERS, WRITERS, Block, find_blocks, full_shape
from finegates.layer import as_stored
from finegates.model import CONTROLLER_ATTR, gated_layers, gates_config
from finegates.plan import CompactionPlan, compaction_plan
from finegates.ties import TIES_ATTR

logger = logging.getLogger(__name__)

FFN_CONFIG_KEYS = ("intermediate_size", "n_inner")  # LLaMA/BERT name, GPT-2 name


def _pad(kept: torch.Tensor, universe: int, width: int) -> torch.Tensor:
    """`kept` plus the first indices not in it, up to `width` in all, sorted."""
    kept_set = set(kept.tolist())
    extra = [i for i in range(universe) if i not in kept_set][: max(width - len(kept), 0)]
    return torch.sort(torch.cat([kept.long(), torch.tensor(extra, dtype=torch.long)])).values


def _head_widths(plan: CompactionPlan) -> tuple[int, int]:
    """(KV heads, query heads per KV head) that every layer keeps: the widest layer's."""
    kv = max(len(a.kv_heads) for a in plan.attention.values())
    group = max(int(torch.bincount(a.kv_index).max()) for a in plan.attention.values())
    return kv, group


def _head_rows(
    block: Block, plan: CompactionPlan, kv_width: int, group_width: int
) -> dict[str, torch.Tensor]:
    """Kept rows of q, k, v and columns of o: whole heads, padded with dead heads of the same groups."""
    a, s = plan.attention[block.name], block.shape
    kv_heads = _pad(a.kv_heads, s.num_kv_heads, kv_width)
    queries = [
        _pad(a.heads[a.heads // s.group_size == kv] - kv * s.group_size, s.group_size, group_width)
        + kv * s.group_size
        for kv in kv_heads.tolist()
    ]
    q_heads = torch.cat(queries)
    d = s.head_dim
    q, kv = (
        (q_heads[:, None] * d + torch.arange(d)).flatten(),
        (kv_heads[:, None] * d + torch.arange(d)).flatten(),
    )
    return {"q": q, "k": kv, "v": kv, "o": q}


def _block_slices(block: Block, plan: CompactionPlan, widths: dict[str, int]) -> dict[str, tuple]:
    """Module name -> (rows or None, cols or None) to keep in this block."""
    slices = {}
    if block.name in plan.ffn and "ffn" in widths:
        channels = _pad(plan.ffn[block.name], full_shape(block.modules["down"][1])[1], widths["ffn"])
        slices.update({block.modules[r][0]: (channels, None) for r in ("up", "gate") if block.has(r)})
        slices[block.modules["down"][0]] = (None, channels)
    if block.name in plan.attention and "kv_heads" in widths:
        rows = _head_rows(block, plan, widths["kv_heads"], widths["group"])
        slices.update({block.modules[r][0]: (rows[r], None) for r in ("q", "k", "v")})
        slices[block.modules["o"][0]] = (None, rows["o"])
    return slices


def _state_dict(model: PreTrainedModel, slices: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Stock names and orientation (Conv1D keeps its in x out weight), gates folded in."""
    gated = gated_layers(model)
    replaced = tuple(f"{name}." for name in gated) + (f"{CONTROLLER_ATTR}.", f"{TIES_ATTR}.")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(replaced)}
    for name, module in gated.items():
        rows, cols = slices.get(name, (None, None))
        linear = folded_linear(module)
        linear = keep_rows(linear, rows) if rows is not None else linear
        linear = keep_cols(linear, cols) if cols is not None else linear
        state[f"{name}.weight"] = as_stored(module, linear.weight)
        if linear.bias is not None:
            state[f"{name}.bias"] = linear.bias
    for name, (rows, cols) in slices.items():  # role modules without gates are sliced too
        if name not in gated:
            module = model.get_submodule(name)
            linear = folded_linear(module)
            linear = keep_rows(linear, rows) if rows is not None else linear
            linear = keep_cols(linear, cols) if cols is not None else linear
            state[f"{name}.weight"] = as_stored(module, linear.weight)
            if linear.bias is not None:
                state[f"{name}.bias"] = linear.bias
    return state


def uniform_model(model: PreTrainedModel) -> PreTrainedModel:
    """A stock transformers model (same class as the gated model's) with uniform, exactly removable widths:
    what `compress(model, uniform=True)` returns.

    >>> stock = compress(gated_model, uniform=True)  # doctest: +SKIP
    >>> # loads with plain transformers, no finegates needed:
    >>> stock.save_pretrained("stock/")  # doctest: +SKIP
    """
    gates_config(model)
    arch = architecture_for(model.config.model_type)
    plan = compaction_plan(model)
    widths: dict[str, int] = {}
    if plan.ffn:
        widths["ffn"] = max(len(c) for c in plan.ffn.values())
    if plan.attention and family(arch) == "rope":
        widths["kv_heads"], widths["group"] = _head_widths(plan)
    # LayerNorm: a stock norm over fewer dims is not exact; per-head q/k norms: they read the one config eps
    narrow = plan.residual is not None and not arch.layer_norm and not arch.qk_norm
    if "kv_heads" in widths:
        _stock_head_counts(model, len(plan.residual) if narrow else model.config.hidden_size, widths)
    if narrow:
        plan = _divisible_stream(model, plan, widths)
    slices = {}
    for block in find_blocks(model):
        slices.update(_block_slices(block, plan, widths))
        for role, (name, _) in block.modules.items() if narrow else ():
            rows, cols = slices.get(name, (None, None))
            slices[name] = (
                plan.residual if role in WRITERS else rows,
                plan.residual if role in READERS else cols,
            )
    state = _state_dict(model, slices)
    data = model.config.to_dict()
    if plan.residual is not None:
        stream, _, _ = stream_state(model, plan, arch, full_width=not narrow)
        state.update(stream)
        data = narrow_config(data, plan, arch) if narrow else data
    # the widths go in before the config is built: a stock config validates hidden size against head count
    config = type(model.config).from_dict(_uniform_config(data, widths))
    with torch.device("meta"):
        stock = type(model)(config)
    load_into(stock, state, model)
    logger.info("Uniform export widths %s", widths)
    return stock.eval()


def _stock_head_counts(model: PreTrainedModel, kept: int, widths: dict[str, int]) -> None:
    """A stock config wants hidden_size to be a multiple of the head count (LlamaConfig refuses it
    otherwise): where the kept heads do not allow one between the `kept` residual dims and the full width,
    dead heads of the same groups (exact: their output columns are zero) pad them to the fewest that do.
    The model's own head counts always allow one, so the search ends."""
    config = model.config
    kv_full = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    group_full = config.num_attention_heads // kv_full
    hidden = config.hidden_size
    kv, group = widths["kv_heads"], widths["group"]
    candidates = sorted((k * g, k, g) for k in range(kv, kv_full + 1) for g in range(group, group_full + 1))
    _, kv_new, group_new = next(c for c in candidates if -(-kept // c[0]) * c[0] <= hidden)
    if (kv_new, group_new) != (kv, group):
        logger.info(
            "Uniform export: %d KV heads x %d query heads padded with dead heads to %d x %d (the stock "
            "config needs the hidden size, %d or less, to be a multiple of the head count)",
            kv, group, kv_new, group_new, hidden,
        )  # fmt: skip
    widths["kv_heads"], widths["group"] = kv_new, group_new


def _divisible_stream(model: PreTrainedModel, plan: CompactionPlan, widths: dict[str, int]) -> CompactionPlan:
    """The stock config wants hidden_size to be a multiple of the head count: closed residual dims (zero in
    the stream, so still exact) pad the kept ones up to the next multiple."""
    heads = widths["kv_heads"] * widths["group"] if "kv_heads" in widths else model.config.num_attention_heads
    kept = len(plan.residual)
    width = min(-(-kept // heads) * heads, plan.hidden_size)
    if width != kept:
        logger.info(
            "Uniform export: %d residual dims kept, padded with closed ones to %d (a multiple of %d heads)",
            kept,
            width,
            heads,
        )
    return dataclasses.replace(plan, residual=_pad(plan.residual, plan.hidden_size, width))


def _uniform_config(data: dict, widths: dict[str, int]) -> dict:
    """The config dict with every layer's equal widths."""
    data = dict(data)
    if "ffn" in widths:
        data[next(k for k in FFN_CONFIG_KEYS if k in data)] = widths["ffn"]
    if "kv_heads" in widths:
        data["head_dim"] = data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"]
        data["num_key_value_heads"] = widths["kv_heads"]
        data["num_attention_heads"] = widths["kv_heads"] * widths["group"]
    return data
