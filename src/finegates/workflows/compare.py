"""`finegates compare`: every method on the same model, data, seed and budget; one table, one Pareto plot.

Each (method, sparsity) run happens in its own process, so its peak memory is its own, and writes
`results/<method>@<sparsity>.json`; a re-run skips the results already on disk. Methods whose size
does not depend on the budget (full, lora, and maskllm's fixed 2:4 pattern) run once.
"""

from __future__ import annotations

import copy
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from finegates.config import STRUCTURES, dataclass_from_dict
from finegates.io_utils import atomic_write_text
from finegates.workflows.run_config import (
    RUN_CONFIG_NAME,
    PrecisionOptions,
    run_config_payload,
    write_run_config,
)
from finegates.workflows.run_folder import RunFolderError, differing_keys, exclusive

logger = logging.getLogger(__name__)

ALL_METHODS = (
    "full",
    "lora",
    "magnitude",
    "magnitude+lora",
    "importance",
    "importance+lora",
    "squarehead",
    "salr",
    "maskllm",
    "finegates",
    "finegates+kd",
)
BUDGET_FREE = ("full", "lora", "maskllm")
TEACHER = "teacher"


@dataclass
class CompareConfig(PrecisionOptions):
    """What to compare and on how much data."""

    model: str = field(default="minilm", metadata={"help": "Embedded name, hub id or local folder."})
    task: str = field(default="reuters8", metadata={"help": "Embedded task or a local data file."})
    methods: list[str] = field(
        default_factory=lambda: list(ALL_METHODS), metadata={"help": "Methods to run."}
    )
    sparsity: list[float] = field(
        default_factory=lambda: [0.2, 0.4], metadata={"help": "Budgets (fraction removed)."}
    )
    text_column: str = field(default="text", metadata={"help": "Text column of a local data file."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Second text column (sentence pairs)."}
    )
    label_column: str = field(default="label", metadata={"help": "Label column of a local data file."})
    max_train_samples: int = field(default=1000, metadata={"help": "Training rows (seeded subset)."})
    max_test_samples: int = field(default=1000, metadata={"help": "Test rows (seeded subset)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    epochs: int = field(default=2, metadata={"help": "Training epochs of every method."})
    output_dir: str = field(default="runs/compare", metadata={"help": "Run folder."})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Drop the results already in output_dir (kept and reused by default when the "
            "comparison's options are the same)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of data subset, order and initialisation."})
    structure: str = field(
        default="fine",
        metadata={
            "help": "Gate structure of the finegates methods: 'fine' or 'runtime' (GatesConfig.structure)."
        },
    )

    learning_rates: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Learning rates other than a method's default, as METHOD=LR (e.g. full=3e-4 lora=1e-3); "
            "for finegates methods the head's (the gates keep gate_lr)."
        },
    )
    validation_samples: int = field(
        default=0,
        metadata={
            "help": "Training rows held out (before the training subset is drawn) to score every run on; "
            "needed by lr_sweep, which picks on them."
        },
    )
    lr_sweep: list[float] = field(
        default_factory=list,
        metadata={
            "help": "Multipliers of each method's learning rate (its default or learning_rates') to train "
            "with, e.g. 0.3 1 3: the table keeps, per method and budget, the run with the best validation "
            "accuracy (the others are listed under it). The distillation teacher is full finetuning at x1."
        },
    )

    def __post_init__(self) -> None:
        # The command line gives "full,lora" or "full lora"; both mean the same list.
        self.methods = _split(self.methods)
        self.learning_rates = _split(self.learning_rates)
        learning_rates(self)  # a clear error now rather than in a method's own process
        try:
            self.lr_sweep = [float(m) for m in _split(self.lr_sweep)]
        except ValueError as err:
            raise ValueError(f"lr_sweep must be numbers (multipliers), got {self.lr_sweep}.") from err
        distinct = len(set(self.lr_sweep)) == len(self.lr_sweep)
        if not distinct or not all(0 < m < float("inf") for m in self.lr_sweep):
            raise ValueError(f"lr_sweep must be distinct positive multipliers, got {self.lr_sweep}.")
        if self.validation_samples < 0:
            raise ValueError(f"validation_samples must be >= 0, got {self.validation_samples}.")
        if self.lr_sweep and not self.validation_samples:
            raise ValueError(
                "lr_sweep picks each method's learning rate on held-out rows: give --validation-samples "
                "(e.g. 256), so that the test rows are never used to choose."
            )
        try:
            self.sparsity = [float(s) for s in _split(self.sparsity)]
        except ValueError as err:
            raise ValueError(f"sparsity must be numbers, got {self.sparsity}.") from err
        unknown = sorted(set(self.methods) - set(ALL_METHODS))
        if unknown:
            raise ValueError(f"Unknown methods {unknown}; choose from {list(ALL_METHODS)}.")
        if not self.sparsity or not all(0 < s < 1 for s in self.sparsity):
            raise ValueError(f"sparsity must be fractions in (0, 1), got {self.sparsity}.")
        if self.structure not in STRUCTURES:
            raise ValueError(f"Unknown structure {self.structure!r}; choose one of {list(STRUCTURES)}.")


