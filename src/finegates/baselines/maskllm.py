"""`maskllm`: learned 2:4 masks (MaskLLM) on frozen weights.

Every group of 4 consecutive input weights of a row picks one of the 6 masks keeping exactly 2.
The choice is a learned categorical, sampled differentiably with Gumbel-softmax; the temperature is
annealed 4 -> 0.05 and the logits' scale 1e2 -> 5e2 (linearly over training), so sampling turns into
a hard choice. Logits may start biased toward the one-shot magnitude mask. A small regulariser
rewards keeping large weights (it keeps gradients alive when soft masks would shrink the weights).
2:4 sparsity is fast only with a 2:4 kernel: `torch.sparse.to_sparse_semi_structured` on CUDA; on
CPU there is none, and no speedup is claimed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finegates.baselines.base import BaseMethod, Batch, MethodConfig
from finegates.baselines.masks import target_linears
from finegates.layer import weight_out_in
from finegates.targets import default_modules_to_save

logger = logging.getLogger(__name__)

# The 6 masks keeping 2 of 4 entries, one per row.
CANDIDATES = torch.tensor(
    [[float(i in pair) for i in range(4)] for pair in itertools.combinations(range(4), 2)]
)


@dataclass
class MaskLLMConfig(MethodConfig):
    temperature: tuple[float, float] = field(
        default=(4.0, 0.05), metadata={"help": "Gumbel temperature start, end."}
    )
    scale: tuple[float, float] = field(default=(1e2, 5e2), metadata={"help": "Logit scale start, end."})
    magnitude_prior: float = field(
        default=0.03,
        metadata={
            "help": (
                "Added to the raw logit of the one-shot magnitude 2:4 mask (x scale: +3 at start); 0: none."
            )
        },
    )
    init_std: float = field(default=0.0, metadata={"help": "Std of the random raw logits at init."})
    weight_reg: float = field(
        default=1e-2, metadata={"help": "Weight of the kept-weight-magnitude regulariser."}
    )
    mask_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the mask logits."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Layers to mask; None: FineGates' defaults (layers with in % 4 != 0 skipped)."},
    )


def magnitude_choice(weight: torch.Tensor) -> torch.Tensor:
    """Per group of 4, the index of the candidate keeping the 2 largest magnitudes."""
    groups = weight.detach().abs().reshape(-1, 4).float()
    return (groups @ CANDIDATES.to(groups.device).t()).argmax(dim=1)


class MaskLLMLinear(nn.Module):
    """y = x (W * M)^T + b, M sampled from learned per-group categoricals (hard argmax in eval)."""

    def __init__(self, base: nn.Module, cfg: MaskLLMConfig) -> None:
        super().__init__()
        weight = weight_out_in(base)
        if weight.shape[1] % 4:
            raise ValueError(f"2:4 masks need in_features divisible by 4, got {weight.shape[1]}.")
        self.base_layer = base.requires_grad_(False)
        logits = torch.randn(weight.numel() // 4, 6, device=weight.device) * cfg.init_std
        if cfg.magnitude_prior:
            logits += cfg.magnitude_prior * F.one_hot(magnitude_choice(weight), 6).to(logits)
        self.logits = nn.Parameter(logits)
        self.temperature, self.scale = cfg.temperature[0], cfg.scale[0]
        self.last_mask: torch.Tensor | None = None

    def sample_mask(self) -> torch.Tensor:
        probs = F.gumbel_softmax(self.logits * self.scale, tau=self.temperature, hard=False)
        return probs @ CANDIDATES.to(probs)

    def hard_mask(self) -> torch.Tensor:
        return CANDIDATES.to(self.logits)[self.logits.argmax(dim=1)]

    def mask(self) -> torch.Tensor:
        """The (out, in) mask of this forward: sampled in training, the argmax candidate in eval."""
        groups = self.sample_mask() if self.training else self.hard_mask()
        return groups.reshape(weight_out_in(self.base_layer).shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_mask = self.mask()
        weight = weight_out_in(self.base_layer)
        return F.linear(x, weight * self.last_mask.to(weight.dtype), self.base_layer.bias)

    def kept_energy(self) -> torch.Tensor:
        """||W * M||^2 / ||W||^2 of the last forward's mask (differentiable in the logits)."""
        weight = weight_out_in(self.base_layer).float()
        return ((weight * self.last_mask) ** 2).sum() / (weight**2).sum().clamp_min(1e-12)

    def merged(self) -> nn.Module:
        """The original module with the hard mask multiplied into its weight."""
        with torch.no_grad():
            mask = self.hard_mask().reshape(weight_out_in(self.base_layer).shape)
            weight_out_in(self.base_layer).mul_(mask)  # a view: the module's weight changes
        return self.base_layer


