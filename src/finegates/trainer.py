"""`FineGatesTrainer`: transformers' Trainer with the sparsity loss, gate learning rates and logging.

Checkpoints hold the gate adapter (not the frozen base weights), and `resume_from_checkpoint`
restores it together with the optimizer, scheduler and RNG states the Trainer keeps.

Single process:  python train.py
Many processes:  accelerate launch train.py   |   torchrun --nproc_per_node 2 train.py
"""

from __future__ import annotations

import logging
import os

import torch
from safetensors.torch import load_file
from transformers import Trainer

from finegates.adapter import WEIGHTS_NAME, save_gates
from finegates.budget import BudgetOutcome, attach_budget, budget_outcome, set_training_steps
from finegates.distill import DistillConfig, distill_loss, teacher_and_student_inputs
from finegates.latency import budget_fraction, budget_target
from finegates.model import all_gates, controller, gates_config
from finegates.objectives import expected_sparsity, sparsity_loss
from finegates.optim import finalize_gates, keep_gate_lr_constant, optimizer_param_groups
from finegates.progressive import ProgressiveCompaction, apply_removed, weights_cut
from finegates.report import sparsity_report
from finegates.structure import frozen_structure
from finegates.ties import runtime_gates

logger = logging.getLogger(__name__)


def average_loss_per_process(model) -> bool:
    """True for models whose loss is a per-process mean (classification heads): Trainer scales the loss of
    models that take loss kwargs by the number of processes, assuming they divide a summed token loss by
    the global item count, which would double such a model's gradient on 2 ranks."""
    name = type(model).__name__
    return not name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))


def accumulation_share(trainer: Trainer, num_items_in_batch) -> float:
    """The weight of a per-batch mean added to the loss `Trainer.compute_loss` returns: 1, or 1 / the
    gradient-accumulation steps where the model's own loss is already a share of the accumulated batch
    (a causal LM given `num_items_in_batch`: `training_step` then leaves the sum of the micro-batches' losses
    undivided, and a term added whole to each would count k times)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:  # the Trainer's own rule (transformers' training_step)
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or getattr(
            trainer, "compute_loss_func", None
        ) is not None
    steps = getattr(trainer, "current_gradient_accumulation_steps", 1) or 1
    return 1.0 / steps if scaled else 1.0


def train_model(trainer: Trainer, resume: str | bool | None = None):
    """`trainer.train(resume_from_checkpoint=resume)`, then the model's own forward back in place: with
    `bf16=True` accelerate wraps the model's forward in autocast for good, and what a workflow does with
    the model after training (perplexity, zero-shot scores, compaction checks) must run in float32."""
    output = trainer.train(resume_from_checkpoint=resume)
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return output


def budget_logs(model, step: int) -> dict[str, float]:
    """What a training log records of the budget at `step`: the removed fraction (exact, and as the
    objective estimates it), the ramped target, the multipliers and the projection's counts."""
    cfg, ctrl = gates_config(model), controller(model)
    logs = {"sparsity_removed": budget_fraction(model)}  # the plan is cached: the step built it already
    if cfg.budget_estimator == "ste":  # its value is the exact fraction (the soft part only adds a gradient)
        logs["sparsity_expected"] = logs["sparsity_removed"]
    else:
        with torch.no_grad():
            logs["sparsity_expected"] = float(expected_sparsity(model))
    logs["sparsity_target"] = ctrl.target(budget_target(cfg), cfg.warmup_steps, step)
    if cfg.compact_every is not None:  # progressive compaction: gated-layer weights no longer multiplied
        logs["weights_cut"] = weights_cut(model)
    if cfg.target_speedup:  # the budget's measure is predicted time: parameters beside it
        logs["params_removed"] = sparsity_report(model).removed_fraction
    logs["lambda1"], logs["lambda2"] = ctrl.lambda1.item(), ctrl.lambda2.item()
    logs["projected_closed"] = int(ctrl.projected_closed)
    logs["projected_reopened"] = int(ctrl.projected_reopened)
    return logs


