"""Where the time of a SmolLM2-135M prefill (or decode) goes, dense vs compacted: torch.profiler, per operator.

The compacted model uses the magnitude gate pattern of `benchmarks/inference.py` at `--fraction`, or
is a saved compacted folder (`--compacted`, e.g. the output of `finegates posttrain`).
Prints, per model, the operators with the most self CPU time over `--passes` prefills of 1 x 256
tokens, then the ratio of the main groups between the dense model with the compacted model's GEMM routes
("dense, compact GEMMs", `use_compact_linears`) and the compacted model (matmuls, attention kernel, the gather,
scatter and index operators that compaction adds).

    python benchmarks/profile_prefill.py --fraction 0.4 --threads 1
    python benchmarks/profile_prefill.py --fraction 0.4 --threads 1 --decode   # ms per generated token
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from inference import load_smollm2, prune
from torch.profiler import ProfilerActivity, profile

import finegates
from finegates.compress.linear import use_compact_linears

DECODE_TOKENS = 16
GROUPS = {
    "matmul (aten::mm, addmm, oneDNN linear)": ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"),
    "attention kernel": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
    "gather / scatter / fill": ("aten::index_select", "aten::scatter_", "aten::fill_", "aten::copy_"),
}


def runner(model: torch.nn.Module, decode: bool) -> Callable[[], object]:
    """One prefill of 1 x 256 tokens (last-token logits), or DECODE_TOKENS greedy tokens after a 32-token prompt."""
    gen = torch.Generator().manual_seed(0)
    if not decode:
        ids = torch.randint(100, 40000, (1, 256), generator=gen)
        return lambda: model(input_ids=ids, logits_to_keep=1, use_cache=False)
    prompt = torch.randint(100, 40000, (1, 32), generator=gen)
    return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=DECODE_TOKENS,
                                  min_new_tokens=DECODE_TOKENS, do_sample=False, pad_token_id=0)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.4, help="fraction of gated parameters removed")
    parser.add_argument("--compacted", default=None,
                        help="a saved compacted SmolLM2 folder (e.g. runs/post/compressed) instead of the magnitude pattern")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--decode", action="store_true",
                        help=f"profile greedy decoding ({DECODE_TOKENS} tokens after a 32-token prompt, prompt "
                             "included; figures per token) instead of the prefill")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_smollm2().eval()
    if args.compacted:
        from transformers import AutoModelForCausalLM

        small = AutoModelForCausalLM.from_pretrained(args.compacted).eval()
    else:
        small = finegates.compress(prune(dense, args.fraction)).eval()
    results = {}
    same_gemm = use_compact_linears(copy.deepcopy(dense))
    unit = "token" if args.decode else "prefill"
    for name, model in (("dense", dense), ("dense, compact GEMMs", same_gemm), ("compacted", small)):
        results[name], table = self_times(runner(model, args.decode), args.passes, DECODE_TOKENS if args.decode else 1)
        print(f"\n{name}, ms per {unit} over {args.passes} passes, {args.threads} thread(s)\n{table}")
    print("| operators | dense (ms) | dense, compact GEMMs (ms) | compacted (ms) | same-GEMM dense / compacted |\n"
          "|---|---|---|---|---|")
    for label, keys in {**GROUPS, "total": None}.items():
        d, g, c = ((sum(r.values()) if keys is None else sum(r.get(k, 0.0) for k in keys)) for r in results.values())
        print(f"| {label} | {d:.0f} | {g:.0f} | {c:.0f} | " + (f"{g / c:.2f}x |" if c else "- |"))


if __name__ == "__main__":
    main()
