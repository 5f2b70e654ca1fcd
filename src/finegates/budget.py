"""Keeping the removed fraction on its budget while training: the schedule a run's length implies, and
the projection after every optimizer step that holds the exact removed fraction near the warmed-up target.

The Lagrangian (objectives.sparsity_loss) decides which gates drift towards closing; `budget_step` bounds
the gate parameters and, when the exact fraction leaves the band `target +- budget_tolerance`, moves the
gates nearest their closing point, in the order of their own values, back to the middle of the band.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from finegates.gates import GATE_CLASSES, Gate, gate_margin, landed, travel_to_close
from finegates.latency import budget_fraction, budget_target, predicted_speedup
from finegates.model import all_gates, controller, gates_config
from finegates.objectives import warmup_steps
from finegates.progressive import weights_cut
from finegates.uniform_layers import equalize_layers

logger = logging.getLogger(__name__)

# Gates moved by `finalize_gates` sit this far (x the family's edge) past their closing point: the
# smallest move. During training they are moved further (`GatesConfig.projection_margin`), so that the
# next optimizer step does not carry them straight back across.
FINAL_MARGIN = 1e-3


def set_training_steps(model: nn.Module, total_steps: int) -> None:
    """Fix the schedule a run of `total_steps` needs where the config leaves it open (None).

    Warm-up: `warmup_fraction` of the steps (30% by default). Gate lr: a gate that the budget pushes
    every step travels from its initial value to its closing point within the warm-up (at least 10 steps),
    so gates can close in time in a run of 60 steps and move no faster than needed in one of 10,000.
    `FineGatesTrainer` calls this.

    >>> set_training_steps(model, 1000)  # doctest: +SKIP
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    cfg = gates_config(model)
    if cfg.warmup_steps is None:
        cfg.warmup_steps = max(1, round(cfg.warmup_fraction * total_steps))
    elif cfg.warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({cfg.warmup_steps}) is longer than the run ({total_steps} steps): the target "
            "would never be reached. Give a shorter warm-up or more steps."
        )
    cfg.gate_lr = gate_lr(cfg)


def gate_lr(cfg) -> float:
    """The config's gate lr, or the one for which a steadily pushed gate closes within the warm-up (at
    least 10 steps)."""
    if cfg.gate_lr is not None:
        return cfg.gate_lr
    if cfg.warmup_steps is None:
        raise ValueError("gate_lr is derived from warmup_steps: set one of them, or call set_training_steps.")
    return travel_to_close(cfg) / max(10.0, cfg.warmup_steps)


@dataclass
class Projection:
    """What one projection did: gates it closed or reopened, and the removed fraction after it."""

    closed: int
    reopened: int
    removed: float


