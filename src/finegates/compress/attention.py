"""Compact attention: kept heads only, q/k and v head sizes that may differ, one batched kernel call.

Layout (see `finegates.plan`): every kept query head of a layer keeps the same number of q/k dims and
of v dims, padded with closed (zero) dims where a head keeps fewer, so a single
`scaled_dot_product_attention` call (or whichever kernel the config selects) serves the layer; it
accepts a value head size different from the query/key head size. Query heads map to kept KV heads:
when every kept KV head still has the same number of query heads the kernel's own grouped-query path
is used (`group_size`), otherwise K/V heads are expanded through `kv_index`. The KV cache stores the
compact K/V heads. The softmax scale is the stock module's (1 / sqrt(original head size)).
Fused kernels get one head size for q, k and v: where a layer keeps more v dims than q/k dims (or
fewer), q/k (or v) are zero-padded to the larger size (on CPU only equal sizes reach the fused flash
kernel; the math fallback is ~3x slower), and that size is rounded up to a multiple of 8 where it is
3-7 above one (see `kernel_head_size`). Eager attention (and so the FLOP count of a benchmark) sees the
unpadded sizes.

One class per attention signature: LLaMA-family (RoPE), BERT/RoBERTa self-attention, GPT-2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

from finegates.compress.spec import AttentionSpec


class CompactAttention(nn.Module):
    """Shared core: projections in, attention over the kept heads out (before the output projection)."""

    projections: tuple[str, ...] = ()

    def __init__(self, stock: nn.Module, spec: AttentionSpec, projections: dict[str, nn.Module]) -> None:
        super().__init__()
        missing = set(self.projections) - set(projections)
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs projections {sorted(missing)} in finegates_compact."
            )
        for name in self.projections:
            self.add_module(name, projections[name])
        self.config = stock.config
        self.layer_idx = getattr(stock, "layer_idx", None)
        # The stock module's scale (GPT-2's may include 1 / (layer + 1)), taken from its own head size to the
        # original one: a stock module built for a narrower stream has one head of the stream's width.
        # GPT-2 with scale_attn_weights off does not scale by the head size at all.
        stock_head_dim = getattr(stock, "head_dim", None) or stock.attention_head_size
        by_head_size = getattr(stock, "scale_attn_weights", True)
        self.scaling = stock.scaling * (math.sqrt(stock_head_dim / spec.head_dim) if by_head_size else 1.0)
        self.is_causal = stock.is_causal
        self.spec = spec
        self.num_key_value_groups = max(spec.group_size, 1)
        self.register_buffer("kv_index", torch.zeros(spec.num_heads, dtype=torch.long))
        if spec.rope:
            self.register_buffer("rope_dims", torch.zeros(spec.num_kv_heads, spec.qk_dim, dtype=torch.long))

    def index_bounds(self) -> list[tuple[str, torch.Tensor | None, int | None]]:
        """(buffer, indices, exclusive upper bound) for checking a loaded checkpoint."""
        return [
            ("kv_index", self.kv_index, self.spec.num_kv_heads),
            ("rope_dims", getattr(self, "rope_dims", None), self.spec.head_dim),
        ]

    def projection_widths(self) -> dict[str, tuple[str, int]]:
        """{projection: ("out" or "in", the width the spec implies)}, to check a loaded checkpoint."""
        return {}

    def shape_problems(self) -> list[str]:
        """Projections whose kept widths contradict the spec (e.g. an edited qk_dim)."""
        problems = []
        for name, (side, expected) in self.projection_widths().items():
            actual = _features(getattr(self, name), side)
            if actual is not None and actual != expected:
                problems.append(f"{name} has {actual} {side}put features, the spec implies {expected}")
        return problems

    def split_heads(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """(batch, seq, heads * dim) -> (batch, heads, seq, dim)."""
        return x.view(*x.shape[:-1], -1, dim).transpose(1, 2)

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on kept dims: `rope_dims` lists kept units u then u + d/2, so rotate_half pairs them as
        before.

        A layer whose heads keep every q/k dim (qk_dim == head_dim, so `rope_dims` is 0..d-1 in every
        head) rotates as the stock module does, the (batch, seq, d) tables broadcast over the heads.
        Otherwise the cos and sin tables are gathered at the kept dims of every query and KV head in one
        `index_select` over dim 1 of a 2-D view, which leaves them in the memory order of q and k
        ((batch, seq, heads, dims), seen transposed), so the products below run over matching strides.
        """
        cos, sin = position_embeddings
        if self.all_qk_kept:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        batch, seq, d = cos.shape
        rows = torch.stack([cos, sin]).reshape(-1, d).index_select(1, self._kept_dims()[1])
        tables = rows.view(2, batch, seq, -1, self.spec.qk_dim).transpose(2, 3)  # (2, batch, heads, seq, n)
        h = self.spec.num_heads
        (cos_q, sin_q), (cos_k, sin_k) = tables[:, :, :h], tables[:, :, h:]
        return q * cos_q + rotate_half(q) * sin_q, k * cos_k + rotate_half(k) * sin_k

    @property
    def all_qk_kept(self) -> bool:
        """Every head keeps every q/k dim (then `rope_dims` is 0..d-1 in every head)."""
        return self.spec.qk_dim == self.spec.head_dim

    def _kept_dims(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept q/k dims of every query head: (heads, n); those of every query head then every KV head,
        flat: the RoPE table columns). Cached: decode needs them once per token and layer, and they
        depend only on the two index buffers."""
        if torch.compiler.is_compiling():  # traced into the graph: no Python-side cache
            return self._compute_kept_dims()
        key = tuple((t.data_ptr(), t._version) for t in (self.rope_dims, self.kv_index))
        if getattr(self, "_kept_key", None) != key:
            self._kept, self._kept_key = self._compute_kept_dims(), key
        return self._kept

    def _compute_kept_dims(self) -> tuple[torch.Tensor, torch.Tensor]:
        query_dims = self.rope_dims.index_select(0, self.kv_index)
        return query_dims, torch.cat([query_dims.flatten(), self.rope_dims.flatten()])

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        cache,
        dropout: float,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cache update, kernel call; returns (batch, seq, heads * v_dim) and the weights if any."""
        implementation = self.config._attn_implementation
        v_dim = v.shape[-1]
        if implementation != "eager":  # before caching: the cache holds padded K/V
            q, k, v = _pad_head_dims(q, k, v, kernel_head_size(max(q.shape[-1], v_dim)))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.spec.group_size == 0:
            k, v = k.index_select(1, self.kv_index), v.index_select(1, self.kv_index)
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        out, weights = interface(
            self, q, k, v, mask, dropout=dropout if self.training else 0.0, scaling=self.scaling, **kwargs
        )
        return out[..., :v_dim].reshape(*out.shape[:2], -1), weights


