"""The systems FineGates is compared with, behind one interface, and the loop that trains any of them.

Methods (`METHODS`): full, lora, magnitude, magnitude+lora, squarehead, salr, maskllm, finegates,
finegates+kd. Each module holds one method; `base.py` the shared interface; `loop.py` the training.

>>> from finegates.baselines import METHODS, train_method
>>> sorted(METHODS)[:3]
['finegates', 'finegates+kd', 'full']
"""

from finegates.baselines.base import KINDS_OF_SPARSITY, BaseMethod, Method, MethodConfig
from finegates.baselines.loop import MethodResult, train_method
from finegates.baselines.registry import METHODS, make_method
from finegates.baselines.salr import salr_storage_bytes
from finegates.baselines.sparse_inference import measure_cpu_inference
from finegates.distill import squarehead_loss

__all__ = [
    "KINDS_OF_SPARSITY",
    "METHODS",
    "BaseMethod",
    "Method",
    "MethodConfig",
    "MethodResult",
    "make_method",
    "measure_cpu_inference",
    "salr_storage_bytes",
    "squarehead_loss",
    "train_method",
]