class _Ranked:
    """Candidate gates of one direction in the order they are moved, and a way to apply the first k."""

    def __init__(self, gates: list[Gate], closing: bool, margin: float) -> None:
        self.gates, self.closing, self.margin = gates, closing, margin
        self.originals = [gate.param.detach().clone() for gate in gates]
        margins = [gate_margin(gate) for gate in gates]
        flat = torch.cat(margins)
        # removed gates (progressive compaction) are closed for good: never reopened
        candidate = flat > 0 if closing else (flat <= 0) & ~torch.cat([gate.removed for gate in gates])
        # closing: open gates nearest their closing point first; reopening: closed gates nearest it first
        key = torch.where(candidate, flat if closing else -flat, torch.full_like(flat, float("inf")))
        order = key.argsort(stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(len(order))
        self.count = int(candidate.sum())
        self.ranks = list(torch.split(torch.where(candidate, ranks, len(order)), [len(m) for m in margins]))

    def apply(self, k: int) -> None:
        with torch.no_grad():
            for gate, original, rank in zip(self.gates, self.originals, self.ranks):
                chosen, untouched = rank < k, torch.zeros_like(rank, dtype=torch.bool)
                close, reopen = (chosen, untouched) if self.closing else (untouched, chosen)
                gate.param.copy_(landed(gate, original, close, reopen, self.margin))


def project_budget(
    model: nn.Module,
    low: float,
    high: float,
    margin: float = FINAL_MARGIN,
    at_least_low: bool = True,
    removed: float | None = None,
) -> Projection:
    """Move the fewest gates, each by the least, so that the removed fraction lies in [low, high].

    Too little removed: the open gates nearest their closing point close, just past it. Too much: the
    closed gates nearest it reopen, just short of it. The order is the gates' own values, so what is
    removed is what training ranked lowest; moved gates land `margin` x their family's edge past the
    closing point. The fraction moves in steps of whole units; where one unit jumps over the band, the
    result lands above `low` (`at_least_low`, as finalize promises) or on the side nearer the band.
    `removed`: the current fraction, when the caller has just measured it.
    """
    removed = budget_fraction(model) if removed is None else removed
    if low <= removed <= high:
        return Projection(0, 0, removed)
    closing = removed < low
    ranked = _Ranked(all_gates(model), closing, margin)

    @functools.cache
    def measured(k: int) -> float:  # one exact plan per k: each costs ~0.07 s on a 135M-parameter model
        ranked.apply(k)
        return budget_fraction(model)

    def removed_with(k: int) -> float:
        value = measured(k)
        ranked.apply(k)  # a cached value leaves the gates as the last k measured left them
        return value

    def done(k: int) -> bool:  # monotone in k: closing more only removes more, reopening only less
        return removed_with(k) >= low if closing else removed_with(k) <= high

    lo, hi = 0, ranked.count
    while lo < hi:
        mid = (lo + hi) // 2
        if done(mid):
            hi = mid
        else:
            lo = mid + 1
    jumped = removed_with(lo) < low if not closing else removed_with(lo) > high
    if jumped and 0 < lo:  # one unit jumped over the band
        over, under = (
            (removed_with(lo - 1), removed_with(lo))
            if not closing
            else (removed_with(lo), removed_with(lo - 1))
        )
        keep_over = at_least_low or over - high < low - under
        lo = lo - 1 if keep_over == (not closing) else lo
    achieved = removed_with(lo)
    return Projection(lo if closing else 0, 0 if closing else lo, achieved)


def _landing(cfg) -> float:
    """How far past the closing point projected gates land (x the edge): at least two gate steps, so
    that the next optimizer step cannot carry them straight back across."""
    return max(cfg.projection_margin, 2 * gate_lr(cfg) / GATE_CLASSES[cfg.gate_family].edge)


def budget_step(
    model: nn.Module, step: int | None = None, optimizer: torch.optim.Optimizer | None = None
) -> Projection | None:
    """After each optimizer step: bound the gate parameters, and hold the removed fraction on its budget
    at `step` (the controller's step count by default).

    During the warm-up the fraction is only capped at the ramped target + `budget_tolerance`: the gates
    close by themselves under the multipliers' pressure and learn meanwhile which units matter. From the
    end of the warm-up on it is held within `budget_tolerance` of the target on both sides, so whatever
    the gates have not closed by then is closed in the order of their trained values. (Holding it up to
    the ramped target from the first step, a cut that grows step by step, ranks gates before they have
    learned anything: post-trained SmolLM2 perplexity 197 against 80, BENCHMARKS.md.)

    Where the projection has to reopen gates, the pressure was too high: the first multiplier is reset
    to 0 if it was still pushing towards more sparsity (and likewise in the other direction), which stops
    the wind-up that made the plain Lagrangian overshoot; given the `optimizer`, its momentum for that
    multiplier is reset with it (Adam's first moment would otherwise carry it straight back). With
    `uniform_layers`, every layer's counts of
    heads, KV groups and FFN channels are then made equal (`finegates.uniform_layers`).
    """
    cfg = gates_config(model)
    for gate in all_gates(model):
        gate.clamp_(cfg.param_bound)
    if cfg.objective != "budget" or cfg.budget_tolerance is None:
        if cfg.uniform_layers:
            equalize_layers(model, _landing(cfg))
        return None
    ctrl = controller(model)
    warmup = warmup_steps(cfg)
    target = ctrl.target(budget_target(cfg), warmup, step)
    warmed_up = (int(ctrl.step) if step is None else step) >= warmup
    removed = budget_fraction(model)
    result = Projection(0, 0, removed)
    if removed - target > cfg.budget_tolerance or (warmed_up and target - removed > cfg.budget_tolerance):
        # back to the middle of the band, where the Lagrangian's dead band holds the multipliers
        half = cfg.budget_tolerance / 2
        result = project_budget(
            model, max(0.0, target - half), target + half, _landing(cfg), at_least_low=False, removed=removed
        )
    if cfg.uniform_layers:
        equalize_layers(model, _landing(cfg))
    with torch.no_grad():
        before = float(ctrl.lambda1)
        if result.reopened:
            ctrl.lambda1.clamp_(min=0.0)
        if result.closed:
            ctrl.lambda1.clamp_(max=0.0)
        if optimizer is not None and float(ctrl.lambda1) != before:
            forget_momentum(optimizer, ctrl.lambda1)
        ctrl.projected_closed += result.closed
        ctrl.projected_reopened += result.reopened
    return result


def attach_budget(
    optimizer: torch.optim.Optimizer, model: nn.Module, step: Callable[[], int] | None = None
) -> None:
    """Run the budget around every `optimizer.step()`: before it the multipliers hold inside the dead band
    (`SparsityController.hold_in_band`), after it `budget_step` with this optimizer. `step` returns the step
    the next forward pass trains at (default: the controller's count); the budget waits while it is <= 0.

    >>> finegates.attach_budget(opt, model)  # then: loss.backward(); opt.step()  # doctest: +SKIP
    """
    ctrl = controller(model)

    def after(*_) -> None:
        at = None if step is None else step()
        if at is None or at > 0:
            budget_step(model, at, optimizer)

    optimizer.register_step_pre_hook(lambda *_: ctrl.hold_in_band())
    optimizer.register_step_post_hook(after)


def forget_momentum(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
    """Zero the optimizer's running direction for `param` (Adam's first moment, SGD's momentum buffer)."""
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "momentum_buffer"):
        if isinstance(state.get(key), torch.Tensor):
            state[key].zero_()


@dataclass
class BudgetOutcome:
    """How a run reached its budget: what training itself removed and what finalize then changed."""

    target: float
    removed_by_training: float
    removed_after_finalize: float
    closed_gates: int  # gates closed at the end of training
    projected_closed: int  # gate closings the projection made over the run
    projected_reopened: int
    # target_speedup: the budget's measure is the removed share of predicted time; the speedup it predicts
    predicted_speedup: float | None = None
    # progressive compaction: the share of gated-layer weights cut out during training (None: off)
    weights_cut: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def metrics(self) -> dict:
        """The outcome as metrics.json records it: its fields and its warning."""
        return {**self.to_dict(), "warning": self.warning()}

    def warning(self) -> str | None:
        """A loud line when training removed much less or much more than the target (possible only without
        the budget projection, `budget_tolerance=None`), or when finalize overshot it (whole units too
        coarse for the target, e.g. an equal-layer shape), else None."""
        if self.removed_by_training - self.target > 0.02:
            return (
                f"training removed {self.removed_by_training:.1%} of the budget's measure for a target of "
                f"{self.target:.1%}; finalize_gates reopened gates to land on it, so the saved pattern is "
                "not the one trained. Keep the budget projection on (budget_tolerance), or lower gate_lr."
            )
        if self.target - self.removed_by_training > 0.02:
            return (
                f"training removed {self.removed_by_training:.1%} of the budget's measure for a target of "
                f"{self.target:.1%}; finalize_gates made the rest of the cut from the gate ranking. Train "
                "longer, or raise gate_lr."
            )
        if self.removed_after_finalize - self.target > 0.02:
            return (
                f"finalize_gates removed {self.removed_after_finalize:.1%} of the budget's measure for a "
                f"target of {self.target:.1%}: the whole units it cuts (with uniform_layers, the same KV "
                "groups, heads and residual dims in every layer) could not land closer. Lower the target, or "
                "train without uniform_layers (per-layer widths)."
            )
        return None


def budget_outcome(model: nn.Module, removed_by_training: float) -> BudgetOutcome:
    """The outcome of a finished run (call after finalize_gates), given the fraction before it."""
    cfg, ctrl = gates_config(model), controller(model)
    return BudgetOutcome(
        target=budget_target(cfg),
        removed_by_training=removed_by_training,
        removed_after_finalize=budget_fraction(model),
        closed_gates=sum(int(gate.closed().sum()) for gate in all_gates(model)),
        projected_closed=int(ctrl.projected_closed),
        projected_reopened=int(ctrl.projected_reopened),
        predicted_speedup=predicted_speedup(model) if cfg.target_speedup else None,
        weights_cut=weights_cut(model) if cfg.compact_every else None,
    )
