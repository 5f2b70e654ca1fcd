"""`compare` runs every method on the same tiny data, writes one table and plot, and resumes."""

from __future__ import annotations

import pytest
import torch

from finegates.workflows.compare import CompareConfig, compare


@pytest.fixture(scope="module")
def tiny_task(tiny_run_inputs):
    """A tiny random BERT and a two-topic csv (columns sentence, topic): conftest's `tiny_run_inputs`."""
    return tiny_run_inputs


def test_compare_methods_then_resume(tiny_task, tmp_path):
    """Three methods (one needing the dense teacher); every method's training is tested in test_baselines."""
    model_dir, csv = tiny_task
    methods = ["full", "finegates", "squarehead"]
    cfg = CompareConfig(
        model=str(model_dir),
        task=str(csv),
        text_column="sentence",
        label_column="topic",
        methods=methods,
        sparsity=[0.3],
        max_train_samples=32,
        max_test_samples=16,
        max_length=12,
        batch_size=8,
        epochs=1,
        output_dir=str(tmp_path),
    )
    rows = compare(cfg)
    assert {r["method"] for r in rows} == set(methods)
    by_method = {r["method"]: r for r in rows}
    assert by_method["full"]["removed_params"] == 0
    assert by_method["finegates"]["kind_of_sparsity"] == "structured"
    assert by_method["finegates"]["trainable_params"] < by_method["full"]["trainable_params"]
    table = (tmp_path / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    csr = by_method["squarehead"]["csr_b32"]  # its unstructured layers timed through torch's CSR matmul
    assert 0.25 < csr["layer_sparsity"] < 0.35 and "CSR matmul" in table
    assert f"({csr['dense_ms'] / csr['csr_ms']:.2f}x)" in table  # the CSR timing the table reports
    assert (tmp_path / "teacher" / "config.json").is_file()
    assert not (tmp_path / "results" / "teacher@-.json").exists()  # the full run is the teacher: trained once
    for r in rows:
        assert r["wall_s"] >= r["step_s"]  # the whole run takes at least one of its steps
    assert all(
        f"{r['speedup_b32']:.2f}x |" in table for r in rows
    )  # the paired ratio is what the table shows
    assert (tmp_path / "pareto.png").stat().st_size > 0
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "results").glob("*.json")}
    compare(cfg)  # everything is on disk: nothing reruns
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "results").glob("*.json")}


def test_compare_never_mixes_two_comparisons(tmp_path):
    import dataclasses

    from finegates.workflows.run_config import write_run_config
    from finegates.workflows.run_folder import RunFolderError

    cfg = CompareConfig(methods=["full"], sparsity=[0.3], max_length=12, output_dir=str(tmp_path))
    write_run_config(tmp_path, {"compare": cfg})  # a comparison already in the folder
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "full.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"another comparison \(max_length differ\)"):
        compare(dataclasses.replace(cfg, max_length=16))
    assert (tmp_path / "results" / "full.json").is_file()


def test_compare_rejects_unknown_methods_and_budgets():
    with pytest.raises(ValueError, match="Unknown methods"):
        CompareConfig(methods=["adapters"])
    with pytest.raises(ValueError, match="sparsity"):
        CompareConfig(sparsity=[1.5])


def test_paired_speedup_is_the_median_of_per_round_ratios():
    """A model that does twice the work of its reference reads about 0.5x, whatever the other load."""
    from finegates.workflows.evaluation import paired_speedup

    class Work(torch.nn.Module):
        def __init__(self, repeats: int) -> None:
            super().__init__()
            self.repeats = repeats
            self.weight = torch.randn(256, 256)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = input_ids.float() @ self.weight
            for _ in range(self.repeats * 40):
                x = torch.tanh(x @ self.weight)
            return x

    batch = {"input_ids": torch.randn(64, 256)}
    model_s, reference_s, speedup = paired_speedup(Work(2), Work(1), batch, repeats=5)
    assert model_s > reference_s > 0
    assert 0.35 < speedup < 0.7


