"""What the logit-distillation term costs in a post-training step: the block-wise KL of `finegates.distill`
against the plain autograd formula, alone and inside SmolLM2-135M's distilled training step.

The logit KL of a causal LM runs over (tokens x vocabulary) logits: 1,024 x 49,152 for `posttrain`'s 4 x 256
blocks. Written as plain tensor ops (two float32 log-softmaxes, the elementwise KL, autograd keeping them)
it makes several passes over 200 MB tensors in each direction. `finegates.distill.logit_kl` takes the rows
a few at a time, so every pass stays in cache, and forms the closed-form gradient in the same loop.

    python benchmarks/distill_cost.py                      # the KL alone, forward + backward
    python benchmarks/distill_cost.py --step --rounds 4    # and SmolLM2's whole distilled step, both ways

Times alternate between the two versions (medians; `--step`: medians of per-round ratios), so a change
of load hits both alike.
"""

from __future__ import annotations

import statistics
import time

import torch
from common import benchmark_parser, parse_benchmark_args

from finegates import distill


def plain_logit_kl(student, teacher, mask, temperature=1.0):
    """The KL as plain autograd ops (the formula `logit_kl` computes block by block)."""
    log_s = torch.log_softmax(student.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher.float() / temperature, dim=-1)
    rows = torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    rows = rows * temperature**2
    if rows.dim() == 1 or mask is None:
        return rows.mean()
    return (rows * mask).sum() / mask.sum().clamp_min(1.0)


VERSIONS = {"block-wise": distill.logit_kl, "plain": plain_logit_kl}


def kl_alone(tokens: int, vocab: int, dtype: torch.dtype, rounds: int) -> dict[str, float]:
    student = (torch.randn(tokens, vocab) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(tokens, vocab) * 3).to(dtype)
    times: dict[str, list[float]] = {name: [] for name in VERSIONS}
    for _ in range(rounds + 1):  # the first round warms up
        for name, fn in VERSIONS.items():
            begin = time.perf_counter()
            fn(student, teacher, None, 2.0).backward()
            times[name].append(time.perf_counter() - begin)
            student.grad = None
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def distilled_steps(rounds: int, batch: int, length: int, bf16: bool) -> dict[str, float]:
    """SmolLM2-135M gated as `posttrain` gates it, one distilled training step per version in turn."""
    from inference import load_smollm2

    import finegates
    from finegates.workflows.posttrain import default_posttrain_gates

    model = finegates.get_gated_model(load_smollm2(), default_posttrain_gates())
    finegates.set_training_steps(model, 100)
    optimizer = torch.optim.AdamW(finegates.optimizer_param_groups(model, head_lr=1e-3))
    cfg = distill.DistillConfig(distill=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    model.train()

    def step() -> float:
        begin = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            teacher = distill.teacher_outputs(model, {"input_ids": ids}, cfg)
            outputs = model(input_ids=ids, labels=ids)
            loss = (
                outputs.loss
                + finegates.sparsity_loss(model)
                + distill.distill_loss(outputs, teacher, None, cfg)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        finegates.budget_step(model)
        return time.perf_counter() - begin

    times: dict[str, list[float]] = {name: [] for name in VERSIONS}
    for _ in range(rounds + 1):
        for name, fn in VERSIONS.items():
            distill.logit_kl = fn  # squarehead_loss looks it up at call time
            times[name].append(step())
    distill.logit_kl = VERSIONS["block-wise"]
    ratios = [p / b for p, b in zip(times["plain"][1:], times["block-wise"][1:])]
    return {
        **{name: statistics.median(t[1:]) for name, t in times.items()},
        "ratio": statistics.median(ratios),
    }


def main() -> None:
    parser = benchmark_parser(__doc__, threads=2)
    parser.add_argument("--tokens", type=int, default=1024, help="rows of logits (posttrain: 4 x 256)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary (SmolLM2: 49,152)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step", action="store_true", help="also SmolLM2's whole distilled training step")
    parser.add_argument("--no-bf16", action="store_true", help="the step in float32 (default: bf16 autocast)")
    args = parse_benchmark_args(parser)
    print(
        f"logit KL forward + backward, {args.tokens} x {args.vocab} logits, {torch.get_num_threads()} threads"
    )
    for dtype in (torch.bfloat16, torch.float32):
        t = kl_alone(args.tokens, args.vocab, dtype, args.rounds)
        print(
            f"  {str(dtype).removeprefix('torch.'):9s} plain {t['plain']:.3f} s, "
            f"block-wise {t['block-wise']:.3f} s ({t['plain'] / t['block-wise']:.2f}x faster)"
        )
    if args.step:
        t = distilled_steps(args.rounds, 4, args.tokens // 4, not args.no_bf16)
        print(
            f"SmolLM2 distilled training step, 4 x {args.tokens // 4}, "
            f"{'float32' if args.no_bf16 else 'bf16'}: plain {t['plain']:.2f} s, "
            f"block-wise {t['block-wise']:.2f} s; step with the plain KL / block-wise: "
            f"{t['ratio']:.3f}x (median of per-round ratios)"
        )


if __name__ == "__main__":
    main()
