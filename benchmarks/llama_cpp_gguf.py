"""llama.cpp on exported GGUF files: outputs checked against torch, then tokens/s dense vs compacted.

Models: `NAME=SOURCE` pairs, the first the dense reference: SOURCE is a model name (`smollm2-135m`) or a
model folder (a run's `compressed/`). Each is exported with `finegates.compress.gguf.export_gguf` (f32 and
f16) and quantized by llama.cpp (Q8_0, Q4_K_M). Checks, on the f32 file: greedy generation of
`--new-tokens` tokens identical to torch's, and held-out Brown perplexity (the posttrain split,
`--eval-blocks` blocks of 256 tokens) beside torch's; the quantized files' perplexity too. Speed: prefill
(a `--prompt`-token prompt, from an empty cache) and decode (`--new-tokens` tokens after it) tokens/s at
`--threads` threads; speedups are medians over rounds of paired ratios (the dense file timed just before
each compacted one, same type). Run it without OMP_WAIT_POLICY=PASSIVE (which `make test` sets): llama.cpp's
OpenMP threads then sleep between ops, and decoding slows ~3x.

    python benchmarks/llama_cpp_gguf.py --models dense=smollm2-135m c20=runs/post-runtime-0.2/compressed \
        c40=runs/post-runtime-0.4/compressed --threads 2 --rounds 3 --flash-attn
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import benchmark_parser, parse_benchmark_args
from transformers import AutoModelForCausalLM, AutoTokenizer

import finegates  # noqa: F401 (registers the compact classes)
from finegates.compress import llama_cpp
from finegates.compress.gguf import export_gguf
from finegates.model import parameter_count
from finegates.workflows.causal_lm import load_causal_lm, perplexity
from finegates.workflows.posttrain import PosttrainConfig, read_data, split_text

TYPES = ("f16", "q8_0", "q4_k_m")


def _load(source: str):
    if Path(source).is_dir():
        return AutoModelForCausalLM.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)
    return load_causal_lm(source)


def _files(name: str, model, tokenizer_dir, work: Path) -> dict[str, Path]:
    files = {
        dtype: export_gguf(model, work / f"{name}.{dtype}.gguf", dtype, tokenizer_dir)
        for dtype in ("f32", "f16")
    }
    for kind in ("q8_0", "q4_k_m"):
        files[kind] = llama_cpp.quantize(files["f32"], work / f"{name}.{kind}.gguf", kind)
    return files


@torch.no_grad()
def torch_greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy tokens with the KV cache and no stopping rule (llama.cpp's loop does not stop either)."""
    out = model(input_ids=ids, use_cache=True)
    tokens = []
    for _ in range(new_tokens):
        token = out.logits[0, -1].argmax().view(1, 1)
        tokens.append(int(token))
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    return tokens


def _llama_cpp_perplexity(llm, blocks: torch.Tensor) -> float:
    total, count = 0.0, 0
    for block in blocks.tolist():
        logits = llama_cpp.token_logits(llm, block).astype(np.float64)[:-1]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= float(logp[np.arange(len(block) - 1), block[1:]].sum())
        count += len(block) - 1
    return math.exp(total / count)


def _prefill_seconds(llm, ids: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - start


def _decode_seconds(llm, ids: list[int], new_tokens: int) -> float:
    llm.reset()
    llm.eval(ids)
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llama_cpp.last_logits(llm)))])
    return time.perf_counter() - start


