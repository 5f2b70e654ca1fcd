"""`salr`: a 50% magnitude-pruned frozen base, an SVD-initialised residual adapter and a LoRA adapter.

Per layer: W_sparse = W * mask (stored as bitmap + packed values, decoded for the matmul); the
adapter B_s A_s starts as the rank-r truncated SVD of the pruned-away residual W - W_sparse, so the
layer starts close to the dense one; a LoRA pair (B zero) adds task capacity. Both adapters of a
layer run as one concatenated GEMM pair: y = x W_sparse^T + (x [A_s; A_l]^T) [B_s, s B_l]^T + b.
LoRA is written here rather than taken from peft because the two adapters must share one GEMM.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from finegates.baselines import bitmap
from finegates.baselines.base import BaseMethod, Batch, MethodConfig
from finegates.baselines.masks import magnitude_mask, target_linears
from finegates.compress.linear import routed_linear
from finegates.layer import weight_out_in
from finegates.targets import default_modules_to_save


@dataclass
class SALRConfig(MethodConfig):
    target_sparsity: float = field(
        default=0.5, metadata={"help": "Unstructured sparsity of each frozen base weight."}
    )
    svd_rank: int = field(
        default=8, metadata={"help": "Rank of the adapter initialised from the residual's SVD."}
    )
    lora_r: int = field(default=8, metadata={"help": "Rank of the LoRA adapter."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale alpha / r)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Layers to prune and adapt; None: FineGates' defaults for the model type."},
    )


def svd_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-r approximation of `residual`, singular values split evenly."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(residual.dtype), (root[:, None] * vh[:rank]).to(residual.dtype)


class SALRLinear(nn.Module):
    """A sparse frozen base in bitmap form plus two trainable low-rank adapters fused into one GEMM."""

    def __init__(self, base: nn.Module, cfg: SALRConfig) -> None:
        super().__init__()
        weight = weight_out_in(base).detach()
        mask = magnitude_mask(weight, cfg.target_sparsity)
        packed, values = bitmap.encode(weight, mask)
        self.register_buffer("bitmap", packed)
        self.register_buffer("values", values)
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.out_features, self.in_features = weight.shape
        svd_b, svd_a = svd_factors(weight - weight * mask, cfg.svd_rank)
        self.svd_a, self.svd_b = nn.Parameter(svd_a), nn.Parameter(svd_b)
        self.lora_a = nn.Parameter(torch.empty(cfg.lora_r, self.in_features, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # peft's LoRA init
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, cfg.lora_r, dtype=weight.dtype))
        self.scale = cfg.lora_alpha / cfg.lora_r

    def base_weight(self) -> torch.Tensor:
        return bitmap.decode(self.bitmap, self.values, (self.out_features, self.in_features))

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[A_s; A_l] (r_s + r_l, in) and [B_s, scale B_l] (out, r_s + r_l)."""
        return torch.cat([self.svd_a, self.lora_a]), torch.cat([self.svd_b, self.scale * self.lora_b], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.fused_factors()
        # the sparse base's GEMM on the routes of compacted models and of the dense model `compare` times
        # beside it (plain F.linear with autograd)
        return routed_linear(x, self.base_weight(), self.bias) + F.linear(F.linear(x, down), up)

    def unfused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer with each adapter as its own GEMM pair (the reference the fused path must match)."""
        svd = F.linear(F.linear(x, self.svd_a), self.svd_b)
        lora = F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale
        return F.linear(x, self.base_weight(), self.bias) + svd + lora

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={self.values.numel()}"


def salr_storage_bytes(model: nn.Module) -> int:
    """Bytes of the model's state as stored: SALR layers as bitmap + values + adapters, the rest dense."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values() if t.numel() > 0}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class SALR(BaseMethod):
    """Trainable: both adapters of every target layer and the task head."""

    name = "salr"
    kind_of_sparsity = "unstructured"
    default_lr = 5e-4
    config_class = SALRConfig

    def _prepare(self, model: nn.Module, calibration: Iterable[Batch] | None) -> nn.Module:
        cfg: SALRConfig = self.config
        targets = target_linears(model, cfg.target_modules)
        model.requires_grad_(False)
        for name, module in targets.items():
            model.set_submodule(name, SALRLinear(module, cfg).to(module.weight.device))
        for name in default_modules_to_save(model):
            model.get_submodule(name).requires_grad_(True)
        return model

    def removed_parameters(self, model: nn.Module) -> int:
        """Net: the pruned base entries less the adapters that stay in the deployed model ((out + in) x
        (svd_rank + lora_r) per layer, never merged into the sparse base)."""
        layers = [m for m in model.modules() if isinstance(m, SALRLinear)]
        adapters = sum(p.numel() for m in layers for p in (m.svd_a, m.svd_b, m.lora_a, m.lora_b))
        return sum(m.out_features * m.in_features - m.values.numel() for m in layers) - adapters
