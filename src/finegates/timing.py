"""The one timer of every measurement in finegates and its benchmarks: callables timed in turns.

Each call runs once to warm up, then every call runs once per round, so a change in the machine's load
during the measurement affects all of them alike; rounds go on until there are `repeats` of them and each
call has run for `min_run_time` seconds in all. Wall-clock `time.perf_counter` around each call, under
`torch.inference_mode`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import numpy as np
import torch


def time_rounds(
    calls: dict[Hashable, Callable[[], object]],
    repeats: int = 3,
    min_run_time: float = 0.0,
    inference: bool = True,
) -> dict[Hashable, list[float]]:
    """Seconds of each call in every round (see the module docstring); under `torch.inference_mode`
    unless `inference=False` (calls that train).

    >>> runs = time_rounds({"a": lambda: None, "b": lambda: sum(range(100))}, repeats=4)
    >>> sorted(runs), [len(t) for t in runs.values()]
    (['a', 'b'], [4, 4])
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    runs: dict[Hashable, list[float]] = {name: [] for name in calls}
    if not calls:
        return runs
    with torch.inference_mode(inference):
        for call in calls.values():
            call()
        while len(next(iter(runs.values()))) < repeats or min(map(sum, runs.values())) < min_run_time:
            for name, call in calls.items():
                begin = time.perf_counter()
                call()
                runs[name].append(time.perf_counter() - begin)
    return runs


def time_in_turns(
    calls: dict[Hashable, Callable[[], object]],
    repeats: int = 3,
    min_run_time: float = 0.0,
    reduce: Callable[[list[float]], float] = np.median,
    inference: bool = True,
) -> dict[Hashable, float]:
    """Seconds of each call: the median of its rounds (`reduce=min`: the fastest, the round least
    disturbed by other load on a shared machine)."""
    runs = time_rounds(calls, repeats, min_run_time, inference)
    return {name: float(reduce(t)) for name, t in runs.items()}


def seconds(call: Callable[[], object], min_run_time: float, reduce=min) -> float:
    """Seconds of one call, timed for at least `min_run_time` (the fastest run by default)."""
    return time_in_turns({0: call}, min_run_time=min_run_time, reduce=reduce)[0]