def anneal(start_end: tuple[float, float], step: int, total: int) -> float:
    start, end = start_end
    return start + (end - start) * min(1.0, step / max(total, 1))


def semi_structured(model: nn.Module, names: list[str]) -> int:
    """Swap 2:4 weights of CUDA fp16/bf16 nn.Linear layers to the 2:4 kernel; returns how many were
    swapped."""
    if not torch.cuda.is_available():
        logger.info("maskllm: no 2:4 kernel on CPU; the 2:4 model runs dense here, with no speedup.")
        return 0
    from torch.sparse import to_sparse_semi_structured

    swapped = 0
    for name in names:
        module = model.get_submodule(name)
        if not (
            isinstance(module, nn.Linear)
            and module.weight.is_cuda
            and module.weight.dtype in (torch.float16, torch.bfloat16)
        ):
            continue
        try:
            module.weight = nn.Parameter(
                to_sparse_semi_structured(module.weight.detach()), requires_grad=False
            )
            swapped += 1
        except (RuntimeError, ValueError) as err:  # shape or dtype the kernel does not support
            logger.warning("maskllm: %s stays dense (%s)", name, err)
    return swapped


class MaskLLM(BaseMethod):
    """Trainable: the mask logits of every target layer and the task head; weights frozen."""

    name = "maskllm"
    kind_of_sparsity = "2:4"
    default_lr = 1e-3
    config_class = MaskLLMConfig

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.removed = 0

    def _prepare(self, model: nn.Module, calibration: Iterable[Batch] | None) -> nn.Module:
        model.requires_grad_(False)
        for name, module in target_linears(model, self.config.target_modules).items():
            if weight_out_in(module).shape[1] % 4:
                logger.warning("maskllm: %s skipped (in_features %% 4 != 0)", name)
                continue
            model.set_submodule(name, MaskLLMLinear(module, self.config))
            self.names.append(name)
        for name in default_modules_to_save(model):
            model.get_submodule(name).requires_grad_(True)
        return model

    def layers(self, model: nn.Module) -> list[MaskLLMLinear]:
        return [m for m in model.modules() if isinstance(m, MaskLLMLinear)]

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        logits = [layer.logits for layer in self.layers(model)]
        ids = {id(p) for p in logits}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        # the mask logits are what MaskLLM learns: a learning rate other than the default scales them too
        mask_lr = self.config.mask_lr * lr / self.default_lr
        return [{"params": logits, "lr": mask_lr}, {"params": rest, "lr": lr}]

    def loss(self, model: nn.Module, batch: Batch, outputs: Any, teacher_outputs: Any = None) -> torch.Tensor:
        energies = [layer.kept_energy() for layer in self.layers(model) if layer.last_mask is not None]
        if not energies or not self.config.weight_reg:
            return outputs.loss.new_zeros(())
        return -self.config.weight_reg * torch.stack(energies).mean()

    def after_step(self, model: nn.Module, step: int) -> None:
        total = self.total_steps or step
        for layer in self.layers(model):
            layer.temperature = anneal(self.config.temperature, step, total)
            layer.scale = anneal(self.config.scale, step, total)

    def finalize(self, model: nn.Module) -> nn.Module:
        """Bake the argmax masks into the weights, then use the 2:4 kernel where CUDA offers one."""
        for name in self.names:
            model.set_submodule(name, model.get_submodule(name).merged())
        self.removed = sum(weight_out_in(model.get_submodule(n)).numel() // 2 for n in self.names)
        semi_structured(model, self.names)
        return model

    def removed_parameters(self, model: nn.Module) -> int:
        """Half the weights of every masked layer (2:4: exactly 2 of every 4 are zero)."""
        layers = self.layers(model)
        return sum(weight_out_in(m.base_layer).numel() // 2 for m in layers) if layers else self.removed
