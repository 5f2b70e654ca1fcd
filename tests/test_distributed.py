"""Two CPU processes (torchrun, gloo) end with identical gates, equal to one process at the same global
batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def _train(launcher: list[str], out: Path, per_device_batch: int, extra: list[str]) -> None:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, str(SCRIPT), str(out), str(per_device_batch), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("extra", [[], ["progressive"]], ids=["plain", "progressive"])
def test_two_processes_match_one_at_the_same_global_batch(tmp_path, extra):
    _train([sys.executable], tmp_path / "one", per_device_batch=8, extra=extra)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _train(torchrun, tmp_path / "two", per_device_batch=4, extra=extra)
    one = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    rank0 = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "two" / "rank1.safetensors"))
    assert one.keys() == rank0.keys() == rank1.keys()
    for name in one:
        torch.testing.assert_close(rank0[name], rank1[name], atol=0, rtol=0, msg=f"ranks differ: {name}")
        torch.testing.assert_close(
            rank0[name], one[name], atol=1e-5, rtol=1e-5, msg=f"1 vs 2 processes: {name}"
        )
    # the budget took part on every rank alike: the projection closed gates (the counters are compared above)
    assert one["finegates_controller.projected_closed"].item() > 0
    if extra:  # progressive compaction removed units on every rank alike (the marks are compared above)
        assert any(v.any() for k, v in one.items() if k.endswith(".removed"))
