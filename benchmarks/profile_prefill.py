"""Where the time of a SmolLM2-135M prefill (or decode) goes, dense vs compacted: torch.profiler, per
operator.

The compacted model uses the magnitude gate pattern of `benchmarks/inference.py` at `--fraction`, or
is a saved compacted folder (`--compacted`, e.g. the output of `finegates posttrain`).
Prints, per model, the operators with the most self CPU time over `--passes` prefills of 1 x 256
tokens, then the ratio of the main groups between the dense model with the compacted model's GEMM routes
("dense, compact GEMMs", `use_compact_linears`) and the compacted model (matmuls, attention kernel, the
gather, scatter and index operators that compaction adds). For the prefill it also prints a bound: the speedup
over the same-GEMM dense model if the decoder GEMMs and the attention kernel shrank by their FLOP ratios
(linear and attention FLOPs counted apart, `FlopCounterMode`) and every other operator (norms, residual adds,
RoPE, activations, the last-token logits GEMV, timed apart) took its dense time; the FLOP ideal of
`benchmarks/inference.py` assumes those shrink too. For decoding the bound is the same with the GEMVs
shrinking by the ratio of the linear weights' sizes (what each token reads). `--decode-layout` stores every
model's weights in `finegates.decode_layout`'s layout first.

    python benchmarks/profile_prefill.py --fraction 0.4 --threads 1
    python benchmarks/profile_prefill.py --fraction 0.4 --threads 1 --decode   # ms per generated token
    python benchmarks/profile_prefill.py --compacted runs/post/compressed --decode --decode-layout auto
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from common import benchmark_parser, parse_benchmark_args
from inference import compacted_smollm2, flop_counter, load_smollm2
from torch.profiler import ProfilerActivity, profile

import finegates
from finegates.compress.linear import use_compact_linears
from finegates.timing import seconds

DECODE_TOKENS = 16
MATMULS = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")
ATTENTION_KERNELS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
)
GROUPS = {
    "matmul (aten::mm, addmm, oneDNN linear)": MATMULS,
    "attention kernel": ATTENTION_KERNELS,
    "gather / scatter / fill": ("aten::index_select", "aten::scatter_", "aten::fill_", "aten::copy_"),
}


def runner(model: torch.nn.Module, decode: bool) -> Callable[[], object]:
    """One prefill of 1 x 256 tokens (last-token logits), or DECODE_TOKENS greedy tokens after a 32-token
    prompt."""
    gen = torch.Generator().manual_seed(0)
    if not decode:
        ids = torch.randint(100, 40000, (1, 256), generator=gen)
        return lambda: model(input_ids=ids, logits_to_keep=1, use_cache=False)
    prompt = torch.randint(100, 40000, (1, 32), generator=gen)
    return lambda: model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=DECODE_TOKENS,
        min_new_tokens=DECODE_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )


def self_times(run: Callable[[], object], passes: int, per: int) -> tuple[dict[str, float], str]:
    """Self CPU ms per operator and pass, divided by `per` (tokens, for decode)."""
    with torch.inference_mode():
        run()
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                run()
    events = prof.key_averages()
    times = {e.key: e.self_cpu_time_total / 1e3 / passes / per for e in events}
    return times, events.table(sort_by="self_cpu_time_total", row_limit=12)


def group_flops(run: Callable[[], object], model: torch.nn.Module) -> tuple[int, int]:
    """(linear, attention) FLOPs of one call, counted under eager attention: linears are aten mm/addmm,
    attention is the two batched matmuls (bmm) of the eager kernel."""
    with torch.inference_mode():
        counts = flop_counter(run, model).get_flop_counts()["Global"]
    ops = {str(op): n for op, n in counts.items()}
    return ops.get("aten.mm", 0) + ops.get("aten.addmm", 0), ops.get("aten.bmm", 0)


def print_bound(
    same_gemm: dict[str, float],
    compacted: dict[str, float],
    dense_flops: tuple[int, int],
    small_flops: tuple[int, int],
    logits_ms: float,
) -> None:
    """The bound of the module docstring next to the FLOP ideal and the profiled speedup, from the
    profiles and (linear, attention) FLOPs of the same-GEMM dense and the compacted model; `logits_ms`
    is the time of the last-token logits GEMV, which the matmul group holds but which does not shrink."""
    (dense_linear, dense_attention), (small_linear, small_attention) = dense_flops, small_flops
    gemm = sum(same_gemm.get(k, 0.0) for k in MATMULS) - logits_ms
    attention = sum(same_gemm.get(k, 0.0) for k in ATTENTION_KERNELS)
    total = sum(same_gemm.values())
    bound_ms = (
        gemm * small_linear / dense_linear
        + attention * small_attention / dense_attention
        + total
        - gemm
        - attention
    )
    ideal = (dense_linear + dense_attention) / (small_linear + small_attention)
    bound, measured = total / bound_ms, total / sum(compacted.values())
    print(
        f"\nFLOP ratios: linears {dense_linear / small_linear:.2f}x, attention "
        f"{dense_attention / small_attention:.2f}x, all (the ideal) {ideal:.2f}x; logits GEMV "
        f"{logits_ms:.1f} ms"
    )
    print(
        f"bound with the other operators at their dense time: {bound:.2f}x ({bound / ideal:.2f} of the ideal)"
    )
    print(
        f"profiled: {measured:.2f}x ({measured / ideal:.2f} of the ideal, {measured / bound:.2f} of the "
        "bound)"
    )


def linear_weights(model: torch.nn.Module) -> int:
    """Elements of the model's linear weights, a tied one once: what a decoding step reads."""
    return sum(
        w.numel()
        for w in {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}.values()
    )


