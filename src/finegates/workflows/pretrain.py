"""`finegates pretrain`: a LLaMA trained from scratch with weights and gates, against the same run without
gates.

Both runs start from the same initialisation and see the same batches. In the gated run the gates are
bypassed for `gate_start_step` steps (the reference switches its sparsity term on after a warm-up),
then weights and gates train together under the budget objective. Text is byte-level (vocabulary 256 +
EOS), so the workflow needs no tokenizer file.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from finegates.compress import compress
from finegates.compress.linear import use_compact_linears
from finegates.config import GatesConfig
from finegates.data.registry import load_text_corpus
from finegates.model import get_gated_model, parameter_count, set_gates_enabled
from finegates.report import sparsity_report
from finegates.trainer import FineGatesTrainer, train_model
from finegates.workflows.causal_lm import perplexity, split_documents
from finegates.workflows.evaluation import paired_speedup
from finegates.workflows.results import result_from_dict
from finegates.workflows.run_config import PrecisionOptions
from finegates.workflows.run_folder import RunFolder
from finegates.workflows.run_report import write_run_outputs

logger = logging.getLogger(__name__)
EOS = 256


@dataclass
class PretrainConfig(PrecisionOptions):
    """Model size, data and schedule of a pretraining comparison."""

    text: str = field(default="book-excerpts", metadata={"help": "Embedded corpus to train on."})
    hidden_size: int = field(default=128, metadata={"help": "LLaMA hidden size."})
    num_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    num_heads: int = field(default=4, metadata={"help": "Query heads."})
    num_kv_heads: int = field(default=2, metadata={"help": "Key/value heads (grouped-query attention)."})
    intermediate_size: int = field(default=344, metadata={"help": "FFN width."})
    seq_len: int = field(default=128, metadata={"help": "Bytes per block."})
    batch_size: int = field(default=16, metadata={"help": "Blocks per step."})
    max_steps: int = field(default=300, metadata={"help": "Training steps of each run."})
    gate_start_step: int = field(default=100, metadata={"help": "Steps before the gates switch on."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Weight learning rate (cosine)."})
    heldout_fraction: float = field(default=0.1, metadata={"help": "Share of documents held out."})
    output_dir: str = field(default="runs/pretrain", metadata={"help": "Run folder."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, data order and gate noise."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the run already in output_dir."})

    def __post_init__(self) -> None:
        if not 0 <= self.gate_start_step < self.max_steps:
            raise ValueError(f"gate_start_step must be in [0, max_steps), got {self.gate_start_step}.")


def default_pretrain_gates() -> GatesConfig:
    return GatesConfig(target_sparsity=0.4, bias="none", modules_to_save=[])


def byte_blocks(documents: list[str], length: int) -> torch.Tensor:
    ids: list[int] = []
    for doc in documents:
        ids.extend(doc.encode("utf-8"))
        ids.append(EOS)
    n = len(ids) // length
    if n == 0:
        raise ValueError(f"The text has {len(ids)} bytes, fewer than one block of {length}.")
    return torch.tensor(ids[: n * length]).view(n, length)


class GateSwitchTrainer(FineGatesTrainer):
    """Gates bypassed (and no sparsity term) before `gate_start_step`; the target warms up from there."""

    def __init__(self, *args, gate_start_step: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate_start_step = gate_start_step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        on = self.state.global_step >= self.gate_start_step
        set_gates_enabled(self.accelerator.unwrap_model(model), on)
        if on:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def sparsity_step(self) -> int:
        return self.state.global_step - self.gate_start_step

    def gate_steps(self, num_training_steps: int) -> int:
        return max(1, num_training_steps - self.gate_start_step)


def _model(cfg: PretrainConfig) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=EOS + 1,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.seq_len,
            eos_token_id=EOS,
            bos_token_id=None,
            pad_token_id=None,
            tie_word_embeddings=True,
        )
    )


def _args(cfg: PretrainConfig, out: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, cfg.max_steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, cfg.max_steps // 20),
        save_strategy="no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        disable_tqdm=cfg.quiet,
        use_cpu=not torch.cuda.is_available(),
        bf16=cfg.bf16,
    )


def pretrain(cfg: PretrainConfig, gates: GatesConfig | None = None) -> dict[str, Any]:
    """Train the dense and the gated model at equal steps; returns (and writes) their metrics."""
    gates = gates or default_pretrain_gates()
    if gates.compact_every is not None:
        raise ValueError(
            "--compact-every (progressive compaction) cuts frozen weights; pretraining trains them. Leave "
            "it unset for pretrain."
        )
    docs = load_text_corpus(cfg.text)  # checked before the run folder is touched
    with RunFolder.claim(cfg.output_dir, cfg.overwrite) as folder:
        folder.write_config({"pretrain": cfg, "gates": gates})
        metrics = _run(cfg, gates, docs, folder.work)
        folder.commit()
    return metrics


def _compacted(gated, dense, heldout: torch.Tensor, quiet: bool) -> dict[str, Any]:
    """The gated model compacted: its held-out perplexity (the gated model's, compaction being exact), its
    parameters, and its forward time against the dense model's (on the same GEMM routes), timed in turns on
    8 held-out blocks."""
    small = use_compact_linears(compress(gated))  # its LM head too: both models on the same GEMM routes
    # no KV cache on either side, and the dense model on the compacted model's GEMM routes: the same work
    batch = {"input_ids": heldout[:8], "use_cache": False}
    same_routes = use_compact_linears(copy.deepcopy(dense))
    seconds, dense_seconds, speedup = paired_speedup(small, same_routes.eval(), batch)
    return {
        "perplexity": perplexity(small, heldout, quiet=quiet),
        "params": parameter_count(small),
        "dense_params": parameter_count(dense),
        "forward_s": seconds,
        "dense_forward_s": dense_seconds,
        "speedup": speedup,
        "batch": list(batch["input_ids"].shape),
    }


def _run(cfg: PretrainConfig, gates: GatesConfig, docs: list[str], out: Path) -> dict[str, Any]:
    train_docs, heldout_docs = split_documents(docs, cfg.heldout_fraction)
    train, heldout = byte_blocks(train_docs, cfg.seq_len), byte_blocks(heldout_docs, cfg.seq_len)[:64]
    data = [{"input_ids": b, "labels": b} for b in train]
    dense = _model(cfg)
    gated = get_gated_model(copy.deepcopy(dense), gates).requires_grad_(True)
    metrics: dict[str, Any] = {"run": "pretrain"}
    for name, model, trainer_cls, extra in (
        ("dense", dense, Trainer, {}),
        ("gated", gated, GateSwitchTrainer, {"gate_start_step": cfg.gate_start_step}),
    ):
        begin = time.perf_counter()
        trainer = trainer_cls(model=model, args=_args(cfg, out / name), train_dataset=data, **extra)
        train_model(trainer)
        model.eval()
        metrics[name] = {
            "train_s": time.perf_counter() - begin,
            "perplexity": perplexity(model, heldout, quiet=cfg.quiet),
            "log_history": trainer.state.log_history,
        }
    metrics["sparsity"] = sparsity_report(gated).to_dict()
    metrics["bits_per_byte"] = {k: math.log2(metrics[k]["perplexity"]) for k in ("dense", "gated")}
    metrics["compacted"] = _compacted(gated, dense, heldout, cfg.quiet)
    result = result_from_dict(metrics)
    write_run_outputs(out, result)  # each model's training log is in its entry
    return result.to_dict()