def _split(values: list | str) -> list:
    values = [values] if isinstance(values, str | float | int) else values
    return [
        part.strip() if isinstance(part, str) else part
        for v in values
        for part in (v.split(",") if isinstance(v, str) else [v])
        if part != ""
    ]


def learning_rates(cfg: CompareConfig) -> dict[str, float]:
    """`cfg.learning_rates` as {method: lr}."""
    rates = {}
    for item in cfg.learning_rates:
        method, sep, value = str(item).partition("=")
        try:
            rate = float(value) if sep else None
        except ValueError:
            rate = None
        if rate is None or not rate > 0 or rate == float("inf"):
            raise ValueError(
                f"learning_rates: {item!r} is not METHOD=LR with a positive number (e.g. full=3e-4)."
            )
        if method not in ALL_METHODS:
            raise ValueError(f"learning_rates: unknown method {method!r}; choose from {list(ALL_METHODS)}.")
        rates[method] = rate
    return rates


def _runs(cfg: CompareConfig) -> list[tuple[str, float | None, float | None]]:
    """(method, budget, learning-rate multiplier: None without a sweep) of every run."""
    scales = cfg.lr_sweep or [None]
    return [
        ((m, None) if m in BUDGET_FREE else (m, s)) + (scale,)
        for m in cfg.methods
        for s in cfg.sparsity
        if m not in BUDGET_FREE or s == cfg.sparsity[0]
        for scale in scales
    ]


def _key(method: str, sparsity: float | None, scale: float | None = None) -> str:
    return f"{method}@{'-' if sparsity is None else sparsity}" + ("" if scale is None else f"@x{scale}")


def method_lr(cfg: CompareConfig, method: str, scale: float | None = None) -> float:
    """The learning rate a method trains with: its default or `learning_rates`' value, x `scale`."""
    from finegates.baselines.registry import METHODS

    name = "full" if method == TEACHER else method
    base = learning_rates(cfg).get(name, METHODS[name].default_lr)
    return base * (1.0 if scale is None else scale)


def _method_config(method: str, sparsity: float | None, structure: str = "fine"):
    from finegates.baselines.registry import METHODS

    cls = METHODS[method].config_class
    if sparsity is None:
        return cls()
    if method in ("finegates", "finegates+kd"):
        return cls(gates={"target_sparsity": sparsity, "structure": structure})
    return cls(target_sparsity=sparsity)


def _batches(cfg: CompareConfig):
    from finegates.data.hub import Columns
    from finegates.data.registry import load_classification
    from finegates.workflows.encoding import EncodedSplit
    from finegates.workflows.models import load_classifier

    columns = Columns(text=cfg.text_column, label=cfg.label_column, text_pair=cfg.text_pair_column)
    data = load_classification(cfg.task, columns)
    pool = data.train
    validation = None
    if cfg.validation_samples:
        validation, pool = pool.sample(cfg.validation_samples, cfg.seed)
    train, _ = pool.sample(cfg.max_train_samples, cfg.seed)
    test, _ = data.test.sample(cfg.max_test_samples, cfg.seed)
    _, tokenizer = load_classifier(cfg.model, data.num_labels)
    collate = DataCollatorWithPadding(tokenizer)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        EncodedSplit(train, tokenizer, cfg.max_length),
        cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=gen,
    )

    def batches(split) -> list:
        return list(DataLoader(EncodedSplit(split, tokenizer, cfg.max_length), 64, collate_fn=collate))

    return data, list(loader), batches(test), batches(validation) if validation is not None else None