def main() -> None:
    parser = benchmark_parser(__doc__, threads=2)
    parser.add_argument("--models", nargs="+", required=True, help="NAME=SOURCE pairs; the first is dense")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=256, help="prefill length (tokens)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the GGUF files here")
    parser.add_argument("--flash-attn", action="store_true", help="time with llama.cpp's fused attention")
    parser.add_argument("--no-speed", action="store_true", help="checks only")
    parser.add_argument("--speed-only", action="store_true", help="reuse --work-dir's files, no checks")
    args = parse_benchmark_args(parser)
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads")
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        print(
            "warning: OMP_WAIT_POLICY=PASSIVE makes llama.cpp's threads sleep between ops (decode ~3x slower)"
        )
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    models = dict(pair.split("=", 1) for pair in args.models)
    cfg = PosttrainConfig(text="brown", seq_len=256, eval_blocks=args.eval_blocks, zero_shot="")
    files, ids = {}, None
    for name, source in models.items():
        model, tokenizer = _load(source)
        if ids is None:
            _, heldout = split_text(cfg, tokenizer, read_data(cfg).docs)
            prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
            stream = heldout.flatten().tolist()
            ids = stream[: args.prompt]
        tokenizer_dir = source if Path(source).is_dir() else None
        kept = {kind: work / f"{name}.{kind}.gguf" for kind in ("f32", *TYPES)}
        if args.speed_only and all(path.is_file() for path in kept.values()):
            files[name] = kept  # the files of an earlier run in --work-dir, already checked
            continue
        files[name] = _files(name, model, tokenizer_dir, work)
        expected = torch_greedy(model, prompt, args.new_tokens)
        torch_ppl = perplexity(model, heldout, quiet=True)
        llm = llama_cpp.load(
            files[name]["f32"],
            n_ctx=max(256, args.prompt + args.new_tokens),
            threads=args.threads,
            all_logits=True,
        )
        same = llama_cpp.greedy(llm, prompt[0].tolist(), args.new_tokens) == expected
        ppl = {
            kind: _llama_cpp_perplexity(llm, heldout) if kind == "f32" else None for kind in ("f32", *TYPES)
        }
        del llm
        for kind in TYPES:
            llm = llama_cpp.load(files[name][kind], n_ctx=256, threads=args.threads, all_logits=True)
            ppl[kind] = _llama_cpp_perplexity(llm, heldout)
            del llm
        sizes = {kind: files[name][kind].stat().st_size / 2**20 for kind in ("f32", *TYPES)}
        print(
            f"{name}: {parameter_count(model) / 1e6:.2f}M params; "
            f"greedy {args.new_tokens} tokens "
            f"identical to torch: {same}; perplexity torch {torch_ppl:.3f}, llama.cpp f32 {ppl['f32']:.3f} "
            f"({100 * (ppl['f32'] / torch_ppl - 1):+.2f}%), "
            + ", ".join(f"{kind} {ppl[kind]:.3f}" for kind in TYPES)
            + "; MiB "
            + ", ".join(f"{kind} {size:.0f}" for kind, size in sizes.items()),
            flush=True,
        )
        del model
    if args.no_speed:
        return
    dense = next(iter(models))
    n_ctx = args.prompt + args.new_tokens
    print(
        f"\nprefill {args.prompt} tokens, decode {args.new_tokens} tokens, tokens/s (speedup vs {dense}); "
        f"flash attention {'on' if args.flash_attn else 'off'}"
    )
    for kind in TYPES:
        llms = {
            name: llama_cpp.load(
                files[name][kind], n_ctx=n_ctx, threads=args.threads, flash_attn=args.flash_attn
            )
            for name in models
        }
        for llm in llms.values():  # warm-up
            _prefill_seconds(llm, ids)
        prefill = {name: [] for name in models}
        decode = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, llm in llms.items():
                prefill[name].append(min(_prefill_seconds(llm, ids) for _ in range(2)))
                decode[name].append(_decode_seconds(llm, ids[:16], args.new_tokens))
        for name in models:
            p_ratio = statistics.median(d / c for d, c in zip(prefill[dense], prefill[name]))
            d_ratio = statistics.median(d / c for d, c in zip(decode[dense], decode[name]))
            print(
                f"  {kind:7s} {name:8s} prefill {args.prompt / min(prefill[name]):8.1f} tok/s "
                f"({p_ratio:.2f}x)  "
                f"decode {args.new_tokens / min(decode[name]):7.1f} tok/s ({d_ratio:.2f}x)",
                flush=True,
            )
        del llms


if __name__ == "__main__":
    main()
