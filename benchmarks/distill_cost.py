"""What the losses over the logits cost in a post-training step: the block-wise logit KL and causal-LM
cross-entropy of `finegates.blockwise` against the plain formulas (the autograd KL, transformers'
`ForCausalLMLoss`), alone and inside SmolLM2-135M's distilled training step.

Both losses run over (tokens x vocabulary) logits: 1,024 x 49,152 for `posttrain`'s 4 x 256 blocks. Written
as plain tensor ops (float32 upcasts and log-softmaxes, autograd keeping them) they make several passes
over 200 MB tensors in each direction. The block-wise versions take the rows a few at a time, so every
pass stays in cache, and form the closed-form gradient in the same loop.

    python benchmarks/distill_cost.py                      # the KL alone, forward + backward
    python benchmarks/distill_cost.py --step --rounds 4    # and SmolLM2's distilled step, both ways, and
                                                           # the step without distillation

Times alternate between the two versions (medians; `--step`: medians of per-round ratios), so a change
of load hits both alike.
"""

from __future__ import annotations

import statistics
import time

import torch
from common import benchmark_parser, parse_benchmark_args
from transformers.loss.loss_utils import ForCausalLMLoss

from finegates import distill
from finegates.blockwise import blockwise_causal_lm_loss, causal_lm_loss, reference_logit_kl

# name -> (logit KL, causal-LM loss): each loss alone, and what a training step uses (`posttrain` sets
# `causal_lm_loss`, which is block-wise for bf16 logits only)
VERSIONS = {
    "block-wise": (distill.logit_kl, blockwise_causal_lm_loss),
    "plain": (reference_logit_kl, ForCausalLMLoss),
}
STEP_VERSIONS = {**VERSIONS, "block-wise": (distill.logit_kl, causal_lm_loss)}


def losses_alone(tokens: int, vocab: int, dtype: torch.dtype, rounds: int) -> dict[str, dict[str, float]]:
    """Forward + backward seconds of each loss of each version on random logits (medians)."""
    student = (torch.randn(1, tokens, vocab) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(1, tokens, vocab) * 3).to(dtype)
    labels = torch.randint(0, vocab, (1, tokens))
    calls = {
        "kl": lambda kl, lm: kl(student, teacher, None, 2.0),
        "lm": lambda kl, lm: lm(student, labels, vocab),
    }
    times = {(loss, name): [] for loss in calls for name in VERSIONS}
    for _ in range(rounds + 1):  # the first round warms up
        for (loss, name), seconds in times.items():
            begin = time.perf_counter()
            calls[loss](*VERSIONS[name]).backward()
            seconds.append(time.perf_counter() - begin)
            student.grad = None
    return {loss: {name: statistics.median(times[loss, name][1:]) for name in VERSIONS} for loss in calls}


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

    def step(distilled: bool = True) -> float:
        begin = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            teacher = distill.teacher_outputs(model, {"input_ids": ids}, cfg) if distilled else None
            outputs = model(input_ids=ids, labels=ids)
            loss = outputs.loss + finegates.sparsity_loss(model)
            if distilled:
                loss = loss + distill.distill_loss(outputs, teacher, None, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        finegates.budget_step(model)
        return time.perf_counter() - begin

    times: dict[str, list[float]] = {name: [] for name in [*STEP_VERSIONS, "undistilled"]}
    for _ in range(rounds + 1):
        for name, (kl, lm) in STEP_VERSIONS.items():
            distill.logit_kl = kl  # squarehead_loss looks it up at call time
            model.loss_function = lm
            times[name].append(step())
        times["undistilled"].append(step(distilled=False))  # posttrain's LM loss
    distill.logit_kl = VERSIONS["block-wise"][0]

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a][1:], times[b][1:]))

    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    return {**medians, "ratio": ratio("plain", "block-wise"), "distill": ratio("block-wise", "undistilled")}


def main() -> None:
    parser = benchmark_parser(__doc__, threads=2)
    parser.add_argument("--tokens", type=int, default=1024, help="rows of logits (posttrain: 4 x 256)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary (SmolLM2: 49,152)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step", action="store_true", help="also SmolLM2's whole distilled training step")
    parser.add_argument("--no-bf16", action="store_true", help="the step in float32 (default: bf16 autocast)")
    args = parse_benchmark_args(parser)
    print(f"forward + backward, {args.tokens} x {args.vocab} logits, {torch.get_num_threads()} threads")
    for dtype in (torch.bfloat16, torch.float32):
        for loss, t in losses_alone(args.tokens, args.vocab, dtype, args.rounds).items():
            print(
                f"  {'logit KL' if loss == 'kl' else 'LM loss':8s} {str(dtype).removeprefix('torch.'):9s} "
                f"plain {t['plain']:.3f} s, block-wise {t['block-wise']:.3f} s "
                f"({t['plain'] / t['block-wise']:.2f}x faster)"
            )
    if args.step:
        t = distilled_steps(args.rounds, 4, args.tokens // 4, not args.no_bf16)
        print(
            f"SmolLM2 distilled training step, 4 x {args.tokens // 4}, "
            f"{'float32' if args.no_bf16 else 'bf16'}: plain {t['plain']:.2f} s, "
            f"block-wise {t['block-wise']:.2f} s; step with the plain losses / block-wise: "
            f"{t['ratio']:.3f}x (median of per-round ratios)"
        )
        print(
            f"the same step without distillation: {t['undistilled']:.2f} s; distilled / undistilled "
            f"(block-wise): {t['distill']:.3f}x"
        )


if __name__ == "__main__":
    main()
