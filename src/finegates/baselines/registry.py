"""`METHODS`: method name -> class; `make_method(name)` builds a fresh, unprepared instance."""

from __future__ import annotations

from finegates.baselines.base import Method
from finegates.baselines.finegates_kd import FineGatesKD, FineGatesMethod
from finegates.baselines.full import FullFinetuning
from finegates.baselines.lora import LoRAMethod
from finegates.baselines.magnitude import (
    ActivationImportance,
    ActivationImportanceLoRA,
    MagnitudeLoRA,
    MagnitudePruning,
)
from finegates.baselines.maskllm import MaskLLM
from finegates.baselines.salr import SALR
from finegates.baselines.squarehead import SquareHead

METHODS: dict[str, type] = {
    cls.name: cls
    for cls in (
        FullFinetuning,
        LoRAMethod,
        MagnitudePruning,
        MagnitudeLoRA,
        ActivationImportance,
        ActivationImportanceLoRA,
        SquareHead,
        SALR,
        MaskLLM,
        FineGatesMethod,
        FineGatesKD,
    )
}


def make_method(name: str) -> Method:
    """A new instance of the method called `name` (one instance per run: methods keep per-run state)."""
    try:
        return METHODS[name]()
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; choose one of {sorted(METHODS)}.") from None
