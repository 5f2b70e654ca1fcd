"""`finegates bench`: forward latency and throughput of a checkpoint against its dense base, timed in
turns."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from finegates.model import parameter_count


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
    decode_layout: str = field(
        default="auto",
        metadata={
            "help": "Weight layout both models decode with (finegates.decode_layout): 'auto' column-major "
            "where the one-token GEMV is faster, 'columns', or 'rows' (torch's own)."
        },
    )
    calibrate: bool = field(
        default=False,
        metadata={
            "help": "Measure the per-unit costs of --model (a dense model) at this batch shape for "
            "target_speedup, and write them to --costs-file (default: the finegates cache)."
        },
    )
    costs_file: str | None = field(default=None, metadata={"help": "With --calibrate: where to write."})

    def __post_init__(self) -> None:
        from finegates.compress.layout import LAYOUTS

        if self.decode_layout not in LAYOUTS:
            choices = ", ".join(LAYOUTS)
            raise ValueError(f"--decode-layout must be one of {choices}, not {self.decode_layout!r}.")
        if self.calibrate:
            if not self.model:
                raise ValueError("bench --calibrate needs --model (the dense model to measure).")
        elif not self.model or not self.base_model:
            raise ValueError("bench needs --model (the checkpoint) and --base-model (its dense base).")


def _load(name: str):
    """The checkpoint with the head its config names (a causal LM stays a causal LM)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from finegates.compress import CompressedCheckpointError
    from finegates.compress.io import load_checked
    from finegates.workflows.causal_lm import is_causal_architecture
    from finegates.workflows.models import locate_model

    path = locate_model(name)
    try:
        architecture = (AutoConfig.from_pretrained(path).architectures or [""])[0]
        if is_causal_architecture([architecture]):
            auto = AutoModelForCausalLM
        elif architecture.endswith("ForSequenceClassification"):
            auto = AutoModelForSequenceClassification
        else:
            auto = AutoModel
        return load_checked(auto, path)
    except CompressedCheckpointError:
        raise
    except (OSError, ValueError) as err:
        raise ValueError(f"Could not load {name!r} as a transformers model ({err}).") from err


def bench(cfg: BenchConfig) -> dict[str, Any]:
    from finegates.workflows.encoding import benchmark_batch
    from finegates.workflows.evaluation import measure_decode, paired_speedup

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from finegates.compress.linear import use_compact_linears

    stock = _load(cfg.base_model)
    # the pruning's own speedup: the dense model on the compacted model's GEMM routes (oneDNN for tall
    # inputs on x86); against the stock model the ratio also holds the route's gain, reported beside it
    same_routes = use_compact_linears(copy.deepcopy(stock))
    models = {"dense": same_routes, "checkpoint": use_compact_linears(_load(cfg.model))}
    batch = benchmark_batch(cfg.batch_size, cfg.length, stock.config.vocab_size)
    checkpoint_s, dense_s, speedup = paired_speedup(models["checkpoint"], models["dense"], batch, cfg.repeats)
    _, stock_s, stock_speedup = paired_speedup(models["checkpoint"], stock, batch, cfg.repeats)
    tokens = cfg.batch_size * cfg.length
    out: dict[str, Any] = {
        name: {
            "ms": seconds * 1e3,
            "tokens_per_s": tokens / seconds,
            "params": parameter_count(models[name]),
        }
        for name, seconds in (("dense", dense_s), ("checkpoint", checkpoint_s))
    }
    out["speedup"] = speedup  # median of the per-round ratios (the two models timed back to back)
    out["stock_dense_ms"], out["speedup_over_stock"] = stock_s * 1e3, stock_speedup
    if cfg.decode_tokens:
        if not all(hasattr(m, "generate") and m.can_generate() for m in models.values()):
            raise ValueError("--decode-tokens needs two causal LMs (models that can generate).")
        decode = measure_decode(models, cfg.decode_tokens, repeats=cfg.repeats, layout=cfg.decode_layout)
        for name, rate in decode.items():
            out[name]["decode_tokens_per_s"] = rate
        out["decode_speedup"] = decode["checkpoint"] / decode["dense"]
    return out


# Calibration patterns: the share of query heads (per KV group), FFN channels and residual dims closed.
CALIBRATION = ((0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (0.0, 0.5, 0.0), (0.0, 0.0, 0.25), (0.25, 0.25, 0.1))
CALIBRATION += ((0.5, 0.75, 0.4),)


def _close_share(gate, share: float, groups: int = 1) -> None:
    """Close the last `share` of each of `groups` equal slices of a gate vector (the same slots in every
    group, so GQA groups stay regular)."""
    theta = gate.theta.data.view(groups, -1)
    n = round(share * theta.shape[1])
    if n:
        theta[:, theta.shape[1] - n :] = -2.0


def calibrate(cfg: BenchConfig):
    """Time compacted copies of the dense model at the patterns of CALIBRATION and fit the cost model's
    per-unit costs (`finegates.latency`) by least squares, non-negative; returns them and the file they
    were written to."""
    import copy
    from functools import partial

    import numpy as np

    from finegates import GatesConfig, compress, get_gated_model
    from finegates.latency import FEATURES, LatencyCosts, default_costs_path, exact_features, model_shape
    from finegates.latency import machine as machine_key
    from finegates.ties import runtime_gates
    from finegates.timing import time_in_turns
    from finegates.workflows.encoding import benchmark_batch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dense = _load(cfg.model)
    batch = benchmark_batch(cfg.batch_size, cfg.length, dense.config.vocab_size)
    models, points = {}, []
    for i, (heads, channels, residual) in enumerate(CALIBRATION):
        gated = get_gated_model(copy.deepcopy(dense), GatesConfig(structure="runtime")).eval()
        ties = runtime_gates(gated)
        with torch.no_grad():
            for block in ties.blocks:
                if "heads" in block:
                    kv = block["kv_heads"].theta.numel() if "kv_heads" in block else 1
                    _close_share(block["heads"], heads, groups=kv)
                if "channels" in block:
                    _close_share(block["channels"], channels)
            _close_share(ties.residual, residual)
        points.append(exact_features(gated))
        models[i] = compress(gated).eval()
    seconds = time_in_turns({i: partial(m, **batch) for i, m in models.items()}, repeats=cfg.repeats)
    x = np.array([[p[k] for k in FEATURES] for p in points])
    y = np.array([seconds[i] for i in range(len(points))])
    active = list(range(len(FEATURES)))
    while True:  # least squares; a feature whose cost comes out negative is dropped and the rest refitted
        coef = np.zeros(len(FEATURES))
        coef[active] = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        negative = [j for j in active if coef[j] < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda j: coef[j]))
    threads = torch.get_num_threads()
    costs = LatencyCosts(
        model_shape=model_shape(dense.config),
        machine=machine_key(),
        batch_size=cfg.batch_size,
        length=cfg.length,
        threads=threads,
        coefficients={k: float(c) for k, c in zip(FEATURES, coef)},
        points=[{**p, "seconds": float(y[i])} for i, p in enumerate(points)],
    )
    path = cfg.costs_file or default_costs_path(dense.config, cfg.batch_size, cfg.length, threads)
    return costs, costs.save(path)
