"""FineGatesTrainer: sparsity in the loss and the logs, adapter checkpoints, exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

import finegates
from conftest import tiny_model
from finegates import GatesConfig, get_gated_model
from finegates.adapter import WEIGHTS_NAME
from finegates.model import trainable_state_dict
from finegates.progressive import removed_weights
from finegates.ties import runtime_gates
from finegates.trainer import FineGatesTrainer


def _dataset(n: int = 48) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 99, (n, 10), generator=gen)
    labels = (ids == 7).any(1).long() + (ids == 9).any(1).long()
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def _trainer(tmp_path, max_steps: int, gates: dict | None = None, **kwargs) -> FineGatesTrainer:
    model = get_gated_model(
        tiny_model("bert"),
        GatesConfig(**{"target_sparsity": 0.3, "warmup_steps": 4, "gate_lr": 0.05, **(gates or {})}),
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=2,
        save_steps=3,
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        **kwargs,
    )
    return FineGatesTrainer(model=model, args=args, train_dataset=_dataset(), finalize=False)


def _gates(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_logs_sparsity_and_saves_the_adapter(tmp_path):
    trainer = _trainer(tmp_path, max_steps=6)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and {"sparsity_removed", "sparsity_target", "lambda1", "lambda2"} <= set(logged[-1])
    assert logged[0]["sparsity_target"] < logged[-1]["sparsity_target"] <= 0.3
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / WEIGHTS_NAME).is_file() and not (checkpoint / "model.safetensors").exists()
    assert trainer.model.finegates_controller.lambda2.item() > 0


def test_gate_learning_rate_is_separate(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    optimizer = trainer.create_optimizer()
    lrs = sorted(group["lr"] for group in optimizer.param_groups)
    assert lrs == sorted([0.05, 0.05 * trainer.model.finegates_config.lagrangian_lr_scale, 1e-3])


# progressive compaction every step, margin 0, gates starting near closing: units leave before the
# checkpoint at step 3 and after it
PROGRESSIVE = {"compact_every": 1, "compact_margin": 0.0, "gate_lr": 0.5, "init_mean": 0.0}


@pytest.mark.parametrize(
    "gates",
    [None, PROGRESSIVE, {**PROGRESSIVE, "structure": "runtime"}],
    ids=["plain", "progressive", "progressive-runtime"],
)
def test_resume_from_checkpoint_is_exact(tmp_path, gates):
    straight = _trainer(tmp_path / "a", max_steps=6, gates=gates)
    straight.train()
    interrupted = _trainer(tmp_path / "b", max_steps=6, gates=gates)
    interrupted.train()  # writes checkpoint-3 on its way; resume a fresh trainer from it
    resumed = _trainer(tmp_path / "b", max_steps=6, gates=gates)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    expected, actual = _gates(straight.model), _gates(resumed.model)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=0, rtol=0, msg=name)
    if gates:
        cut = removed_weights(straight.model)
        assert cut > 0 and removed_weights(resumed.model) == cut
        saved = load_file(str(tmp_path / "b" / "checkpoint-3" / WEIGHTS_NAME))
        marks = {n: int(v.sum()) for n, v in saved.items() if n.endswith(".removed")}
        final = {
            n: int(v.sum()) for n, v in trainable_state_dict(straight.model).items() if n.endswith(".removed")
        }
        # units left before the checkpoint, and more after it
        assert marks and sum(marks.values()) < sum(final.values())
        logged = [e for e in straight.state.log_history if "weights_cut" in e]
        assert logged and logged[-1]["weights_cut"] > 0
    if gates and gates.get("structure") == "runtime":  # the stream narrowed, and narrows again on resume
        kept = runtime_gates(straight.model).stream_kept
        assert kept is not None and len(kept) < straight.model.config.hidden_size
        torch.testing.assert_close(runtime_gates(resumed.model).stream_kept, kept, atol=0, rtol=0)


def test_finalize_lands_on_the_target(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.finalize = True
    trainer.train()
    removed = finegates.sparsity_report(trainer.model.eval()).removed_fraction
    assert 0.3 <= removed <= 0.32  # at hidden size 32 one gate can carry more than 1% of the parameters


def test_training_leaves_the_kv_cache_setting_of_a_causal_lm(tmp_path):
    """Trainer turns config.use_cache off for training; the trained and the compacted model get it back."""
    model = get_gated_model(tiny_model("llama"), GatesConfig(target_sparsity=0.3, warmup_steps=2))
    assert model.config.use_cache is True
    ids = torch.randint(2, 99, (16, 10), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = FineGatesTrainer(
        model=model, args=args, train_dataset=[{"input_ids": i, "labels": i} for i in ids]
    )
    assert model.config.use_cache is False  # as transformers' Trainer sets it for training
    trainer.train()
    assert model.config.use_cache is True
    assert finegates.compress(model.eval()).config.use_cache is True


def test_a_run_that_misses_its_target_says_so(tmp_path, caplog):
    """Without the projection and with gates too slow to close, training removes far less than the target:
    the outcome records both fractions and the trainer warns."""
    model = get_gated_model(
        tiny_model("bert"),
        GatesConfig(target_sparsity=0.3, warmup_steps=2, gate_lr=1e-4, budget_tolerance=None),
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = FineGatesTrainer(model=model, args=args, train_dataset=_dataset())
    with caplog.at_level("WARNING", logger="finegates.trainer"):
        trainer.train()
    assert trainer.budget.removed_by_training < 0.05 and 0.3 <= trainer.budget.removed_after_finalize < 0.35
    assert "training removed" in caplog.text and "30.0%" in trainer.budget.warning()


def test_gates_keep_a_constant_lr_while_the_head_follows_its_schedule(tmp_path):
    trainer = _trainer(tmp_path, max_steps=6, lr_scheduler_type="linear")
    trainer.train()
    lrs = {group.get("finegates", "head"): group["lr"] for group in trainer.optimizer.param_groups}
    assert (
        lrs["gates"] == 0.05
        and lrs["multipliers"] == 0.05 * trainer.model.finegates_config.lagrangian_lr_scale
    )
    assert lrs["head"] < 1e-3  # linear decay to 0 over the run
    # the logged learning rate is the head's schedule, not the gates' constant lr
    logged = [row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row]
    assert logged and all(lr < 1e-3 for lr in logged)


def test_the_trainer_keeps_the_removed_fraction_near_the_target(tmp_path):
    model = get_gated_model(tiny_model("bert"), GatesConfig(target_sparsity=0.4))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=40,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
    )
    trainer = FineGatesTrainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    cfg = trainer.model.finegates_config
    assert cfg.warmup_steps == 12 and cfg.gate_lr is not None  # resolved from the run's 40 steps
    rows = [row for row in trainer.state.log_history if "sparsity_removed" in row]
    assert len(rows) == 40
    assert all(row["sparsity_removed"] <= row["sparsity_target"] + 0.02 for row in rows)
    assert all(abs(row["sparsity_removed"] - 0.4) <= 0.02 for row in rows if row["step"] >= 12)
    assert abs(trainer.budget.removed_after_finalize - trainer.budget.removed_by_training) <= 0.01


def test_a_finalize_that_overshoots_the_target_says_so():
    """Training on target, finalize far past it (whole units too coarse for the target): a warning naming
    both fractions; on target both ways: none."""
    from finegates.budget import BudgetOutcome

    over = BudgetOutcome(0.4, 0.395, 0.463, closed_gates=10, projected_closed=10, projected_reopened=0)
    assert "46.3%" in over.warning() and "40.0%" in over.warning()
    assert over.metrics()["warning"] == over.warning()
    on = BudgetOutcome(0.4, 0.395, 0.401, closed_gates=10, projected_closed=10, projected_reopened=0)
    assert on.warning() is None
    # training past the target: finalize reopened gates, not "made the rest of the cut"
    past = BudgetOutcome(0.3, 0.38, 0.30, closed_gates=10, projected_closed=0, projected_reopened=0)
    assert "38.0%" in past.warning() and "reopened" in past.warning()
    assert "raise gate_lr" not in past.warning()


def test_a_checkpoint_cannot_go_back_into_a_model_cut_since(tmp_path):
    """Units cut after a checkpoint are gone from the weights: loading it back (the best model at the end,
    or a resume into the same trained model) is refused by name instead of mixing two states."""
    trainer = _trainer(tmp_path, max_steps=6, gates=PROGRESSIVE)
    trainer.train()
    assert removed_weights(trainer.model) > 0
    with pytest.raises(ValueError, match="already cut"):
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint-3"))
    args = TrainingArguments(
        output_dir=str(tmp_path / "best"),
        max_steps=6,
        save_steps=3,
        eval_strategy="steps",
        eval_steps=3,
        load_best_model_at_end=True,
        report_to=[],
        use_cpu=True,
    )
    model = get_gated_model(tiny_model("bert"), GatesConfig(**PROGRESSIVE))
    with pytest.raises(ValueError, match="load_best_model_at_end cannot be combined with compact_every"):
        FineGatesTrainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset())


def test_weight_decay_leaves_biases_and_norms_alone():
    saved = ["classifier", "bert.embeddings.LayerNorm"]
    model = get_gated_model(tiny_model("bert"), GatesConfig(bias="gated", modules_to_save=saved))
    groups = finegates.optimizer_param_groups(model, gate_lr=0.05, weight_decay=0.1)
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    spared = [p for g in groups if "finegates" not in g and g["weight_decay"] == 0 for p in g["params"]]
    assert decayed and all(p.ndim >= 2 for p in decayed)
    assert spared and all(p.ndim == 1 for p in spared)
    # without decay, one group for the rest (the layout older checkpoints' optimizer state has)
    assert len(finegates.optimizer_param_groups(model, gate_lr=0.05)) == 3


@pytest.mark.parametrize("num_items", [None, 40])
def test_added_terms_count_once_per_accumulated_batch(tmp_path, num_items):
    """A causal LM's loss given num_items_in_batch is already a share of the accumulated batch (the Trainer
    does not divide it again): the sparsity term added to each of k micro-batches must be divided by k."""
    model = get_gated_model(tiny_model("llama"), GatesConfig(objective="paper", target_sparsity=0.5))
    args = TrainingArguments(
        output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to=[], use_cpu=True, max_steps=1
    )
    ids = torch.randint(2, 99, (4, 10), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": i, "labels": i} for i in ids]
    trainer = FineGatesTrainer(model=model, args=args, train_dataset=data)
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    inputs = {"input_ids": ids, "labels": ids}
    items = None if num_items is None else torch.tensor(num_items)
    torch.manual_seed(0)
    total = trainer.compute_loss(model, dict(inputs), num_items_in_batch=items)
    torch.manual_seed(0)
    task = super(FineGatesTrainer, trainer).compute_loss(model, dict(inputs), num_items_in_batch=items)
    penalty = finegates.objectives.paper_loss(model)
    assert float(penalty) > 0.1
    share = 0.5 if num_items is not None else 1.0  # the Trainer divides a per-batch mean by k itself
    torch.testing.assert_close(total, task + share * penalty)