class FineGatesTrainer(Trainer):
    """A Trainer for a model returned by `get_gated_model`.

    The task head, biases and `modules_to_save` train at `args.learning_rate` on the args' schedule;
    the gates at the config's constant `gate_lr` (derived from the run's length when None, see
    `set_training_steps`). After every optimizer step `budget_step` keeps the removed fraction within
    `budget_tolerance` of the warmed-up target. With `finalize=True` (default) training ends with
    `finalize_gates`, so the saved gates remove at least the target fraction.
    """

    def __init__(self, *args, finalize: bool = True, distill: DistillConfig | None = None, **kwargs) -> None:
        model = kwargs.get("model", args[0] if args else None)
        # Trainer sets config.use_cache to args.use_cache (False by default) for training; the trained
        # model, and the compacted model built from its config, get the model's own setting back, or
        # `generate` would run without its KV cache.
        self._use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        super().__init__(*args, **kwargs)
        self.finalize = finalize
        self.distill = distill if distill is not None and distill.distill else None
        self._distill_term = 0.0
        gates_config(self.model)  # fail early on a model without gates
        if average_loss_per_process(self.accelerator.unwrap_model(self.model)):
            self.model_accepts_loss_kwargs = False
        self._sparsity_term = 0.0
        self._task_losses: list[float] = []  # since the last log: the loss without the added terms
        self.budget: BudgetOutcome | None = None  # set by train(): removed by training vs after finalize
        cfg = gates_config(self.accelerator.unwrap_model(self.model))
        self.compaction = None
        if cfg.compact_every is not None:
            if self.args.load_best_model_at_end:
                raise ValueError(
                    "load_best_model_at_end cannot be combined with compact_every: the units progressive "
                    "compaction cuts after the best checkpoint are gone from the weights and cannot come "
                    "back. Drop one of them."
                )
            # a distillation teacher is the same weights with the gates bypassed: it needs them in full
            self.compaction = ProgressiveCompaction(
                self.accelerator.unwrap_model(self.model),
                cfg.compact_every,
                keep_dense=self.distill is not None,
            )
            self.add_callback(self.compaction)

    def gate_steps(self, num_training_steps: int) -> int:
        """Steps during which the gates train (all of them unless a subclass delays the gates)."""
        return num_training_steps

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            if self.state.max_steps > 0:  # inside train(): the run's length is known
                set_training_steps(
                    self.accelerator.unwrap_model(model), self.gate_steps(self.state.max_steps)
                )
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = optimizer_param_groups(
                model, head_lr=self.args.learning_rate, weight_decay=self.args.weight_decay
            )
            self.optimizer = cls(groups, **kwargs)
            unwrapped = self.accelerator.unwrap_model(model)
            # the budget counts the step the next forward pass trains at
            attach_budget(self.optimizer, unwrapped, lambda: self.sparsity_step() + 1)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The args' schedule for the head; the gates and multipliers keep their constant lr."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        keep_gate_lr_constant(scheduler)
        return scheduler

    def _get_learning_rate(self) -> float:
        """The logged learning rate: the head's scheduled one (the gates' is constant, `gate_lr`); the
        gates' where nothing else trains."""
        for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr(), strict=True):
            if "finegates" not in group:
                return lr
        return super()._get_learning_rate()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        distill = self.distill if model.training else None
        if distill is not None:
            unwrapped = self.accelerator.unwrap_model(model)
            teacher, inputs = teacher_and_student_inputs(unwrapped, inputs, distill)
        result = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        task_loss, outputs = result
        share = accumulation_share(self, num_items_in_batch) if model.training else 1.0
        if model.training:
            self._task_losses.append(float(task_loss.detach()) / share)  # the micro-batch's own mean
            penalty = sparsity_loss(self.accelerator.unwrap_model(model), step=self.sparsity_step())
            self._sparsity_term = float(penalty.detach())
            task_loss = task_loss + share * penalty
        if distill is not None:
            ties = runtime_gates(self.accelerator.unwrap_model(model))
            kept = None if ties is None else ties.stream_kept
            extra = distill_loss(outputs, teacher, inputs.get("attention_mask"), distill, kept)
            self._distill_term = float(extra.detach())
            task_loss = task_loss + share * extra
        return (task_loss, outputs) if return_outputs else task_loss

    def sparsity_step(self) -> int:
        """The step the target warm-up counts from (the global step unless a subclass delays the gates)."""
        return self.state.global_step

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._task_losses:
            logs["task_loss"] = sum(self._task_losses) / len(self._task_losses)
            self._task_losses.clear()
        if "loss" in logs:
            model = self.accelerator.unwrap_model(self.model)
            logs.update(budget_logs(model, max(self.sparsity_step(), 0)))
            logs["sparsity_term"] = self._sparsity_term
            if self.distill is not None:
                logs["distill_term"] = self._distill_term
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        with frozen_structure(self.model):  # the module tree is fixed during the run
            output = super().train(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if self._use_cache is not None:
            model.config.use_cache = self._use_cache
        if gates_config(model).objective == "budget":
            trained = budget_fraction(model)
            if self.finalize:
                finalize_gates(model)
            self.budget = budget_outcome(model, trained)
            if self.budget.warning():
                logger.warning("FineGates budget: %s", self.budget.warning())
        return output

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        save_gates(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{resume_from_checkpoint} holds no {WEIGHTS_NAME}: not a FineGates checkpoint."
            )
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.compaction is not None and any(bool(gate.removed.any()) for gate in all_gates(model)):
            raise ValueError(
                f"Cannot load {resume_from_checkpoint} into a model progressive compaction has already cut: "
                "the units cut since cannot come back. Load it into a fresh gated model of the base model."
            )
        model.load_state_dict(load_file(path), strict=False)
        if self.compaction is not None:  # the units removed before the checkpoint leave the weights again
            apply_removed(model, self.compaction.keep_dense)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
