"""A narrower residual stream for the whole model: compaction of the runtime structure's shared mask.

Closed residual dims are zero everywhere in the gated model's stream (`finegates.ties`), so the compacted
model keeps the same K of the H dims in its embeddings, its norms, every layer and its head, with no
gathers or scatters:

- RMSNorm: over the full width, rms^2 = sum_kept x^2 / H + eps = (K / H) (sum_kept x^2 / K + eps H / K),
  so a stock RMSNorm over the K kept dims is exact with eps' = eps H / K and weight' = weight sqrt(H / K).
  The mask is shared, so K, and with it eps', is the same for every norm: one config value
  (`rms_norm_eps`). Qwen3's per-head q/k norms read that value too; their own eps is kept in the spec.
- LayerNorm: the mean and variance over the full width are not those over the kept dims:
  mean = sum_kept x / H and var = (sum_kept (x - mean)^2 + (H - K) mean^2) / H. `CompactLayerNorm`
  computes these; a stock LayerNorm over K dims would not be exact.

The residual gate's eval values are folded into the embeddings (and LayerNorm weights and biases), where
the gated model multiplies them in; the final norm divides them out again and the head's columns take
them, so an LM head tied to the embeddings stays tied.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from finegates.architectures import Architecture
from finegates.compress.spec import LinearSpec, NormSpec
from finegates.coupling import has_bias
from finegates.layer import LINEAR_TYPES, weight_out_in
from finegates.plan import CompactionPlan
from finegates.ties import full_width_layer_norm, matches, runtime_gates, stream_modules


class CompactLayerNorm(nn.LayerNorm):
    """LayerNorm over kept residual dims with the statistics of the full width (closed dims are zero).

    >>> full, kept = nn.LayerNorm(4), CompactLayerNorm(nn.LayerNorm(3), full_width=4)
    >>> x = torch.tensor([[1.0, 2.0, 0.0, 4.0]])
    >>> torch.allclose(kept(x[:, [0, 1, 3]]), full(x)[:, [0, 1, 3]])
    True
    """

    def __init__(self, stock: nn.LayerNorm, full_width: int) -> None:
        bias = stock.bias is not None
        super().__init__(stock.normalized_shape, eps=stock.eps, bias=bias, device=stock.weight.device)
        self.full_width = full_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return full_width_layer_norm(x, self.full_width, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, statistics over {self.full_width} dims"


def _in_blocks(name: str, plan: CompactionPlan) -> bool:
    return any(name == b or name.startswith(b + ".") for b in (*plan.attention, *plan.ffn))


def _scaled(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`tensor` times the float32 gate values `scale`, computed in float32 and kept in `tensor`'s dtype (a
    bfloat16 model stays bfloat16)."""
    return (tensor.float() * scale.float()).to(tensor.dtype)


def stream_state(
    model: nn.Module, plan: CompactionPlan, arch: Architecture, full_width: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, NormSpec], dict[str, LinearSpec]]:
    """For a plan with a shared residual mask: the sliced tensors of the embeddings, norms and linears
    outside the blocks; the compact norms (LayerNorm models); and the shapes of those linears (they depend
    on the hidden size, which the compact config changes). `full_width`: keep every dim (closed ones are
    zero: the gate values are folded in), for classes that must keep the width.

    The residual gate's values r are folded into the embeddings. Where an LM head is tied to them, the
    final norm gets 1 / r folded in instead (of r, or of nothing) and the head's columns r: so the head,
    which shares the embeddings' r, stays tied and the logits exact; the final hidden state is then the
    gated model's divided by r (per dim; the same where gates are 0 or 1).
    """
    ties = runtime_gates(model)
    full = plan.hidden_size
    kept = torch.arange(full) if full_width else plan.residual
    r = ties.residual.deterministic().detach()[kept]
    inverse = torch.where(r > 0, 1 / r.clamp_min(1e-30), torch.ones_like(r))  # closed dims read zero
    parts = stream_modules(model, arch, full)
    embeddings = {id(e.weight) for e in parts["embeddings"].values()}
    tied = any(id(m.weight) in embeddings for m in parts["readers"].values())
    final = [n for n in parts["norms"] if tied and arch.final_norm and matches(n, (arch.final_norm,))]
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, embedding in parts["embeddings"].items():
            state[f"{name}.weight"] = _scaled(embedding.weight[:, kept], r)
        norms = {}
        for name, norm in parts["norms"].items():
            # inside the blocks the gated model scales LayerNorm outputs by r; the final norm divides it out
            scale = (torch.ones_like(r) if arch.layer_norm else inverse) if name in final else r
            if arch.layer_norm:
                state[f"{name}.weight"] = _scaled(norm.weight[kept], scale)
                if norm.bias is not None:
                    state[f"{name}.bias"] = _scaled(norm.bias[kept], scale)
                norms[name] = NormSpec(full_width=full)
            else:
                rescaled = norm.weight[kept] * math.sqrt(full / len(kept))
                state[f"{name}.weight"] = _scaled(rescaled, scale) if name in final else rescaled
        linears = {}
        for name, module in model.named_modules():
            if not isinstance(module, LINEAR_TYPES) or name in plan.modules or _in_blocks(name, plan):
                continue
            weight = weight_out_in(module)
            if full not in weight.shape:
                continue
            if name in parts["readers"]:
                weight = _scaled(weight[:, kept], r) if final else weight[:, kept]
            state[f"{name}.weight"] = weight.contiguous()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias
            linears[name] = LinearSpec(weight.shape[0], weight.shape[1], has_bias(module))
    return state, norms, linears


def narrow_config(data: dict, plan: CompactionPlan, arch: Architecture) -> dict:
    """Config values of the narrower stream: hidden size, head size (no longer hidden / heads) and the
    RMSNorm epsilon."""
    kept, full = len(plan.residual), plan.hidden_size
    key = "n_embd" if "n_embd" in data else "hidden_size"
    data = {**data, key: kept}
    if arch.rope:
        data["head_dim"] = data.get("head_dim") or full // data["num_attention_heads"]
    if not arch.layer_norm and "rms_norm_eps" in data:
        data["rms_norm_eps"] = data["rms_norm_eps"] * full / kept
    return data