def _scores(model, test_batches, validation_batches) -> dict[str, float]:
    scores = _accuracy(model, test_batches)
    if validation_batches is not None:
        scores["validation_accuracy"] = _accuracy(model, validation_batches)["accuracy"]
    return scores


@torch.no_grad()
def _accuracy(model, test_batches) -> dict[str, float]:
    correct = total = 0
    device = next(model.parameters()).device  # the Trainer leaves the model on its GPU, where there is one
    for batch in test_batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        predictions = model(**inputs).logits.argmax(-1).cpu()
        correct, total = correct + int((predictions == batch["labels"]).sum()), total + len(predictions)
    return {"accuracy": correct / total}


def _size_on_disk(result) -> int:
    if result.name == "salr":
        from finegates.baselines.salr import salr_storage_bytes

        return salr_storage_bytes(result.model)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(result.model, f"{tmp}/model.safetensors")
        return Path(f"{tmp}/model.safetensors").stat().st_size


def _latencies(model, reference, cfg: CompareConfig, vocab: int) -> dict[str, float]:
    """Median latency at batch 1 and 32 of the method's model and of the dense base model, timed in turns
    in this process, and the speedup as the median of the per-round ratios: a side-by-side figure,
    whatever else the machine runs. Both run on the same GEMM routes (`use_compact_linears`, as in
    `bench`; a copy of the method's model), so a method that removes nothing reads 1.0x."""
    from finegates.compress.linear import use_compact_linears
    from finegates.workflows.encoding import benchmark_batch
    from finegates.workflows.evaluation import paired_speedup

    model, reference = use_compact_linears(copy.deepcopy(model)), use_compact_linears(reference)
    row = {}
    for b in (1, 32):
        m, dense, speedup = paired_speedup(model, reference, benchmark_batch(b, cfg.max_length, vocab))
        row.update({f"latency_b{b}_s": m, f"dense_latency_b{b}_s": dense, f"speedup_b{b}": speedup})
    return row


def _csr_timing(model, cfg: CompareConfig, vocab: int) -> dict[str, float]:
    """SquareHead's unstructured layers through torch's CSR matmul vs dense-shaped, batch 32 (CPU)."""
    from finegates.baselines.masks import target_linears
    from finegates.baselines.sparse_inference import measure_cpu_inference
    from finegates.workflows.encoding import benchmark_batch

    timing = measure_cpu_inference(
        model, list(target_linears(model, None)), benchmark_batch(32, cfg.max_length, vocab), min_run_time=0.5
    )
    return {"dense_ms": timing.dense_ms, "csr_ms": timing.sparse_ms, "layer_sparsity": timing.sparsity}


