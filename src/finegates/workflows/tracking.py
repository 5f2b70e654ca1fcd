"""Training logs for run reports: the task loss without the sparsity term, next to the total."""

from __future__ import annotations

from finegates.trainer import FineGatesTrainer


class TaskLossTrainer(FineGatesTrainer):
    """`FineGatesTrainer` that also logs `task_loss`: the mean training loss minus the sparsity and
    distillation terms."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._task_losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            loss = result[0] if return_outputs else result
            self._task_losses.append(float(loss.detach()) - self._sparsity_term - self._distill_term)
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._task_losses:
            logs["task_loss"] = sum(self._task_losses) / len(self._task_losses)
            self._task_losses.clear()
        super().log(logs, start_time)


def budget_metrics(trainer: FineGatesTrainer) -> dict | None:
    """The run's BudgetOutcome for metrics.json, with its warning (None when the objective has no budget)."""
    if trainer.budget is None:
        return None
    return {**trainer.budget.to_dict(), "warning": trainer.budget.warning()}
