"""FineGates: finetune and compress transformer models by learning binary gates on rows and columns.

>>> import finegates
>>> from finegates import GatesConfig, get_gated_model, sparsity_loss, sparsity_report
"""

from finegates.adapter import load_gates, save_gates
from finegates.budget import attach_budget, budget_step, project_budget, set_training_steps
from finegates.compress import compress, decode_layout, load_compressed
from finegates.config import GatesConfig
from finegates.layer import GatedLinear
from finegates.model import gated_layers, get_gated_model, is_gated, print_trainable_parameters
from finegates.objectives import expected_sparsity, sparsity_loss
from finegates.optim import finalize_gates, optimizer_param_groups
from finegates.plan import compaction_plan
from finegates.report import sparsity_report

__all__ = [
    "GatedLinear",
    "GatesConfig",
    "attach_budget",
    "budget_step",
    "compaction_plan",
    "compress",
    "decode_layout",
    "expected_sparsity",
    "finalize_gates",
    "gated_layers",
    "get_gated_model",
    "is_gated",
    "load_compressed",
    "load_gates",
    "optimizer_param_groups",
    "print_trainable_parameters",
    "project_budget",
    "save_gates",
    "set_training_steps",
    "sparsity_loss",
    "sparsity_report",
]
__version__ = "0.1.0"