def print_decode_bound(same_gemm: dict[str, float], compacted: dict[str, float], read: float) -> None:
    """The decoding bound: the GEMVs of the same-GEMM dense model shrink by `read` (dense / compacted
    linear weights), every other operator keeps its dense time."""
    gemv = sum(same_gemm.get(k, 0.0) for k in MATMULS)
    total = sum(same_gemm.values())
    bound = total / (gemv / read + total - gemv)
    measured = total / sum(compacted.values())
    print(
        f"\nlinear weights read per token: {read:.2f}x fewer; GEMVs {gemv:.1f} of {total:.1f} ms per "
        f"token (dense, compact GEMMs)\nbound with the other operators at their dense time: {bound:.2f}x; "
        f"profiled: {measured:.2f}x ({measured / bound:.2f} of the bound)"
    )


def main() -> None:
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--fraction", type=float, default=0.4, help="fraction of gated parameters removed")
    parser.add_argument(
        "--compacted",
        default=None,
        help="a saved compacted SmolLM2 folder (e.g. runs/post/compressed) instead of the magnitude pattern",
    )
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument(
        "--decode",
        action="store_true",
        help=f"profile greedy decoding ({DECODE_TOKENS} tokens after a 32-token prompt, prompt "
        "included; figures per token) instead of the prefill",
    )
    parser.add_argument(
        "--decode-layout",
        choices=["rows", "auto", "columns"],
        default="rows",
        help="the weights' layout for every model (finegates.decode_layout; 'rows' is torch's own)",
    )
    args = parse_benchmark_args(parser)
    dense = load_smollm2().eval()
    small = compacted_smollm2(dense, args.compacted, args.fraction)
    results = {}
    same_gemm = use_compact_linears(copy.deepcopy(dense))
    unit = "token" if args.decode else "prefill"
    for model in (dense, same_gemm, small):
        print(finegates.decode_layout(model, args.decode_layout))
    for name, model in (("dense", dense), ("dense, compact GEMMs", same_gemm), ("compacted", small)):
        results[name], table = self_times(
            runner(model, args.decode), args.passes, DECODE_TOKENS if args.decode else 1
        )
        print(f"\n{name}, ms per {unit} over {args.passes} passes, {args.threads} thread(s)\n{table}")
    print(
        "| operators | dense (ms) | dense, compact GEMMs (ms) | compacted (ms) | same-GEMM dense / "
        "compacted |\n|---|---|---|---|---|"
    )
    for label, keys in {**GROUPS, "total": None}.items():
        d, g, c = (
            (sum(r.values()) if keys is None else sum(r.get(k, 0.0) for k in keys)) for r in results.values()
        )
        print(f"| {label} | {d:.0f} | {g:.0f} | {c:.0f} | " + (f"{g / c:.2f}x |" if c else "- |"))
    if args.decode:
        read = linear_weights(dense) / linear_weights(small)
        print_decode_bound(results["dense, compact GEMMs"], results["compacted"], read)
    else:
        with torch.inference_mode():
            logits_ms = 1e3 * seconds(
                partial(same_gemm.lm_head, torch.randn(1, 1, same_gemm.config.hidden_size)), 0.5
            )
        print_bound(
            results["dense, compact GEMMs"],
            results["compacted"],
            group_flops(runner(same_gemm, False), same_gemm),
            group_flops(runner(small, False), small),
            logits_ms,
        )


if __name__ == "__main__":
    main()
