"""Workflows: the commands a practitioner runs (finetune, ...), each a config dataclass and a function.

>>> from finegates.workflows import FinetuneConfig, finetune
"""

from finegates.workflows.finetune import FinetuneConfig, finetune
from finegates.workflows.run_report import render_report

__all__ = ["FinetuneConfig", "finetune", "render_report"]
