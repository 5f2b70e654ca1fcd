"""`GatesConfig`: every option of FineGates in one dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

GATE_FAMILIES = ("gaussian", "hard_concrete")
OBJECTIVES = ("budget", "paper")
BIAS_POLICIES = ("none", "gated", "all")
STRUCTURES = ("fine", "runtime")
CONFIG_NAME = "finegates_config.json"


T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """`cls(**data)`, refusing keys the dataclass does not have with a message naming `where`."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}. Known keys: {sorted(known)}.")
    return cls(**data)


@dataclass
class GatesConfig:
    """What to gate, how gates behave, and which sparsity the training must reach.

    >>> cfg = GatesConfig(target_sparsity=0.4)
    >>> GatesConfig.from_json(cfg.to_json()) == cfg
    True
    """

    target_sparsity: float = field(
        default=0.3,
        metadata={"help": "Fraction of gated-layer parameters to remove, in [0, 1)."},
    )
    target_speedup: float | None = field(
        default=None,
        metadata={
            "help": "Instead of target_sparsity: the speedup of the compacted model to reach, predicted from "
            "per-unit costs measured on this machine (latency_costs; `finegates bench --calibrate`)."
        },
    )
    latency_costs: str | None = field(
        default=None,
        metadata={"help": "With target_speedup: the costs file `finegates bench --calibrate` wrote."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to gate: None (defaults for the model type), 'all-linear', a list of "
            "names or name suffixes, or a regex string."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names, suffixes or a regex of modules never to gate."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules trained in full and saved with the gates (e.g. the task head)."},
    )
    structure: str = field(
        default="fine",
        metadata={
            "help": "'fine': a gate on every row and column of every gated layer (per-layer residual dims, "
            "head dims); 'runtime': gates on whole attention heads and KV groups, FFN channels and one "
            "residual-stream mask shared by every layer, the embeddings, the norms and the head."
        },
    )
    uniform_layers: bool = field(
        default=False,
        metadata={
            "help": "structure='runtime' only: every layer keeps the same numbers of KV groups, query heads "
            "per group and FFN channels (and, after finalize, a residual width divisible by the head "
            "count), so compress(model, uniform=True) is a stock config and class with nothing padded."
        },
    )
    bias: str = field(
        default="gated",
        metadata={"help": "Biases to train: 'none', 'gated' (biases of gated layers) or 'all'."},
    )
    gate_family: str = field(
        default="gaussian", metadata={"help": "'gaussian' (the paper's gates) or 'hard_concrete' (L0)."}
    )
    objective: str = field(
        default="budget",
        metadata={
            "help": "'budget': expected removable fraction driven to the target by a Lagrangian "
            "controller; 'paper': the reference per-layer |mean P - keep| loss times `lambda_sparsity`."
        },
    )
    lambda_sparsity: float = field(
        default=50.0, metadata={"help": "Weight of the 'paper' objective (the reference uses 50)."}
    )
    init_mean: float | None = field(
        default=None,
        metadata={
            "help": "Gaussian gates: mean of the initial theta (None: the top of the bounded range, "
            "param_bound x atanh(0.5), fully open; the reference uses 1.0)."
        },
    )
    init_std: float = field(
        default=0.0, metadata={"help": "Gaussian gates: std of the initial theta (the reference uses 0.1)."}
    )
    param_bound: float | None = field(
        default=2.0,
        metadata={
            "help": "Gate parameters stay within +-param_bound x the point where a gate is fully open (and "
            "mirrored, closed), so no gate is ever more than a fixed distance from closing or reopening. "
            "None: unbounded (the reference)."
        },
    )
    noise_std: float = field(default=0.1, metadata={"help": "Gaussian gates: std of the training noise."})
    paper_prob_scale: float = field(
        default=0.5, metadata={"help": "Gaussian gates: s in the reference's P = Phi((mu + 0.5) / s)."}
    )
    budget_temperature: float = field(
        default=0.25,
        metadata={
            "help": "Gaussian gates: temperature of the open probability used by the budget objective."
        },
    )
    budget_estimator: str = field(
        default="ste",
        metadata={
            "help": "'ste': the budget counts gates as 0/1 (what compaction removes) with the gradient of "
            "their open probability; 'expected': the expected size under independent open probabilities "
            "(a closed gate held at the bound still counts ~10% open, so it reads below what is removed)."
        },
    )
    hc_init_log_alpha: float | None = field(
        default=None,
        metadata={
            "help": "Hard-concrete gates: initial log alpha (None: the top of the bounded range, "
            "fully open; 3.0 when unbounded)."
        },
    )
    warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Steps over which the budget target ramps linearly from 0 "
            "(None: warmup_fraction of the run)."
        },
    )
    warmup_fraction: float = field(
        default=0.3,
        metadata={"help": "Share of the run the target ramps over when warmup_steps is None."},
    )
    budget_tolerance: float | None = field(
        default=0.01,
        metadata={
            "help": "Budget objective: after every optimizer step the removed fraction is capped at the "
            "warmed-up target plus this, and from the end of the warm-up on kept within this of the target, "
            "by moving the gates nearest their closing point (None: the Lagrangian alone)."
        },
    )
    lagrangian_lr_scale: float = field(
        default=10.0,
        metadata={"help": "Multiplier of the gate lr for the Lagrange multipliers' gradient ascent."},
    )
    projection_margin: float = field(
        default=0.1,
        metadata={
            "help": "Gates the budget projection moves land at least this far (x the distance from the "
            "centre to the closing point), and at least two gate lr steps, past their closing point, so they "
            "do not cross straight back."
        },
    )
    gate_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the gates, constant (None: a pushed gate closes within the warm-up)."
        },
    )
    head_lr: float = field(
        default=1e-3, metadata={"help": "Learning rate of the head, biases, modules_to_save."}
    )
    residual_min_removed: int = field(
        default=1,
        metadata={
            "help": "Compaction gathers/scatters residual-stream dims of a layer only when at least this "
            "many of them are closed (gathering costs a copy)."
        },
    )
    compact_every: int | None = field(
        default=None,
        metadata={
            "help": "Progressive compaction: every this many steps, heads and FFN channels whose gates are "
            "closed past compact_margin leave the frozen weights for good, so training gets cheaper as "
            "gates close (None: off; see finegates.progressive)."
        },
    )
    compact_margin: float = field(
        default=0.1,
        metadata={
            "help": "How far past its closing point (x the distance from the centre to it) a gate must be "
            "before progressive compaction removes its unit (0.1: where the budget projection lands the "
            "gates it closes, so they leave at the next compaction)."
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}.")
        if self.target_speedup is not None:
            if not self.target_speedup > 1.0:
                raise ValueError(f"target_speedup must be > 1, got {self.target_speedup}.")
            if self.objective != "budget":
                raise ValueError("target_speedup is a budget: it needs objective='budget'.")
        _check_choice("gate_family", self.gate_family, GATE_FAMILIES)
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("bias", self.bias, BIAS_POLICIES)
        _check_choice("structure", self.structure, STRUCTURES)
        if self.uniform_layers and self.structure != "runtime":
            raise ValueError(
                "uniform_layers=True equalises whole heads and channels across layers: it needs "
                "structure='runtime'."
            )
        if self.compact_every is not None and self.compact_every < 1:
            raise ValueError(f"compact_every must be >= 1 (or None: off), got {self.compact_every}.")
        if not (math.isfinite(self.compact_margin) and self.compact_margin >= 0):
            raise ValueError(f"compact_margin must be a number >= 0, got {self.compact_margin}.")
        bound, margin = self.param_bound, self.compact_margin
        if self.compact_every is not None and bound is not None and bound < 1.0 + margin:
            raise ValueError(
                f"compact_every with param_bound={bound} would remove nothing: gates are held within "
                f"{bound} x the edge of their closing point, and progressive compaction removes a unit "
                f"only once its gates are {1.0 + margin} x the edge past it (1 + compact_margin). Raise "
                "param_bound, lower compact_margin, or leave compact_every unset."
            )
        if self.compact_every is not None and self.uniform_layers:
            raise ValueError(
                "compact_every (progressive compaction) and uniform_layers cannot be combined: equalising "
                "layers may reopen gates that compaction has removed for good. Use one of them."
            )
        if self.structure == "runtime" and self.objective == "paper":
            raise ValueError(
                "objective='paper' averages per-layer row and column gates, which structure='runtime' "
                "ties across layers; use objective='budget' or structure='fine'."
            )
        _check_choice("budget_estimator", self.budget_estimator, ("ste", "expected"))
        for name in ("noise_std", "paper_prob_scale", "budget_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if not (math.isfinite(self.warmup_fraction) and 0 < self.warmup_fraction <= 1):
            raise ValueError(f"warmup_fraction must be in (0, 1], got {self.warmup_fraction}.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(
                f"warmup_steps must be >= 0 (or None for warmup_fraction of the run), "
                f"got {self.warmup_steps}."
            )
        if self.gate_lr is not None and not (math.isfinite(self.gate_lr) and self.gate_lr > 0):
            raise ValueError(f"gate_lr must be a positive number (or None), got {self.gate_lr}.")
        if self.budget_tolerance is not None and not (
            math.isfinite(self.budget_tolerance) and self.budget_tolerance >= 0
        ):
            raise ValueError(
                f"budget_tolerance must be a number >= 0 (or None), got {self.budget_tolerance}."
            )
        if self.param_bound is not None and not (math.isfinite(self.param_bound) and self.param_bound >= 1.0):
            raise ValueError(
                "param_bound must be >= 1 (gates must be able to open fully) or None, got "
                f"{self.param_bound}."
            )

    @classmethod
    def reference(cls, **overrides: Any) -> GatesConfig:
        """The reference code's gates and loss: theta ~ N(1, 0.1), unbounded, the soft per-layer loss
        (`objective="paper"`, lambda 50), gate lr 1e-3, no projection onto the budget.

        >>> GatesConfig.reference().objective
        'paper'
        """
        values = {
            "init_mean": 1.0,
            "init_std": 0.1,
            "param_bound": None,
            "objective": "paper",
            "gate_lr": 1e-3,
            "budget_tolerance": None,
            "warmup_steps": 0,
        }
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GatesConfig:
        return dataclass_from_dict(cls, data, cls.__name__)

    @classmethod
    def from_json(cls, text: str) -> GatesConfig:
        return cls.from_dict(json.loads(text))

    def save(self, directory: str | Path) -> Path:
        from finegates.io_utils import atomic_write_text

        return atomic_write_text(Path(directory) / CONFIG_NAME, self.to_json())

    @classmethod
    def load(cls, directory: str | Path) -> GatesConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {directory}: is this a folder written by save_gates?"
            )
        try:
            return cls.from_json(path.read_text())
        except (json.JSONDecodeError, ValueError, TypeError) as err:
            raise ValueError(
                f"{path} cannot be read as a gate config ({err}); the adapter folder is damaged or from "
                "another version: save the adapter again with save_gates."
            ) from None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {list(choices)}.")