def _kv_cache(cache, past_key_values):
    """The KV cache by either name: recent transformers releases pass `cache`, earlier 5.x ones
    `past_key_values`."""
    return cache if cache is not None else past_key_values


def kernel_head_size(size: int) -> int:
    """The head size a fused attention kernel gets for heads of `size` dims (q/k and v padded to it).

    The CPU flash kernel runs fastest at multiples of 8 and slowest at odd sizes: sizes 3-7 above a
    multiple of 8 are rounded up, sizes one or two above stay (measured with `benchmarks/layout_ops.py`,
    BENCHMARKS.md inference run 5).
    """
    return size + (8 - size % 8) if size % 8 >= 3 else size


def _pad_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Zero-pad q/k and v to `size` dims per head (a no-op where they have it).

    Zero q/k dims add nothing to the scores; zero v dims give output dims that `attend` slices off.
    """
    qk_pad, v_pad = size - q.shape[-1], size - v.shape[-1]
    if qk_pad:
        q, k = F.pad(q, (0, qk_pad)), F.pad(k, (0, qk_pad))
    return q, k, F.pad(v, (0, v_pad)) if v_pad else v


class CompactHeadNorm(nn.Module):
    """Per-head RMSNorm (Qwen3's q_norm / k_norm) over the kept dims of each head.

    Closed dims were zero in the gated model, so they added nothing to a head's sum of squares; the
    mean still divides by the original head size. `weight` is the stock (head_dim,) vector; each head
    takes it at its kept dims.
    """

    def __init__(self, head_dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, dims: torch.Tensor | None) -> torch.Tensor:
        """x: (batch, heads, seq, n); dims: (heads, n) kept dims per head, None when all are kept."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / self.weight.shape[0] + self.eps)
        weight = self.weight if dims is None else self.weight[dims][:, None, :]
        return weight * h.to(dtype)


class CompactRopeAttention(CompactAttention):
    """LLaMA, Mistral, Qwen2, Qwen3 self-attention (RoPE, grouped-query attention, optional q/k/v biases,
    optional per-head q/k norm)."""

    projections = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, stock: nn.Module, spec: AttentionSpec, projections: dict[str, nn.Module]) -> None:
        super().__init__(stock, spec, projections)
        self.dropout = getattr(stock, "attention_dropout", 0.0)
        self.sliding_window = getattr(stock, "sliding_window", getattr(stock.config, "sliding_window", None))
        if spec.qk_norm:
            self.q_norm = CompactHeadNorm(spec.head_dim, stock.q_norm.variance_epsilon)
            self.k_norm = CompactHeadNorm(spec.head_dim, stock.k_norm.variance_epsilon)

    def projection_widths(self) -> dict[str, tuple[str, int]]:
        s = self.spec
        return {
            "q_proj": ("out", s.num_heads * s.qk_dim),
            "k_proj": ("out", s.num_kv_heads * s.qk_dim),
            "v_proj": ("out", s.num_kv_heads * s.v_dim),
            "o_proj": ("in", s.num_heads * s.v_dim),
        }

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ):
        s = self.spec
        q = self.split_heads(self.q_proj(hidden_states), s.qk_dim)
        k = self.split_heads(self.k_proj(hidden_states), s.qk_dim)
        if s.qk_norm:
            q = self.q_norm(q, None if self.all_qk_kept else self._kept_dims()[0])
            k = self.k_norm(k, None if self.all_qk_kept else self.rope_dims)
        v = self.split_heads(self.v_proj(hidden_states), s.v_dim)
        q, k = self.rotate(q, k, position_embeddings)
        out, weights = self.attend(
            q,
            k,
            v,
            attention_mask,
            _kv_cache(cache, past_key_values),
            self.dropout,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.o_proj(out), weights


class CompactBertSelfAttention(CompactAttention):
    """BERT/RoBERTa encoder self-attention; the output projection stays in `attention.output.dense`."""

    projections = ("query", "key", "value")

    def __init__(self, stock: nn.Module, spec: AttentionSpec, projections: dict[str, nn.Module]) -> None:
        super().__init__(stock, spec, projections)
        self.dropout = stock.dropout.p

    def projection_widths(self) -> dict[str, tuple[str, int]]:
        s = self.spec
        return {
            "query": ("out", s.num_heads * s.qk_dim),
            "key": ("out", s.num_kv_heads * s.qk_dim),
            "value": ("out", s.num_kv_heads * s.v_dim),
        }

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        encoder_hidden_states: torch.Tensor | None = None,
        **kwargs,
    ):
        if encoder_hidden_states is not None:
            raise NotImplementedError("Compacted BERT models support encoder self-attention only.")
        s = self.spec
        q = self.split_heads(self.query(hidden_states), s.qk_dim)
        k = self.split_heads(self.key(hidden_states), s.qk_dim)
        v = self.split_heads(self.value(hidden_states), s.v_dim)
        return self.attend(q, k, v, attention_mask, _kv_cache(cache, past_key_values), self.dropout, **kwargs)


