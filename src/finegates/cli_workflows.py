r"""Subcommands for the causal-LM workflows and the method comparison: posttrain, pretrain, compare.

finegates posttrain --model smollm2-135m --target-sparsity 0.3 --max-steps 100
finegates pretrain --max-steps 300 --gate-start-step 100 --target-sparsity 0.4
finegates compress --gates runs/r8/gates --output-dir small/
finegates bench --model small/ --base-model minilm --batch-size 32 --length 128
finegates bench --calibrate --model smollm2-135m --batch-size 1 --length 256
finegates bench --model runs/post/compressed --base-model smollm2-135m --batch-size 1 --length 256 \
    --decode-tokens 32
finegates compare --model minilm --task reuters8 --methods full,lora,finegates --sparsity 0.2,0.4
finegates export runs/post/compressed --format onnx --output-dir runs/post/onnx
finegates export runs/post/compressed --format gguf --output-dir runs/post/gguf
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from finegates.cli_args import add_dataclass_arguments, build_configs, changed_fields, configure_logging
from finegates.config import GatesConfig


def _parser(
    subparsers,
    name: str,
    help_text: str,
    sections: dict[str, type],
    handler: Callable,
    defaults: dict[str, dict] | None = None,
) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options.")
    for section, cls in sections.items():
        group = parser.add_argument_group(f"{section} options ({cls.__name__})")
        add_dataclass_arguments(group, cls, (defaults or {}).get(section))
    parser.set_defaults(handler=handler)


def _lm_sections(kind: str) -> dict[str, type]:
    if kind == "posttrain":
        from finegates.workflows.posttrain import PosttrainConfig as cls
    else:
        from finegates.workflows.pretrain import PretrainConfig as cls
    return {kind: cls, "gates": GatesConfig}


def _run_posttrain(args: argparse.Namespace) -> int:
    from finegates.workflows.posttrain import default_posttrain_gates, posttrain

    configs = build_configs(
        args, _lm_sections("posttrain"), defaults={"gates": default_posttrain_gates().to_dict()}
    )
    configure_logging(configs["posttrain"].quiet)
    metrics = posttrain(configs["posttrain"], configs["gates"])
    s = metrics["sparsity"]
    print(
        f"perplexity: dense {metrics['dense']['perplexity']:.2f}, compacted "
        f"{metrics['compacted']['perplexity']:.2f}; removed {s['removed_fraction']:.2%} of gated-layer "
        f"parameters; prefill speedup {metrics['prefill_speedup']:.2f}x"
    )
    out = configs["posttrain"].output_dir
    print(f"Report: {out}/report.md")
    print(f"Every held-out block and zero-shot item: finegates evaluate --model {out}/compressed")
    return 0


def _run_pretrain(args: argparse.Namespace) -> int:
    from finegates.workflows.pretrain import default_pretrain_gates, pretrain

    configs = build_configs(
        args, _lm_sections("pretrain"), defaults={"gates": default_pretrain_gates().to_dict()}
    )
    configure_logging(configs["pretrain"].quiet)
    metrics = pretrain(configs["pretrain"], configs["gates"])
    print(
        f"held-out perplexity: dense {metrics['dense']['perplexity']:.3f}, gated "
        f"{metrics['gated']['perplexity']:.3f}; removed {metrics['sparsity']['removed_fraction']:.2%} of "
        "gated-layer parameters"
    )
    print(f"Report: {configs['pretrain'].output_dir}/report.md")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from finegates.workflows.compare import CompareConfig, compare

    cfg = build_configs(args, {"compare": CompareConfig})["compare"]
    configure_logging(quiet=False)
    compare(cfg)
    print(f"Table: {cfg.output_dir}/comparison.md  Plot: {cfg.output_dir}/pareto.png")
    return 0


def _run_compress(args: argparse.Namespace) -> int:
    from finegates.workflows.export import CompressConfig, export_compressed

    cfg = build_configs(args, {"compress": CompressConfig})["compress"]
    configure_logging(quiet=False)
    print(f"Compacted model: {export_compressed(cfg)}")
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from finegates.workflows.bench import BenchConfig, bench, calibrate

    cfg = build_configs(args, {"bench": BenchConfig})["bench"]
    configure_logging(quiet=False)
    if cfg.calibrate:
        from finegates.latency import FEATURES

        costs, path = calibrate(cfg)
        dense = costs.predict(costs.points[0])
        print(f"per-unit costs (s): {costs.coefficients}")
        for point in costs.points:
            print(
                f"  {', '.join(f'{k} {point[k]:,.0f}' for k in FEATURES[1:])}: measured "
                f"{costs.points[0]['seconds'] / point['seconds']:.2f}x, "
                f"predicted {dense / costs.predict(point):.2f}x"
            )
        print(f"Latency costs: {path} (GatesConfig(target_speedup=..., latency_costs=...))")
        return 0
    result = bench(cfg)
    for name in ("dense", "checkpoint"):
        r = result[name]
        print(f"{name:<10} {r['params']:>12,d} params  {r['ms']:9.1f} ms  {r['tokens_per_s']:10.0f} tokens/s")
    print(
        f"speedup {result['speedup']:.2f}x over the dense model on the same GEMM routes, "
        f"{result['speedup_over_stock']:.2f}x over the stock dense model ({result['stock_dense_ms']:.1f} ms) "
        f"(batch {cfg.batch_size} x {cfg.length}, medians of per-round ratios, timed in turns)"
    )
    if "decode_speedup" in result:
        rates = " vs ".join(
            f"{name} {result[name]['decode_tokens_per_s']:.1f}" for name in ("dense", "checkpoint")
        )
        print(
            f"decode {cfg.decode_tokens} tokens (KV cache, {cfg.decode_layout} weight layout): {rates} "
            f"tokens/s, speedup {result['decode_speedup']:.2f}x"
        )
    return 0


def _posttrain_gate_defaults() -> dict:
    from finegates.workflows.posttrain import default_posttrain_gates

    return changed_fields(default_posttrain_gates())


def _pretrain_gate_defaults() -> dict:
    from finegates.workflows.pretrain import default_pretrain_gates

    return changed_fields(default_pretrain_gates())


def _run_export(args: argparse.Namespace) -> int:
    from finegates.workflows.export import export_model

    out = export_model(args.model, args.format, args.output_dir, args.dtype, args.tokenizer_pre, args.align)
    print(f"Exported: {out}")
    return 0


def _add_export(subparsers) -> None:
    help_text = (
        "Export a model folder (compacted or stock) for a serving runtime: --format onnx writes one graph "
        "with dynamic batch and sequence axes (decoders: with the KV cache in and out); --format gguf writes "
        "one llama.cpp file (LLaMA/Mistral compacted from the runtime structure, or stock)."
    )
    parser = subparsers.add_parser("export", help=help_text, description=help_text)
    parser.add_argument("model", metavar="MODEL_DIR", help="A model folder (e.g. a run's compressed/).")
    parser.add_argument("--format", choices=["onnx", "gguf"], required=True, help="Target format.")
    parser.add_argument("--output-dir", required=True, help="New (or empty) folder for the export.")
    parser.add_argument(
        "--dtype", choices=["f16", "f32"], default="f16", help="GGUF: weight type (norms stay f32)."
    )
    parser.add_argument(
        "--tokenizer-pre",
        default=None,
        help="GGUF: llama.cpp's pre-tokenizer name, where tokenizer.json does not make it plain.",
    )
    parser.add_argument(
        "--align",
        type=int,
        default=64,
        help="GGUF: pad the residual and FFN widths with zero dims to multiples of this (exact).",
    )
    parser.set_defaults(handler=_run_export)


def add_workflow_commands(subparsers) -> None:
    from finegates.workflows.bench import BenchConfig
    from finegates.workflows.export import CompressConfig

    _parser(
        subparsers,
        "bench",
        "Latency and throughput of a checkpoint vs its dense base (same batch, timed in turns).",
        {"bench": BenchConfig},
        _run_bench,
    )

    _parser(
        subparsers,
        "compress",
        "Compact a gate adapter (its base model from --base-model or the run's "
        "run_config.json) into a smaller model folder that from_pretrained loads.",
        {"compress": CompressConfig},
        _run_compress,
    )
    _parser(
        subparsers,
        "posttrain",
        "Task-agnostic sparsification of a LLaMA-family causal LM (gates only, LM loss), "
        "perplexity and zero-shot accuracy before/after, compaction.",
        _lm_sections("posttrain"),
        _run_posttrain,
        {"gates": _posttrain_gate_defaults()},
    )
    _parser(
        subparsers,
        "pretrain",
        "Train a LLaMA from scratch with weights and gates, against the same run without "
        "gates at equal steps.",
        _lm_sections("pretrain"),
        _run_pretrain,
        {"gates": _pretrain_gate_defaults()},
    )
    _add_export(subparsers)
    from finegates.workflows.compare import CompareConfig

    _parser(
        subparsers,
        "compare",
        "Run full, lora, magnitude, squarehead, salr, maskllm, finegates, finegates+kd on "
        "the same model, data, seed and budget; write one table and one Pareto plot.",
        {"compare": CompareConfig},
        _run_compare,
    )