def test_compare_trains_finegates_in_the_structure_asked_for():
    from finegates.workflows.compare import _method_config

    assert _method_config("finegates", 0.3, "runtime").gates_config().structure == "runtime"
    assert _method_config("finegates+kd", 0.3).gates_config().structure == "fine"
    with pytest.raises(ValueError, match="structure"):
        CompareConfig(structure="coarse")


def test_compare_takes_a_learning_rate_per_method_and_bf16(tiny_task, tmp_path, monkeypatch):
    """`learning_rates` reaches the method's training (others keep their defaults), with `bf16`; bad
    items are refused when the config is made, not in a method's own process."""
    from finegates.baselines import loop
    from finegates.baselines.registry import METHODS
    from finegates.workflows.compare import learning_rates, run_one

    model_dir, csv = tiny_task
    cfg = CompareConfig(
        model=str(model_dir), task=str(csv), text_column="sentence", label_column="topic",
        max_train_samples=16, max_test_samples=8, max_length=12, output_dir=str(tmp_path),
        learning_rates=["full=3e-4,lora=1e-3"], bf16=True,
    )  # fmt: skip
    assert learning_rates(cfg) == {"full": 3e-4, "lora": 1e-3}
    seen = []

    class Stop(Exception):
        pass

    def fit(method, model, batches, **kwargs):
        seen.append((type(method).__name__, kwargs["lr"], kwargs["bf16"]))
        raise Stop

    monkeypatch.setattr(loop, "fit_method", fit)
    for method in ("full", "magnitude+lora"):
        with pytest.raises(Stop):
            run_one(cfg, method, None if method == "full" else 0.3)
    default = METHODS["magnitude+lora"].default_lr
    assert [s[1:] for s in seen] == [(3e-4, True), (default, True)]
    for bad, message in (("full", "METHOD=LR"), ("full=-1", "positive"), ("adapters=1e-3", "unknown method")):
        with pytest.raises(ValueError, match=message):
            CompareConfig(learning_rates=[bad])


def test_a_learning_rate_sweep_picks_each_method_on_validation_rows(tiny_task, tmp_path):
    """`lr_sweep`: every method trains at each multiple of its learning rate; the table keeps, per method,
    the run with the best accuracy on the held-out validation rows, and lists the others under it."""
    from finegates.baselines.registry import METHODS
    from finegates.workflows.compare import picked_rows

    model_dir, csv = tiny_task
    cfg = CompareConfig(
        model=str(model_dir), task=str(csv), text_column="sentence", label_column="topic",
        methods=["full", "finegates"], sparsity=[0.3], max_train_samples=24, max_test_samples=12,
        validation_samples=12, lr_sweep=[0.5, 2.0], max_length=12, batch_size=8, epochs=1,
        output_dir=str(tmp_path),
    )  # fmt: skip
    rows = compare(cfg)
    assert sorted((r["method"], r["lr_scale"]) for r in rows) == [
        ("finegates", 0.5), ("finegates", 2.0), ("full", 0.5), ("full", 2.0)
    ]  # fmt: skip
    for r in rows:
        assert r["lr"] == pytest.approx(METHODS[r["method"]].default_lr * r["lr_scale"])
        assert 0 <= r["validation_accuracy"] <= 1
    picked = picked_rows(rows)
    assert sorted(r["method"] for r in picked) == ["finegates", "full"]
    for r in picked:
        same = [o for o in rows if o["method"] == r["method"]]
        assert r["validation_accuracy"] == max(o["validation_accuracy"] for o in same)
    # a row from before the sweep was added (no lr_scale) is not picked over the swept ones
    unswept = {**rows[0], "lr_scale": None, "validation_accuracy": 2.0}
    assert [r["lr_scale"] for r in picked_rows([unswept, *rows])] == [r["lr_scale"] for r in picked]
    assert picked_rows([unswept]) == [unswept]
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("(picked)") == 2 and "Learning-rate sweep" in table
    body = [line for line in table.splitlines() if line.startswith("| f")]
    assert len(body) == 2  # one row per method in the table itself
    with pytest.raises(ValueError, match="validation-samples"):
        CompareConfig(lr_sweep=[1.0, 3.0])
    with pytest.raises(ValueError, match="distinct positive"):
        CompareConfig(lr_sweep=[1.0, -3.0], validation_samples=10)