def run_one(
    cfg: CompareConfig, method: str, sparsity: float | None, scale: float | None = None
) -> dict[str, Any]:
    """Train, finalize and measure one method (called in a fresh process by `compare`); `scale`
    multiplies its learning rate (`lr_sweep`)."""
    from finegates.baselines.loop import train_method
    from finegates.workflows.models import load_classifier

    data, train, test, validation = _batches(cfg)
    torch.manual_seed(cfg.seed)
    model, _ = load_classifier(cfg.model, data.num_labels)
    teacher = None
    teacher_path = Path(cfg.output_dir) / TEACHER
    if method in ("squarehead", "finegates+kd"):
        teacher, _ = load_classifier(str(teacher_path), data.num_labels)
    name = "full" if method == TEACHER else method
    lr = method_lr(cfg, method, scale)
    begin = time.perf_counter()
    result = train_method(
        name,
        model,
        train,
        lambda m: _scores(m, test, validation),
        config=_method_config(name, sparsity, cfg.structure),
        teacher=teacher,
        epochs=cfg.epochs,
        lr=lr,
        seed=cfg.seed,
        bf16=cfg.bf16,
    )
    wall = time.perf_counter() - begin
    result.model.cpu()  # the latency and size figures are the CPU's
    if name == "full" and scale in (None, 1.0):  # the distillation teacher: trained once per comparison
        result.model.save_pretrained(teacher_path)
    row = {
        "method": method,
        "sparsity": sparsity,
        "lr": lr,
        "lr_scale": scale,
        **result.metrics,
        "wall_s": wall,
        "trainable_params": result.trainable_parameters,
        "removed_params": result.removed_parameters,
        "kind_of_sparsity": result.kind_of_sparsity,
        "size_bytes": _size_on_disk(result),
        "step_s": result.step_seconds,
        **_latencies(
            result.model, load_classifier(cfg.model, data.num_labels)[0], cfg, model.config.vocab_size
        ),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if name == "squarehead":
        row["csr_b32"] = _csr_timing(result.model, cfg, model.config.vocab_size)
    return row


def compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Run every (method, budget) not already on disk, then write `comparison.md` and `pareto.png`."""
    with exclusive(cfg.output_dir) as out:
        _check_cached_results(out, cfg)
        (out / "results").mkdir(parents=True, exist_ok=True)
        write_run_config(out, {"compare": cfg})
        return _compare(cfg, out)


# Options that extend a comparison rather than change it: its cached results stay valid.
EXTENDING_KEYS = frozenset({"methods", "sparsity", "lr_sweep", "overwrite"})


def _check_cached_results(out: Path, cfg: CompareConfig) -> None:
    """Results on disk are reused only for the same comparison: other methods or budgets extend it, any
    other option (model, task, steps...) would mix two comparisons in one table."""
    previous = out / RUN_CONFIG_NAME
    if cfg.overwrite:
        for cached in ("results", TEACHER):
            if (out / cached).is_dir():
                shutil.rmtree(out / cached)
    if cfg.overwrite or not previous.is_file():
        return
    old = json.loads(previous.read_text()).get("compare", {})
    new = run_config_payload({"compare": cfg})["compare"]
    differing = differing_keys(old, new, EXTENDING_KEYS)
    if differing:
        raise RunFolderError(
            f"{out} holds the results of another comparison ({', '.join(differing)} differ). "
            "Give --overwrite to replace them, or another --output-dir."
        )


def _compare(cfg: CompareConfig, out: Path) -> list[dict[str, Any]]:
    runs = _runs(cfg)
    if any(m in ("squarehead", "finegates+kd") for m, _, _ in runs):
        # The teacher is the full finetuning run (at x1 in a sweep): run it first, or on its own.
        scale = 1.0 if cfg.lr_sweep else None
        first = ("full", None, scale) if ("full", None, scale) in runs else (TEACHER, None, None)
        runs = [first, *(r for r in runs if r != first)]
    for method, sparsity, scale in runs:
        path = out / "results" / f"{_key(method, sparsity, scale)}.json"
        if path.is_file():
            logger.info("%s: done already, skipped", path.name)
            continue
        cmd = [
            sys.executable,
            "-m",
            "finegates.workflows.compare",
            str(out / "run_config.json"),
            method,
            str(sparsity),
            str(scale),
        ]
        subprocess.run(cmd, check=True)
    rows = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    rows = [r for r in rows if r["method"] != TEACHER]
    atomic_write_text(out / "comparison.md", comparison_table(rows))
    from finegates.workflows.plots import plot_pareto  # matplotlib: only once there is something to plot

    plot_pareto(picked_rows(rows), out / "pareto.png")
    return rows


def picked_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, budget), the run with the best validation accuracy where a sweep ran (a run from
    before the sweep was added is not picked: it was not chosen on validation), every row where none
    ran; in the order of `rows`."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["method"], r["sparsity"])
        if r.get("lr_scale") is not None and (
            key not in best or r["validation_accuracy"] > best[key]["validation_accuracy"]
        ):
            best[key] = r
    return [r for r in rows if best.get((r["method"], r["sparsity"]), r) is r]


def _speedups(row: dict[str, Any], full: dict[str, Any] | None) -> str:
    """Batch-1 / batch-32 speedup over the dense model timed beside it (older rows: over the `full` row)."""
    if "speedup_b1" in row:
        return f"{row['speedup_b1']:.2f}x / {row['speedup_b32']:.2f}x"
    if "dense_latency_b1_s" in row:
        reference = row["dense_latency_b1_s"], row["dense_latency_b32_s"]
    elif full is not None:
        reference = full["latency_b1_s"], full["latency_b32_s"]
    else:
        return "n/a"
    return f"{reference[0] / row['latency_b1_s']:.2f}x / {reference[1] / row['latency_b32_s']:.2f}x"


def comparison_table(rows: list[dict[str, Any]]) -> str:
    from finegates.workflows.run_report import markdown_table  # imports matplotlib

    swept = [r for r in rows if r.get("lr_scale") is not None]
    rows = picked_rows(rows)
    dense = next((r for r in rows if r["method"] == "full"), None)
    validation = any("validation_accuracy" in r for r in rows)
    header = [
        "method",
        "budget",
        "lr",
        "accuracy",
        *(["validation accuracy"] if validation else []),
        "trainable params",
        "removed params (kind)",
        "size (MB)",
        "latency b1 (ms)",
        "latency b32 (ms)",
        "speedup b1 / b32 vs dense",
        "step (s)",
        "train wall (s)",
        "peak RSS (MB)",
    ]
    table = [
        [
            r["method"],
            r["sparsity"] if r["sparsity"] is not None else "-",
            f"{r['lr']:.0e}" if "lr" in r else "default",
            f"{r['accuracy']:.4f}",
            *(
                [f"{r['validation_accuracy']:.4f}" if "validation_accuracy" in r else "-"]
                if validation
                else []
            ),
            f"{r['trainable_params']:,d}",
            f"{r['removed_params']:,d} ({r['kind_of_sparsity']})",
            f"{r['size_bytes'] / 2**20:.1f}",
            f"{r['latency_b1_s'] * 1e3:.1f}",
            f"{r['latency_b32_s'] * 1e3:.0f}",
            _speedups(r, dense),
            f"{r['step_s']:.2f}",
            f"{r.get('wall_s', float('nan')):.0f}",
            f"{r['peak_rss_mb']:.0f}",
        ]
        for r in rows
    ]
    note = (
        "\nSpeedups: the dense base model timed in turns with each method's model in the same process, "
        "median of the per-round ratios (older rows: ratio of the medians, or against the `full` row).\nCPU "
        "only: maskllm's 2:4 pattern and squarehead/salr's unstructured sparsity have no CPU kernel here, "
        "so their latency is that of their dense-shaped (or decoded) weights.\n"
    )
    csr = [
        f"- squarehead at {r['sparsity']}: its layers ({r['csr_b32']['layer_sparsity']:.1%} zeros) through "
        f"torch's CSR matmul take {r['csr_b32']['csr_ms']:.0f} ms at batch 32 vs "
        f"{r['csr_b32']['dense_ms']:.0f} ms dense-shaped "
        f"({r['csr_b32']['dense_ms'] / r['csr_b32']['csr_ms']:.2f}x)"
        for r in rows
        if "csr_b32" in r
    ]
    sweep = [
        f"- {r['method']} at {r['sparsity'] if r['sparsity'] is not None else '-'}, lr {r['lr']:.0e} "
        f"(x{r['lr_scale']}): validation {r['validation_accuracy']:.4f}, test {r['accuracy']:.4f}"
        + (" (picked)" if any(r is p for p in rows) else "")
        for r in swept
    ]
    if sweep:
        sweep = ["\nLearning-rate sweep (each method's row above is its best validation accuracy):", *sweep]
    extra = [*csr, *sweep]
    return markdown_table(header, table) + "\n" + note + ("\n" + "\n".join(extra) + "\n" if extra else "")


def _main(argv: list[str]) -> None:
    config_path, method, sparsity, scale = argv
    cfg = dataclass_from_dict(
        CompareConfig, json.loads(Path(config_path).read_text())["compare"], config_path
    )
    value = None if sparsity == "None" else float(sparsity)
    multiplier = None if scale == "None" else float(scale)
    row = run_one(cfg, method, value, multiplier)
    target = Path(cfg.output_dir) / "results" / f"{_key(method, value, multiplier)}.json"
    atomic_write_text(target, json.dumps(row, indent=2, sort_keys=True))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    _main(sys.argv[1:])
