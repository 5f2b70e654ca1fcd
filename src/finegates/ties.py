"""`structure="runtime"`: gates tied to the units every runtime can drop without gathers.

One gate per attention head (on its output columns), one per KV group where groups hold several query
heads (on its value rows), one per FFN channel (on the down projection's input columns; in GLU FFNs on
the up projection's rows, where the product with the activation keeps the values it needs), and one gate
vector over the residual stream shared by the whole model: it multiplies every embedding output, every
row of every layer that writes the stream (attention output, FFN down projection) and, in LayerNorm
models, every norm output (folded into the norm's affine map: `StreamLayerNorm`). A closed residual dim
is then zero everywhere in the stream, so compaction drops it from the embeddings, the norms, every layer
and the head at once (`finegates.compress`); the
readers' columns carry a view of the same gate that the budget counts but that is not multiplied in.

Which modules play which part comes from the architecture table (`finegates.architectures`). The
shared vectors are registered once, under `model.finegates_gates`; the layers hold `TiedGate` views.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from finegates.architectures import Architecture, architecture_for
from finegates.config import GatesConfig
from finegates.coupling import READERS, WRITERS, Block, find_blocks
from finegates.gates import Gate, TiedGate, make_gate
from finegates.layer import GatedLinear
from finegates.structure import remembered

TIES_ATTR = "finegates_gates"


class RuntimeGates(nn.Module):
    """The shared gate vectors: `residual` (the stream's width) and, per block, `heads`, `kv_heads`
    (GQA only) and `channels`. `enabled=False` bypasses the stream mask (the dense model).

    `stream_kept`: the residual dims the stream carries once progressive compaction narrowed it
    (`finegates.progressive`), None while it has its full width."""

    def __init__(self, residual: Gate, blocks: list[dict[str, Gate]]) -> None:
        super().__init__()
        self.residual = residual
        self.blocks = nn.ModuleList(nn.ModuleDict(b) for b in blocks)
        self.enabled = True
        self.register_buffer("stream_kept", None, persistent=False)

    def stream_gate(self, dtype: torch.dtype) -> torch.Tensor:
        """The residual gate's values at the dims the stream carries."""
        r = self.residual.value().to(dtype)
        return r if self.stream_kept is None else r.index_select(0, self.stream_kept)


class _StreamMask:
    """Forward hook multiplying a module's output by the residual gate, and keeping only the dims the
    stream carries once it is narrowed (a class, so that a deep copy of the model gets a hook bound to
    the copy's gates)."""

    def __init__(self, gates: RuntimeGates) -> None:
        self.gates = gates

    def __call__(self, module: nn.Module, args, output):
        if not self.gates.enabled:
            return output
        kept = self.gates.stream_kept
        if kept is not None:
            output = output.index_select(-1, kept)
        return output * self.gates.stream_gate(output.dtype)


def full_width_layer_norm(
    x: torch.Tensor, full_width: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over `full_width` dims of which `x` holds the nonzero ones (the rest are zero):
    mean = sum x / H, var = (sum (x - mean)^2 + (H - K) mean^2) / H; statistics and the affine map in
    float32 (as the stock kernel's for bfloat16 and float16 inputs), the output in x's dtype."""
    h = x.float()
    mean = h.sum(-1, keepdim=True) / full_width
    centred = h - mean
    var = (centred.pow(2).sum(-1, keepdim=True) + (full_width - x.shape[-1]) * mean.pow(2)) / full_width
    out = centred * torch.rsqrt(var + eps)
    out = out if weight is None else out * weight.float()
    out = out if bias is None else out + bias.float()
    return out.to(x.dtype)


class StreamLayerNorm(nn.LayerNorm):
    """A LayerNorm whose output the residual gate r scales, with r folded into its affine map:
    LN(x) * r = x_hat * (w * r) + b * r. The norm's own backward then yields r's gradient from what it
    keeps anyway (its input and statistics), where multiplying its output would keep that output too.
    `tie_runtime_gates` gives the model's stock LayerNorms this class (same state, only the forward
    differs); `finegates_ties` is the shared gates' module. On a narrowed stream it reads the kept dims
    with the full width's statistics (the closed dims are zero)."""

    finegates_ties: RuntimeGates

    def forward(self, x):
        ties = self.finegates_ties
        if not ties.enabled:
            return super().forward(x)
        r = ties.stream_gate(x.dtype if self.weight is None else self.weight.dtype)
        kept = ties.stream_kept
        weight = self.weight if self.weight is None or kept is None else self.weight.index_select(0, kept)
        bias = self.bias if self.bias is None or kept is None else self.bias.index_select(0, kept)
        weight = r if weight is None else weight * r
        bias = None if bias is None else bias * r
        if kept is not None:
            return full_width_layer_norm(x, self.normalized_shape[0], weight, bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class StreamRMSNorm(nn.Module):
    """Mixed into a stock RMSNorm's class (LLaMA's form: w * x / sqrt(mean x^2 + eps), statistics in
    float32) when progressive compaction narrows the stream: over the kept dims with the full width's
    mean (the closed dims are zero). `narrow_stream` checks the form against the stock forward first."""

    finegates_ties: RuntimeGates

    def forward(self, x):
        kept = self.finegates_ties.stream_kept
        if kept is None or x.shape[-1] == self.weight.shape[0]:
            return super().forward(x)
        return rms_norm_over_kept(self, x, kept)


def rms_norm_over_kept(norm: nn.Module, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """LLaMA's RMSNorm `norm` over the full width, of which `x` holds the dims `kept` (the rest are zero):
    w * x / sqrt(sum x^2 / H + eps), statistics in float32."""
    dtype = x.dtype
    h = x.float()
    var = h.pow(2).sum(-1, keepdim=True) / norm.weight.shape[0]
    h = h * torch.rsqrt(var + norm.variance_epsilon)
    return norm.weight.index_select(0, kept) * h.to(dtype)


class StreamReader(nn.Module):
    """Mixed into a frozen nn.Linear outside the blocks that reads the stream (an LM head) when progressive
    compaction narrows the stream: it multiplies the kept dims by `narrow_weight`, its weight's kept columns
    (`narrow_stream` copies them at each narrowing; the stock weight, which may be tied to the embeddings,
    stays as it is)."""

    finegates_ties: RuntimeGates
    narrow_weight: torch.Tensor

    def forward(self, x):
        if x.shape[-1] != self.narrow_weight.shape[1]:  # the full-width stream (a bypassed teacher)
            return super().forward(x)
        return F.linear(x, self.narrow_weight, self.bias)


class _ScatterToFullWidth:
    """Forward pre-hook on a module outside the blocks that reads the stream (a task head, an LM head):
    on a narrowed stream its input goes back to the full width, zeros at the closed dims."""

    def __init__(self, gates: RuntimeGates) -> None:
        self.gates = gates

    def __call__(self, module: nn.Module, args):
        kept = self.gates.stream_kept
        if kept is None or not args or args[0].shape[-1] != len(kept):
            return None
        x = args[0]
        full = x.new_zeros(*x.shape[:-1], len(self.gates.residual.param))
        return (full.index_copy(-1, kept, x), *args[1:])


def _mask_stream_at(module: nn.Module, ties: RuntimeGates) -> None:
    """Scale `module`'s output by the residual gate: folded into a stock LayerNorm's affine map, by a
    forward hook elsewhere (embeddings)."""
    if type(module) is nn.LayerNorm:
        module.__class__ = StreamLayerNorm
        object.__setattr__(module, "finegates_ties", ties)  # a reference, not a submodule
    else:
        module.register_forward_hook(_StreamMask(ties))


class _NewSample:
    """Forward pre-hook on the module that runs the embeddings: one residual-gate draw per forward pass,
    shared by every embedding, norm and layer that applies it (the mask is one vector, in training too)."""

    def __init__(self, gates: RuntimeGates) -> None:
        self.gates = gates

    def __call__(self, module: nn.Module, args) -> None:
        self.gates.residual.new_sample()


def matches(name: str, suffixes: tuple[str, ...]) -> bool:
    """`name` is one of `suffixes` or ends with '.' + one of them."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def stream_modules(model: nn.Module, arch: Architecture, hidden: int) -> dict[str, dict[str, nn.Module]]:
    """The modules around the blocks that the shared residual mask reaches, by part: "embeddings",
    "norms" (over the stream's width) and "readers" (linears outside the blocks, e.g. the LM head)."""
    key = ("stream_modules", arch.block_pattern, hidden)
    return remembered(model, key, lambda: _stream_modules(model, arch, hidden))


def _stream_modules(model: nn.Module, arch: Architecture, hidden: int) -> dict[str, dict[str, nn.Module]]:
    block = re.compile(arch.block_pattern + r"\.")
    parts: dict[str, dict[str, nn.Module]] = {"embeddings": {}, "norms": {}, "readers": {}}
    for name, module in model.named_modules():
        if matches(name, arch.embeddings) and isinstance(module, nn.Embedding):
            if module.embedding_dim == hidden:
                parts["embeddings"][name] = module
        elif matches(name, arch.norms) and getattr(module, "weight", None) is not None:
            if module.weight.shape == (hidden,):
                parts["norms"][name] = module
        elif matches(name, arch.stream_readers) and not block.search(name + "."):
            parts["readers"][name] = module
    return parts


def _gated(block: Block, role: str) -> GatedLinear | None:
    module = block.modules.get(role, (None, None))[1]
    return module if isinstance(module, GatedLinear) else None


def _tie_block(block: Block, residual: Gate, cfg: GatesConfig) -> dict[str, Gate]:
    s, shared = block.shape, {}
    for role, (name, module) in block.modules.items():
        if isinstance(module, GatedLinear):
            row = TiedGate(residual) if role in WRITERS else None
            col = TiedGate(residual, applied=False) if role in READERS else None
            module.set_gates(row, col)
    o, v, up, down = (_gated(block, role) for role in ("o", "v", "up", "down"))
    if o is not None:
        shared["heads"] = make_gate(s.num_heads, cfg)
        o.set_gates(o.row_gate, TiedGate(shared["heads"], s.head_dim))
    if v is not None and s.group_size > 1:
        shared["kv_heads"] = make_gate(s.num_kv_heads, cfg)
        v.set_gates(TiedGate(shared["kv_heads"], s.head_dim), v.col_gate)
    if down is not None:
        shared["channels"] = make_gate(down.in_features, cfg)
        if block.has("gate") and up is not None:
            # GLU: act(gate x) * (up x) * c. On the up projection's rows the gate needs the up output,
            # which the product keeps anyway; on the down projection's columns it would need the product.
            up.set_gates(TiedGate(shared["channels"]), up.col_gate)
            down.set_gates(down.row_gate, None)
        else:
            down.set_gates(down.row_gate, TiedGate(shared["channels"]))
    return shared


def tie_runtime_gates(model: nn.Module, cfg: GatesConfig) -> RuntimeGates:
    """Replace the per-layer gates of a freshly gated `model` by the runtime structure's shared ones and
    hook the stream mask onto its embeddings (and LayerNorms); returns the module holding them."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = architecture_for(model_type)
    blocks = find_blocks(model)
    if arch is None or not arch.embeddings or not blocks:
        raise ValueError(
            f"structure='runtime' needs the model's blocks and residual stream in the architecture table; "
            f"model_type {model_type!r} has none. Use structure='fine'."
        )
    missing = [name for b in blocks for r, (name, m) in b.modules.items() if r in WRITERS]
    missing = [n for n in missing if not isinstance(model.get_submodule(n), GatedLinear)]
    if missing:
        raise ValueError(
            f"structure='runtime' masks the residual stream in every layer that writes it, but {missing[:3]} "
            "are not gated; gate every attention-output and FFN-down projection (the default targets)."
        )
    hidden = next(m for r, (_, m) in blocks[0].modules.items() if r in WRITERS).out_features
    residual = make_gate(hidden, cfg)
    ties = RuntimeGates(residual, [_tie_block(block, residual, cfg) for block in blocks])
    ties.to(next(model.parameters()).device)
    parts = stream_modules(model, arch, hidden)
    if not parts["embeddings"]:
        raise ValueError(
            f"structure='runtime' found no embedding of width {hidden} in {type(model).__name__}."
        )
    hooked = [*parts["embeddings"].values(), *(parts["norms"].values() if arch.layer_norm else ())]
    for module in hooked:
        _mask_stream_at(module, ties)
    residual.shares_samples = True
    for parent in {name.rpartition(".")[0] for name in parts["embeddings"]}:
        model.get_submodule(parent).register_forward_pre_hook(_NewSample(ties))
    return ties


def runtime_gates(model: nn.Module) -> RuntimeGates | None:
    """The shared gates of a runtime-structure model (None for the fine structure)."""
    ties = getattr(model, TIES_ATTR, None)
    return ties if isinstance(ties, RuntimeGates) else None
