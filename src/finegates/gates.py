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

# Gaussian gates close when tanh(theta) + 0.5 <= 0, i.e. theta <= atanh(-0.5), and are fully open
# (eval value 1) when theta >= atanh(0.5): the two points are symmetric around 0.
_GAUSSIAN_THRESHOLD = math.atanh(-0.5)
# Hard-concrete stretch interval and temperature (Louizos et al., 2018).
_HC_LEFT, _HC_RIGHT, _HC_BETA = -0.1, 1.1, 2.0 / 3.0
# sigmoid(a) * (r - l) + l <= 0  <=>  a <= logit(-l / (r - l)) = -log(11); fully open from +log(11).
_HC_CLOSED_LOG_ALPHA = math.log(-_HC_LEFT / (_HC_RIGHT - _HC_LEFT)) - math.log1p(
    _HC_LEFT / (_HC_RIGHT - _HC_LEFT)
)
# The parameter value a gate starts at when the config names none and its parameters are unbounded.
_UNBOUNDED_INIT = {"gaussian": 1.0, "hard_concrete": 3.0}


# Where a removed gate is held (x the edge, past closing): no nearer than two gate steps usually move.
_PINNED = 1.5
REMOVED = "removed"  # the buffer of gates whose unit left the weights in training (`finegates.progressive`)


class Gate(nn.Module):
    """Base class: one learnable gate per row or column of a linear layer.

    Every family has one parameter per gate whose eval value is exactly 0 at or below `-edge` and
    exactly 1 at or above `+edge`; in between the gate scales its row or column. `removed` marks gates
    whose unit progressive compaction took out of the weights: they stay closed for good.
    """

    edge: float
    shares_samples = False  # True: one training draw per forward pass, kept until `new_sample()`
    _sample: torch.Tensor | None = None

    def _init_removed(self, size: int) -> None:
        self.register_buffer(REMOVED, torch.zeros(size, dtype=torch.bool))

    @property
    def param(self) -> nn.Parameter:
        raise NotImplementedError

    def clamp_(self, bound: float | None) -> None:
        """Keep the parameters within +-bound x edge (no-op for None), so a gate is never further
        from closing, or from fully open, than a fixed distance; removed gates stay closed."""
        with torch.no_grad():
            if bound is not None:
                self.param.clamp_(-bound * self.edge, bound * self.edge)
            if self.removed.any():
                pinned = -self.edge * (_PINNED if bound is None else min(_PINNED, bound))
                self.param.copy_(torch.where(self.removed, self.param.clamp(max=pinned), self.param))

    def remove_(self, units: torch.Tensor, bound: float | None) -> None:
        """Mark `units` (a boolean mask) removed for good and close them."""
        self.removed |= units.to(self.removed.device)
        self.clamp_(bound)

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
        """The values a forward pass multiplies in: sampled in training (once per pass for a gate that
        `shares_samples`), deterministic in eval."""
        if not self.training:
            return self.deterministic()
        if not self.shares_samples:
            return self.forward()
        if self._sample is None:
            self._sample = self.forward()
        return self._sample

    def new_sample(self) -> None:
        """Draw afresh at the next `value()` (a gate that `shares_samples` keeps one draw until then)."""
        self._sample = None

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_sample", None)  # a tensor of the last forward pass's graph: not copied
        return state


