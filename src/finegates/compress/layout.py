"""Weight layouts for decoding on CPU: column-major weights where a one-token GEMV streams them faster.

Greedy decoding multiplies one token by every weight, so its time is how fast each weight streams from
memory, and on CPU builds of torch that depends on the weight's layout. `F.linear(x, W)` with W stored
row-major (out x in, torch's layout) runs one dot product of length `in` per output; with W stored
column-major (`W = Wt.t()` for a contiguous in x out `Wt`) the same call runs `x @ Wt`, which streams rows
of length `out`. On the 2-core AMD EPYC VM (BENCHMARKS.md, `python benchmarks/gemv_widths.py`, two passes)
the column-major GEMV read SmolLM2's 1,536 x 576 up projection 1.3-1.8x faster and its 49,152 x 576 LM head
1.7-2x faster, and a compacted 450 x 1,228 down projection 0.7x as fast: tall matrices gain, wide ones
lose. Outputs are the same products summed in another order (float32 rounding). It is a layout for
decoding: at 256 rows a GEMM runs the same in either layout, a full-vocabulary LM head 0.9x; an embedding
tied to a column-major head gathers each token's row from strided memory (~22 us per token for SmolLM2's,
against 0.2 us: a prompt's 256 tokens cost 5.6 ms once, a decoding step's one token nothing measurable).
The layout is a storage detail: shapes, parameters, ties (an LM head tied to the embeddings stays one
tensor) and `state_dict` values are unchanged, but transformers' `save_pretrained` fails on a
column-major tied head (its check for shared tensors views each as flat), so save with the stock layout
back (`restore()`, or `decode_layout(model, "rows")`).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

LAYOUTS = ("auto", "columns", "rows")
PROBE_BYTES = 64 << 20  # time a shape's GEMV over this many bytes of its weights: more than the caches
WIN = 0.95  # "auto" keeps the column-major layout only where it takes at most this share of the time


def is_column_major(weight: torch.Tensor) -> bool:
    """The 2-D tensor is stored column-major (the transpose of a contiguous tensor) and not row-major."""
    return weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous()


def shape_class(weight: torch.Tensor) -> str:
    """The weight's orientation, "tall" (at least as many rows, outputs, as columns) or "wide": the GEMV
    kernels' speed in either layout follows it (the longer dim is the one worth streaming)."""
    return "tall" if weight.shape[0] >= weight.shape[1] else "wide"


def _weights(model: nn.Module) -> dict[tuple[str, torch.dtype], list[nn.Parameter]]:
    """The plain float CPU weights of the model's nn.Linear modules (a tied one once), in module order,
    by (shape class, dtype)."""
    groups: dict[tuple[str, torch.dtype], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            not isinstance(module, nn.Linear)
            or not isinstance(weight, nn.Parameter)
            or type(weight.data) is not torch.Tensor  # e.g. a quantized tensor subclass
            or weight.dim() != 2
            or weight.numel() == 0  # a layer compaction emptied
            or not weight.is_floating_point()
            or weight.device.type != "cpu"
            or id(weight) in seen
        ):
            continue
        seen.add(id(weight))
        groups.setdefault((shape_class(weight), weight.dtype), []).append(weight)
    return groups


def _gemv_seconds(weights: list[torch.Tensor], repeats: int = 3) -> float:
    """Best time of one pass of one-token F.linear over `weights` (the first pass warms up)."""
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for w in weights:
                F.linear(inputs[w.shape[1]], w)
            best = min(best, time.perf_counter() - start)
    return best


def _columns_pay(weights: list[nn.Parameter]) -> bool:
    """A GEMV over (up to PROBE_BYTES of) these weights is at least 1 - WIN faster column-major than
    row-major (both timed twice, in turns)."""
    probe, left = [], PROBE_BYTES
    for w in weights:  # a matrix larger than what is left (an LM head) is probed on its first rows
        rows = min(w.shape[0], -(-left // (w.shape[1] * w.element_size())))
        probe.append(w.detach()[:rows].contiguous())
        left -= probe[-1].numel() * w.element_size()
        if left <= 0:
            break
    columns = [w.t().contiguous().t() for w in probe]
    rows_s = cols_s = 0.0
    for _ in range(2):
        rows_s += _gemv_seconds(probe)
        cols_s += _gemv_seconds(columns)
    return cols_s <= WIN * rows_s


def _store(weight: nn.Parameter, columns: bool) -> None:
    """Re-store the weight's values column-major (`columns`) or row-major, in place (the same Parameter)."""
    weight.data = weight.data.t().contiguous().t() if columns else weight.data.contiguous()


class DecodeLayout:
    """The weights one `decode_layout` call re-stored; `restore()` (or leaving a `with` block) puts each back
    in the layout it had."""

    def __init__(self, changed: list[tuple[nn.Parameter, bool]], classes: dict[str, str]) -> None:
        self.changed = changed  # (weight, stored column-major by the call)
        self.classes = classes  # shape class ("tall", "wide") -> the layout chosen for it

    @property
    def columns(self) -> int:
        """How many weights this call stored column-major."""
        return sum(to_columns for _, to_columns in self.changed)

    def restore(self) -> None:
        with torch.no_grad():
            for weight, to_columns in self.changed:
                _store(weight, not to_columns)
        self.changed = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        chosen = ", ".join(f"{shapes}: {layout}" for shapes, layout in self.classes.items())
        return f"DecodeLayout({self.columns} weights made column-major; {chosen})"


def decode_layout(model: nn.Module, layout: str = "auto") -> DecodeLayout:
    """Store the CPU weights of `model`'s linear layers in the layout whose one-token GEMV is fastest, in
    place; for decoding (`generate`) on CPU. Returns a `DecodeLayout` whose `restore()` undoes it, also
    usable as a context manager.

    `layout`: "auto" times the GEMVs of tall weights (at least as many rows as columns) and of wide ones
    in both layouts, over the model's own weights (up to 64 MB of each class, more than the caches
    hold; 0.4-0.6 s for SmolLM2-135M on 1 thread), and stores a class column-major where that is at
    least 5% faster;
    "columns" stores the tall weights column-major and the wide ones row-major (what "auto" finds on
    x86 CPUs: BENCHMARKS.md); "rows" stores every weight row-major (torch's layout), whoever changed
    it. Other devices' weights are left as they are.

    >>> with decode_layout(model):  # doctest: +SKIP
    ...     text = model.generate(**prompt, max_new_tokens=64)
    """
    if layout not in LAYOUTS:
        raise ValueError(f"decode_layout: layout must be one of {', '.join(LAYOUTS)}, not {layout!r}.")
    changed: list[tuple[nn.Parameter, bool]] = []
    classes: dict[str, str] = {}
    with torch.no_grad():
        for (shapes, _), weights in _weights(model).items():
            if layout == "rows":
                choice = "rows"
            elif layout == "columns":
                choice = "columns" if shapes == "tall" else "rows"
            else:
                choice = "columns" if _columns_pay(weights) else "rows"
            classes[shapes] = choice
            for weight in weights:
                to_columns = choice == "columns"
                already = is_column_major(weight) if to_columns else weight.is_contiguous()
                if not already:
                    _store(weight, to_columns)
                    changed.append((weight, to_columns))
    return DecodeLayout(changed, classes)
