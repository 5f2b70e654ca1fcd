"""A model's module tree taken as fixed for a while: what the budget's bookkeeping looks up every step.

A training step asks for the gated layers, the blocks, the gate vectors and the stream's modules about
twenty times (the objective, the budget's projection check, the plan's cache key, the report, the log),
and each look-up walks the whole module tree (a third of the bookkeeping's ~15 ms per MiniLM step). Inside
`frozen_structure(model)` (`FineGatesTrainer.train` holds it for the whole run) each look-up walks once
and is remembered. Nothing the run does changes what they return: progressive compaction narrows weights
and swaps norm classes in place, it adds or removes no module, layer or gate. Code that does change the
tree (gating, `compress` building a new model) runs outside it.

>>> with frozen_structure(model):  # doctest: +SKIP
...     for batch in batches:
...         ...  # forward, sparsity_loss, backward, optimizer step, budget_step
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

_FROZEN = "_finegates_frozen_structure"
T = TypeVar("T")


@contextmanager
def frozen_structure(model: nn.Module) -> Iterator[nn.Module]:
    """Remember the structural look-ups of `model` until the block ends (re-entrant)."""
    outer = _FROZEN in model.__dict__
    model.__dict__.setdefault(_FROZEN, {})
    try:
        yield model
    finally:
        if not outer:
            model.__dict__.pop(_FROZEN, None)


def remembered(model: nn.Module, key: Hashable, compute: Callable[[], T]) -> T:
    """`compute()`, or inside `frozen_structure(model)` its first result for `key` (read-only)."""
    memo = model.__dict__.get(_FROZEN)
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]
