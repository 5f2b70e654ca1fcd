"""Stochastic gate vectors: sampled in training, deterministic (converging to exactly 0/1) in eval.

Each family exposes the same four views of one gate vector:
- `forward()`: the gate values used in the forward pass (sampled when training);
- `deterministic()`: the eval-mode values;
- `prob_open()`: a differentiable probability that a gate is open, for the budget objective;
- `paper_prob()`: the probability the reference loss uses.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from finegates.config import GatesConfig

# Gaussian gates close when tanh(theta) + 0.5 <= 0, i.e. theta <= atanh(-0.5).
_GAUSSIAN_THRESHOLD = math.atanh(-0.5)
# Hard-concrete stretch interval and temperature (Louizos et al., 2018).
_HC_LEFT, _HC_RIGHT, _HC_BETA = -0.1, 1.1, 2.0 / 3.0
# sigmoid(a) * (r - l) + l <= 0  <=>  a <= logit(-l / (r - l))
_HC_CLOSED_LOG_ALPHA = math.log(-_HC_LEFT / (_HC_RIGHT - _HC_LEFT)) - math.log1p(_HC_LEFT / (_HC_RIGHT - _HC_LEFT))


class Gate(nn.Module):
    """Base class: one learnable gate per row or column of a linear layer."""

    def deterministic(self) -> torch.Tensor:
        raise NotImplementedError

    def prob_open(self) -> torch.Tensor:
        raise NotImplementedError

    def paper_prob(self) -> torch.Tensor:
        return self.prob_open()

    def closed(self) -> torch.Tensor:
        """Boolean mask of gates whose eval value is exactly 0."""
        return self.deterministic() == 0

    def value(self) -> torch.Tensor:
        return self.forward() if self.training else self.deterministic()


class GaussianGate(Gate):
    """The paper's gates: g = clamp(tanh(theta) + eps + 0.5, 0, 1), eps ~ N(0, noise_std^2)."""

    def __init__(self, size: int, cfg: GatesConfig) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(size) * cfg.init_std + cfg.init_mean)
        self.noise_std = cfg.noise_std
        self.paper_scale = cfg.paper_prob_scale
        self.temperature = cfg.budget_temperature

    def forward(self) -> torch.Tensor:
        mu = torch.tanh(self.theta)
        if not self.training:
            return torch.clamp(mu + 0.5, 0.0, 1.0)
        return torch.clamp(mu + 0.5 + torch.randn_like(mu) * self.noise_std, 0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        return torch.clamp(torch.tanh(self.theta) + 0.5, 0.0, 1.0)

    def prob_open(self) -> torch.Tensor:
        # Logistic in theta around the closing threshold: unlike the reference's P it reaches 0 for
        # closed gates, so the expected size can match what compaction removes.
        return torch.sigmoid((self.theta - _GAUSSIAN_THRESHOLD) / self.temperature)

    def paper_prob(self) -> torch.Tensor:
        normal = torch.distributions.Normal(0.0, 1.0)
        return normal.cdf((torch.tanh(self.theta) + 0.5) / self.paper_scale)


class HardConcreteGate(Gate):
    """L0 gates: a stretched, clamped binary-concrete sample per gate."""

    def __init__(self, size: int, cfg: GatesConfig) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((size,), cfg.hc_init_log_alpha))

    def forward(self) -> torch.Tensor:
        if not self.training:
            return self.deterministic()
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / _HC_BETA)
        return torch.clamp(s * (_HC_RIGHT - _HC_LEFT) + _HC_LEFT, 0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.log_alpha) * (_HC_RIGHT - _HC_LEFT) + _HC_LEFT, 0.0, 1.0)

    def prob_open(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - _HC_BETA * math.log(-_HC_LEFT / _HC_RIGHT))


GATE_CLASSES: dict[str, type[Gate]] = {"gaussian": GaussianGate, "hard_concrete": HardConcreteGate}


def make_gate(size: int, cfg: GatesConfig) -> Gate:
    return GATE_CLASSES[cfg.gate_family](size, cfg)


def _force(param: torch.Tensor, margin: torch.Tensor, closed_value: float, open_value: float,
           close: torch.Tensor, reopen: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(torch.where(close, torch.minimum(param, torch.full_like(param, closed_value)), param))
        param.copy_(torch.where(reopen & (margin <= 0), torch.full_like(param, open_value), param))


def gate_margin(gate: Gate) -> torch.Tensor:
    """Signed distance of each gate's parameter from the point where its eval value becomes 0."""
    if isinstance(gate, GaussianGate):
        return gate.theta.detach() - _GAUSSIAN_THRESHOLD
    if isinstance(gate, HardConcreteGate):
        return gate.log_alpha.detach() - _HC_CLOSED_LOG_ALPHA
    raise TypeError(f"Unknown gate type {type(gate).__name__}.")


def force_gates(gate: Gate, close: torch.Tensor, reopen: torch.Tensor) -> None:
    """Close the gates in `close` (eval value 0) and fully open closed gates in `reopen`."""
    margin = gate_margin(gate)
    if isinstance(gate, GaussianGate):
        _force(gate.theta, margin, _GAUSSIAN_THRESHOLD - 0.5, 1.0, close, reopen)
    else:
        _force(gate.log_alpha, margin, _HC_CLOSED_LOG_ALPHA - 1.0, 3.0, close, reopen)

