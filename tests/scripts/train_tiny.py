"""Train a tiny gated BERT with FineGatesTrainer; run alone or under torchrun (gloo on CPU).

    python train_tiny.py OUT PER_DEVICE_BATCH [progressive]
    torchrun --nproc_per_node 2 train_tiny.py OUT PER_DEVICE_BATCH [progressive]
Each rank writes its trained gates to OUT/rank{RANK}.safetensors.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from finegates import GatesConfig, get_gated_model
from finegates.model import trainable_state_dict
from finegates.trainer import FineGatesTrainer


def main(out: str, per_device_batch: int, progressive: bool = False) -> None:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=99,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    # Nearly noise-free gates: each rank draws its own gate noise, so only then can two processes
    # match one process step for step.
    gates = GatesConfig(target_sparsity=0.3, warmup_steps=2, gate_lr=0.5, init_mean=0.0, noise_std=1e-6)
    if progressive:  # units whose gates closed leave the weights every step
        gates = GatesConfig(**{**gates.to_dict(), "compact_every": 1, "compact_margin": 0.0})
    model = get_gated_model(BertForSequenceClassification(config), gates)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 99, (32, 10), generator=gen)
    data = [{"input_ids": i, "labels": (i == 7).any().long()} for i in ids]
    args = TrainingArguments(
        output_dir=out,
        max_steps=4,
        per_device_train_batch_size=per_device_batch,
        learning_rate=1e-3,
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        dataloader_drop_last=True,
        optim="sgd",
    )  # Adam would magnify float rounding in near-zero gradients
    trainer = FineGatesTrainer(model=model, args=args, train_dataset=data, finalize=False)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.contiguous() for k, v in trainable_state_dict(trainer.model).items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), progressive=sys.argv[3:] == ["progressive"])
