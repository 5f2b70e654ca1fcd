"""Coupled dimensions: which rows and columns leave together, and how many survive in expectation.

A block's linear layers are found through the architecture table. Gate states enter as "open"
tensors: differentiable probabilities for the budget objective, or 0/1 masks for the exact plan;
the same survival formulas serve both (with 0/1 inputs they are exact).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from finegates.architectures import Architecture, AttentionShape, architecture_for, attention_shape
from finegates.gates import Gate, TiedGate
from finegates.layer import GatedLinear, linear_shape
from finegates.structure import remembered

READERS = ("q", "k", "v", "qkv", "up", "gate")  # read the residual stream through their columns
WRITERS = ("o", "down")  # write the residual stream through their rows


@dataclass
class Block:
    """One transformer block: role -> (full module name, module), plus its attention shape."""

    name: str
    modules: dict[str, tuple[str, nn.Module]]
    shape: AttentionShape
    rope: bool
    qk_norm: bool = False

    def has(self, role: str) -> bool:
        return role in self.modules


def find_blocks(model: nn.Module) -> list[Block]:
    """Blocks of a model whose architecture is in the table and that hold at least one gated layer."""
    return remembered(model, "blocks", lambda: _find_blocks(model))


def _find_blocks(model: nn.Module) -> list[Block]:
    config = getattr(model, "config", None)
    arch: Architecture | None = architecture_for(getattr(config, "model_type", None))
    if arch is None:
        return []
    shape = attention_shape(config)
    blocks = []
    for name, module in model.named_modules():
        if not re.search(arch.block_pattern, name):
            continue
        roles = {}
        for role, path in arch.roles.items():
            try:
                roles[role] = (f"{name}.{path}", module.get_submodule(path))
            except AttributeError:
                continue
        if any(isinstance(m, GatedLinear) for _, m in roles.values()):
            blocks.append(Block(name=name, modules=roles, shape=shape, rope=arch.rope, qk_norm=arch.qk_norm))
    return blocks


OpenFn = Callable[[nn.Module, str], torch.Tensor]


def open_where(closed: Callable[[Gate], torch.Tensor]) -> OpenFn:
    """An open-state function of 0/1 masks: 0 where `closed` (asked of each gate vector, of a tied view's
    shared source) says so; ungated modules and axes are all ones."""

    def open_fn(module: nn.Module, axis: str) -> torch.Tensor:
        gate = module.gates().get(axis) if isinstance(module, GatedLinear) else None
        if gate is None:
            out_features, in_features = full_shape(module)
            device = next(module.parameters(), torch.empty(0)).device  # where the gated masks live
            return torch.ones(out_features if axis == "row" else in_features, device=device)
        if isinstance(gate, TiedGate):
            return (~gate.expand(closed(gate.source))).float()
        return (~closed(gate)).float()

    return open_fn


def any_open(p: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """Probability that at least one of independent gates is open (exact OR for 0/1 inputs)."""
    return 1 - torch.prod(1 - p, dim=dim) if isinstance(dim, int) else 1 - (1 - p).flatten(*dim).prod(dim[0])


class BlockGates:
    """The open-state tensors of one block, arranged by coupled unit."""

    def __init__(self, block: Block, open_fn: OpenFn) -> None:
        self.block, self.open_fn = block, open_fn
        s = block.shape
        self.d = s.head_dim
        self.unit = 2 if block.rope else 1  # RoPE pairs (i, i + d/2) leave together

    def rows(self, role: str) -> torch.Tensor:
        if role in ("q", "k", "v") and self.block.has("qkv"):
            rows = self.open_fn(self.block.modules["qkv"][1], "row")
            q_size = self.block.shape.num_heads * self.d
            kv_size = self.block.shape.num_kv_heads * self.d
            start = {"q": 0, "k": q_size, "v": q_size + kv_size}[role]
            return rows[start : start + (q_size if role == "q" else kv_size)]
        return self.open_fn(self.block.modules[role][1], "row")

    def cols(self, role: str) -> torch.Tensor:
        return self.open_fn(self.block.modules[role][1], "col")

    def _heads(self, flat: torch.Tensor, heads: int) -> torch.Tensor:
        """(heads * d,) -> (heads, unit, d / unit): the unit axis groups dims that rotate together."""
        return flat.view(heads, self.unit, self.d // self.unit)

    # -- attention ------------------------------------------------------------------------------
    def has_attention(self) -> bool:
        return self.block.has("qkv") or all(self.block.has(r) for r in ("q", "k", "v", "o"))

    def qk_units(self, head_alive: torch.Tensor | None = None) -> torch.Tensor:
        """(kv_heads, d / unit): a unit survives if open in k and in some live query head of its group.

        With a per-head q/k norm (Qwen3) every open dim of a head counts in that head's norm, so a unit
        survives if open in k or in some live query head of its group; where it is closed on one side,
        that side keeps it as zero rows (nothing added to its norm or to the scores).
        """
        s = self.block.shape
        q = self._heads(self.rows("q"), s.num_heads)
        if head_alive is not None:
            q = q * head_alive[:, None, None]
        q = q.view(s.num_kv_heads, s.group_size, self.unit, -1)
        k = self._heads(self.rows("k"), s.num_kv_heads)
        k_open, q_open = any_open(k, 1), any_open(q, (1, 2))
        if self.block.qk_norm:
            return 1 - (1 - k_open) * (1 - q_open)
        return k_open * q_open

    def vo_units(self, head_alive: torch.Tensor | None = None) -> torch.Tensor:
        """(kv_heads, d): a v dim survives if its v row and the o column of some live head are open."""
        s = self.block.shape
        o = self.cols("o").view(s.num_heads, self.d)
        if head_alive is not None:
            o = o * head_alive[:, None]
        v = self.rows("v").view(s.num_kv_heads, self.d)
        return v * any_open(o.view(s.num_kv_heads, s.group_size, self.d), 1)

    def head_alive(self) -> torch.Tensor:
        """(num_heads,): a query head whose every output dim is closed (in v or o) contributes nothing."""
        s = self.block.shape
        o = self.cols("o").view(s.num_heads, self.d)
        v = self.rows("v").view(s.num_kv_heads, 1, self.d).expand(-1, s.group_size, -1)
        return any_open(o * v.reshape(s.num_heads, self.d), 1)

    # -- FFN --------------------------------------------------------------------------------------
    def has_ffn(self) -> bool:
        return self.block.has("up") and self.block.has("down")

    def ffn_units(self) -> torch.Tensor:
        alive = self.rows("up") * self.cols("down")
        return alive * self.rows("gate") if self.block.has("gate") else alive


def expected_widths(block: Block, open_fn: OpenFn) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Expected (rows, cols) kept of each role module of `block`, counting coupled removals."""
    g = BlockGates(block, open_fn)
    widths: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    s = block.shape
    if g.has_attention():
        # a dead query head (every v/o dim closed) leaves its q rows and o columns too, and a KV group with
        # no live head its k rows: each group's kept q/k and v/o dims count once per live head
        alive = g.head_alive()
        live = alive.view(s.num_kv_heads, s.group_size)
        heads = live.sum(1)
        qk = g.qk_units(alive).sum(1) * g.unit
        vo = g.vo_units(alive).sum(1)
        k = qk * any_open(live, 1) if block.qk_norm else qk  # otherwise qk is 0 in a dead group already
        rows = {"q": (heads * qk).sum(), "k": k.sum(), "v": vo.sum()}
        if block.has("qkv"):
            widths["qkv"] = (rows["q"] + rows["k"] + rows["v"], g.cols("qkv").sum())
        else:
            widths.update({r: (rows[r], g.cols(r).sum()) for r in ("q", "k", "v")})
        widths["o"] = (g.rows("o").sum(), (heads * vo).sum())
    if g.has_ffn():
        channels = g.ffn_units().sum()
        for role in ("up", "gate"):
            if block.has(role):
                widths[role] = (channels, g.cols(role).sum())
        widths["down"] = (g.rows("down").sum(), channels)
    return widths


def full_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a layer as the base model has it, before any compaction in training."""
    if isinstance(module, GatedLinear):
        return module.out_features, module.in_features
    return linear_shape(module)


def has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None
