"""ONNX Runtime latency of a decoder, dense vs compacted: prefill 1 x `--prompt` and greedy decoding with the
KV cache, beside torch's.

Models: `NAME=SOURCE` pairs, the first the dense reference (a model name such as `smollm2-135m`, or a model
folder such as a run's `compressed/`). Each is exported with `finegates.compress.onnx.export_onnx`; the
prefill logits are checked against torch's (max abs difference printed). Prefill: the prompt from an empty
cache; decode: `--new-tokens` tokens, one call each with the cache the graph returned. Speedups are medians
over rounds of paired ratios (the dense model timed just before and just after each model, same engine).

    python benchmarks/onnx_decoder.py --models dense=smollm2-135m r20=runs/post-runtime-0.2/compressed-tied \
        r40=runs/post-runtime-0.4/compressed --threads 2 --rounds 3
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import benchmark_parser, parse_benchmark_args
from transformers import AutoModelForCausalLM

import finegates  # noqa: F401 (registers the compact classes)
from finegates.compress.onnx import export_onnx
from finegates.workflows.causal_lm import load_causal_lm


def _load(source: str):
    if Path(source).is_dir():
        return AutoModelForCausalLM.from_pretrained(source).eval()
    return load_causal_lm(source)[0].eval()


def _empty_cache(session) -> dict[str, np.ndarray]:
    return {
        i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past.")
    }


def _ort_run(session, ids: np.ndarray, new_tokens: int) -> tuple[float, float, np.ndarray]:
    """(prefill seconds, decode seconds, prefill logits)."""
    cache = _empty_cache(session)
    start = time.perf_counter()
    logits, *present = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), **cache})
    prefill = time.perf_counter() - start
    first = logits
    length = ids.shape[1]
    start = time.perf_counter()
    for _ in range(new_tokens):
        cache = dict(zip(cache, present))
        step = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        length += 1
        mask = np.ones((1, length), np.int64)
        logits, *present = session.run(None, {"input_ids": step, "attention_mask": mask, **cache})
    return prefill, time.perf_counter() - start, first


@torch.inference_mode()
def _torch_run(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    return prefill, time.perf_counter() - start


def main() -> None:
    parser = benchmark_parser(__doc__, threads=2)
    parser.add_argument("--models", nargs="+", required=True, help="NAME=SOURCE pairs; the first is dense")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parse_benchmark_args(parser)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    ids = torch.randint(1000, 20000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in (pair.split("=", 1) for pair in args.models):
            model = _load(source)
            session = ort.InferenceSession(str(export_onnx(model, Path(tmp) / name) / "model.onnx"), options)
            with torch.inference_mode():
                expected = model(input_ids=ids).logits.numpy()
            diff = float(np.abs(_ort_run(session, ids.numpy(), 0)[2] - expected).max())
            runs[name] = {
                "ort": lambda s=session: _ort_run(s, ids.numpy(), args.new_tokens)[:2],
                "torch": lambda m=model: _torch_run(m, ids, args.new_tokens),
                "diff": diff,
            }
            for engine in ("ort", "torch"):  # warm-up
                runs[name][engine]()
        dense = next(iter(runs))
        pairs = {name: {e: [] for e in ("ort", "torch")} for name in runs}  # (dense timing, model timing)
        for _ in range(args.rounds):
            for name in runs:
                for engine in ("ort", "torch"):  # dense timed just before and just after: their mean
                    before, mine, after = runs[dense][engine](), runs[name][engine](), runs[dense][engine]()
                    reference = ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2)
                    pairs[name][engine].append((reference, mine))
    print(
        f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"onnxruntime {ort.__version__}"
    )
    print(
        f"\n| model | engine | prefill 1 x {args.prompt} (ms) | speedup | decode (tokens/s) | speedup "
        "| ORT vs torch |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in runs:
        for engine in ("ort", "torch"):
            timed = pairs[name][engine]
            prefill_x = statistics.median(d[0] / m[0] for d, m in timed)
            decode_x = statistics.median(d[1] / m[1] for d, m in timed)
            prefill, decode = min(m[0] for _, m in timed), min(m[1] for _, m in timed)
            print(
                f"| {name} | {engine} | {1e3 * prefill:.1f} | {prefill_x:.2f}x | "
                f"{args.new_tokens / decode:.1f} | "
                f"{decode_x:.2f}x | {runs[name]['diff']:.1e} |"
            )


if __name__ == "__main__":
    main()