class CompactGPT2Attention(CompactAttention):
    """GPT-2 self-attention: the fused c_attn keeps its kept q | k | v rows, in that order."""

    projections = ("c_attn", "c_proj")

    def __init__(self, stock: nn.Module, spec: AttentionSpec, projections: dict[str, nn.Module]) -> None:
        super().__init__(stock, spec, projections)
        self.dropout = stock.attn_dropout.p
        self.resid_dropout = stock.resid_dropout
        self.sizes = [
            spec.num_heads * spec.qk_dim,
            spec.num_kv_heads * spec.qk_dim,
            spec.num_kv_heads * spec.v_dim,
        ]

    def projection_widths(self) -> dict[str, tuple[str, int]]:
        s = self.spec
        return {"c_attn": ("out", sum(self.sizes)), "c_proj": ("in", s.num_heads * s.v_dim)}

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask=None,
        output_attentions: bool | None = False,
        past_key_values=None,
        **kwargs,
    ):
        if encoder_hidden_states is not None:
            raise NotImplementedError("Compacted GPT-2 models support self-attention only.")
        q, k, v = self.c_attn(hidden_states).split(self.sizes, dim=-1)
        s = self.spec
        q, k, v = self.split_heads(q, s.qk_dim), self.split_heads(k, s.qk_dim), self.split_heads(v, s.v_dim)
        out, weights = self.attend(
            q, k, v, attention_mask, _kv_cache(cache, past_key_values), self.dropout, **kwargs
        )
        return self.resid_dropout(self.c_proj(out)), weights


def _features(module: nn.Module, side: str) -> int | None:
    """Kept output or input features of a compact projection (the inner linear of a residual wrapper)."""
    inner = getattr(module, "linear", module)
    return getattr(inner, f"{side}_features", None)


ATTENTION_CLASSES: dict[str, type[CompactAttention]] = {
    "rope": CompactRopeAttention,
    "bert": CompactBertSelfAttention,
    "gpt2": CompactGPT2Attention,
}