class GaussianGate(Gate):
    """The paper's gates: g = clamp(tanh(theta) + eps + 0.5, 0, 1), eps ~ N(0, noise_std^2)."""

    edge = -_GAUSSIAN_THRESHOLD

    def __init__(self, size: int, cfg: GatesConfig) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(size) * cfg.init_std + initial_value(cfg))
        self._init_removed(size)
        self.noise_std = cfg.noise_std
        self.paper_scale = cfg.paper_prob_scale
        self.temperature = cfg.budget_temperature

    @property
    def param(self) -> nn.Parameter:
        return self.theta

    def forward(self) -> torch.Tensor:
        mu = torch.tanh(self.theta)
        if not self.training:
            return torch.clamp(mu + 0.5, 0.0, 1.0)
        return torch.clamp(mu + 0.5 + torch.randn_like(mu) * self.noise_std, 0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        return torch.clamp(torch.tanh(self.theta) + 0.5, 0.0, 1.0)

    def prob_open(self) -> torch.Tensor:
        # Logistic in theta around the closing threshold: 0.5 at the closing point, falling towards 0 for
        # closed gates (unlike the reference's P, which stays at Phi(0.5 / s) there); within the default
        # bounds it only reaches 0.10 (theta at -2 x atanh 0.5), which is why the default budget value
        # counts gates as 0/1 ('ste') and uses this only for its gradient. Its slope is largest near
        # closing, so the budget pushes hardest on the gates the task loss has already let drift down.
        return torch.sigmoid((self.theta - _GAUSSIAN_THRESHOLD) / self.temperature)

    def paper_prob(self) -> torch.Tensor:
        normal = torch.distributions.Normal(0.0, 1.0)
        return normal.cdf((torch.tanh(self.theta) + 0.5) / self.paper_scale)


class HardConcreteGate(Gate):
    """L0 gates: a stretched, clamped binary-concrete sample per gate."""

    edge = -_HC_CLOSED_LOG_ALPHA

    def __init__(self, size: int, cfg: GatesConfig) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((size,), initial_value(cfg)))
        self._init_removed(size)

    @property
    def param(self) -> nn.Parameter:
        return self.log_alpha

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


class TiedGate:
    """A layer's view of a gate vector shared with other layers (`GatesConfig.structure="runtime"`).

    Unit i of `source` gates rows or columns i * repeat ... (i + 1) * repeat - 1 (a whole head when repeat
    is the head size). `applied=False`: the view is counted by the budget and the plan but not multiplied
    in (the residual stream reaching a layer already carries the shared mask). Not an nn.Module: the
    source is registered once, on the model, so each shared parameter has one name in the state dict.
    """

    def __init__(self, source: Gate, repeat: int = 1, applied: bool = True) -> None:
        self.source, self.repeat, self.applied = source, repeat, applied

    def _expand(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.repeat == 1 else values.repeat_interleave(self.repeat)

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """Per-unit `values` of the source as the layer's per-row (or per-column) values."""
        return self._expand(values)

    def units(self, mask: torch.Tensor) -> torch.Tensor:
        """The source units whose every row (or column) of this view is in `mask`."""
        return mask.view(-1, self.repeat).all(1)

    def value(self) -> torch.Tensor:
        return self._expand(self.source.value())

    def deterministic(self) -> torch.Tensor:
        return self._expand(self.source.deterministic())

    def prob_open(self) -> torch.Tensor:
        return self._expand(self.source.prob_open())

    def paper_prob(self) -> torch.Tensor:
        return self._expand(self.source.paper_prob())

    def closed(self) -> torch.Tensor:
        return self._expand(self.source.closed())


GATE_CLASSES: dict[str, type[Gate]] = {"gaussian": GaussianGate, "hard_concrete": HardConcreteGate}


def make_gate(size: int, cfg: GatesConfig) -> Gate:
    return GATE_CLASSES[cfg.gate_family](size, cfg)


def initial_value(cfg: GatesConfig) -> float:
    """The parameter value gates start at: the config's, else the top of the bounded range (fully open
    and as near closing as that allows), else the unbounded default."""
    given = cfg.init_mean if cfg.gate_family == "gaussian" else cfg.hc_init_log_alpha
    if given is not None:
        return given
    if cfg.param_bound is None:
        return _UNBOUNDED_INIT[cfg.gate_family]
    return cfg.param_bound * GATE_CLASSES[cfg.gate_family].edge


def travel_to_close(cfg: GatesConfig) -> float:
    """Parameter distance from the initial value to the closing point."""
    return initial_value(cfg) + GATE_CLASSES[cfg.gate_family].edge


def landed(
    gate: Gate, values: torch.Tensor, close: torch.Tensor, reopen: torch.Tensor, margin: float
) -> torch.Tensor:
    """`values` (parameters of `gate`) with the gates in `close` moved at least `margin` x the edge past
    their closing point, and those in `reopen` at least as far onto the open side."""
    step = margin * gate.edge
    values = torch.where(close, torch.clamp(values, max=-gate.edge - step), values)
    return torch.where(reopen, torch.clamp(values, min=-gate.edge + step), values)


def _force(
    param: torch.Tensor,
    margin: torch.Tensor,
    closed_value: float,
    open_value: float,
    close: torch.Tensor,
    reopen: torch.Tensor,
) -> None:
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
