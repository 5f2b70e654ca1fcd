"""`finegates bench`: forward latency and throughput of a checkpoint against its dense base, timed in
turns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BenchConfig:
    """The two models and the batch shape to time."""

    model: str = field(default="", metadata={"help": "Checkpoint folder (compacted or dense)."})
    base_model: str = field(
        default="", metadata={"help": "Dense base to compare with (embedded name, hub id, folder)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Sequences per forward pass."})
    length: int = field(default=128, metadata={"help": "Tokens per sequence."})
    repeats: int = field(default=5, metadata={"help": "Timed rounds (each model once per round)."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's)."})
    decode_tokens: int = field(
        default=0, metadata={"help": "Causal LMs: also time greedy decoding of this many tokens (KV cache)."}
    )

    def __post_init__(self) -> None:
        if not self.model or not self.base_model:
            raise ValueError("bench needs --model (the checkpoint) and --base-model (its dense base).")


def _load(name: str):
    """The checkpoint with the head its config names (a causal LM stays a causal LM)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    import finegates.compress  # noqa: F401  (registers the compacted classes)
    from finegates.workflows.causal_lm import SMOLLM2, resolve_causal_lm
    from finegates.workflows.models import resolve_model

    path = resolve_causal_lm(name) if name == SMOLLM2 else resolve_model(name)
    try:
        architecture = (AutoConfig.from_pretrained(path).architectures or [""])[0]
        if architecture.endswith(("ForCausalLM", "LMHeadModel")):
            auto = AutoModelForCausalLM
        elif architecture.endswith("ForSequenceClassification"):
            auto = AutoModelForSequenceClassification
        else:
            auto = AutoModel
        return auto.from_pretrained(path).eval()
    except (OSError, ValueError) as err:
        raise ValueError(f"Could not load {name!r} as a transformers model ({err}).") from err


def bench(cfg: BenchConfig) -> dict[str, Any]:
    from finegates.workflows.encoding import benchmark_batch
    from finegates.workflows.evaluation import measure_decode, paired_speedup

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    models = {"dense": _load(cfg.base_model), "checkpoint": _load(cfg.model)}
    batch = benchmark_batch(cfg.batch_size, cfg.length, models["dense"].config.vocab_size)
    checkpoint_s, dense_s, speedup = paired_speedup(models["checkpoint"], models["dense"], batch, cfg.repeats)
    tokens = cfg.batch_size * cfg.length
    out: dict[str, Any] = {
        name: {
            "ms": seconds * 1e3,
            "tokens_per_s": tokens / seconds,
            "params": sum(p.numel() for p in models[name].parameters()),
        }
        for name, seconds in (("dense", dense_s), ("checkpoint", checkpoint_s))
    }
    out["speedup"] = speedup  # median of the per-round ratios (the two models timed back to back)
    if cfg.decode_tokens:
        if not all(hasattr(m, "generate") and m.can_generate() for m in models.values()):
            raise ValueError("--decode-tokens needs two causal LMs (models that can generate).")
        decode = measure_decode(models, cfg.decode_tokens, repeats=cfg.repeats)
        for name, rate in decode.items():
            out[name]["decode_tokens_per_s"] = rate
        out["decode_speedup"] = decode["checkpoint"] / decode["dense"]
    return out
