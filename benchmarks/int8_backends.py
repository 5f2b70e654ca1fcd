"""Dynamic int8 on the CPU: torch's `quantize_dynamic` (the path `compress(quantize="int8")` takes) beside
torchao's `quantize_(model, Int8DynamicActivationInt8WeightConfig())`, on MiniLM (8-label head).

Prints the forward time of fp32 and of each int8 model at one batch (timed in turns), the speedup over
fp32, and the largest logit difference from fp32. torchao is not a dependency of finegates:

    pip install torchao==0.18.0   # or: pip install --no-deps --target DIR torchao, then PYTHONPATH=DIR
    python benchmarks/int8_backends.py [--batch-size 32] [--length 128] [--repeats 5]
"""

from __future__ import annotations

import copy
import platform

import torch
from common import benchmark_parser, parse_benchmark_args
from inference import load_minilm

from finegates.compress.quantize import quantize_linears
from finegates.timing import time_in_turns


def main() -> None:
    parser = benchmark_parser(__doc__, threads=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_benchmark_args(parser)

    dense = load_minilm()
    models = {"fp32": dense, "torch quantize_dynamic": quantize_linears(copy.deepcopy(dense))}
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        print("torchao is not installed: only torch's int8 is timed (pip install torchao==0.18.0).")
    else:
        model = copy.deepcopy(dense)
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        models[f"torchao {torchao.__version__} quantize_"] = model
    ids = torch.randint(0, dense.config.vocab_size, (args.batch_size, args.length))
    with torch.inference_mode():
        reference = dense(input_ids=ids).logits
        error = {name: float((m(input_ids=ids).logits - reference).abs().max()) for name, m in models.items()}
    seconds = time_in_turns({name: lambda m=m: m(input_ids=ids) for name, m in models.items()}, args.repeats)
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {cpu}, {torch.get_num_threads()} threads")
    print(f"MiniLM, batch {args.batch_size} x {args.length}, median of {args.repeats} rounds in turns\n")
    print("| model | ms | speedup over fp32 | max abs logit difference |\n|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {1e3 * s:.1f} | {seconds['fp32'] / s:.2f}x | {error[name]:.4f} |")


if __name__ == "__main__":
    main()
