"""The `finegates` CLI: options generated from the config dataclasses, config files, errors, a tiny run."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from finegates.cli import build_parser, main
from finegates.cli_args import build_configs, flag_name
from finegates.config import GatesConfig
from finegates.workflows.evaluate import EvaluateConfig
from finegates.workflows.finetune import FinetuneConfig
from finegates.workflows.run_report import render_tradeoff


def _configs(argv: list[str]) -> dict:
    args = build_parser().parse_args(["finetune", *argv])
    return build_configs(args, {"finetune": FinetuneConfig, "gates": GatesConfig})


def test_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for cls in (GatesConfig, FinetuneConfig):
        for field in dataclasses.fields(cls):
            assert flag_name(field.name) in text, field.name
    assert "Fraction of gated-layer parameters to remove" in text  # help comes from field metadata


@pytest.mark.parametrize(
    ("command", "flag", "default"),
    [
        ("pretrain", "--target-sparsity", "(default: 0.4)"),  # the workflow's own gate defaults
        ("posttrain", "--target-sparsity", "(default: 0.3)"),
        ("compare", "--sparsity", "(default: [0.2, 0.4])"),  # a default_factory field
    ],
)
def test_help_shows_the_defaults_a_run_uses(capsys, command, flag, default):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert default in text.split(f"{flag} ", 2)[-1].split("--", 1)[0], text.split(f"{flag} ", 2)[-1][:300]


def test_run_and_gate_options_do_not_collide():
    assert not {f.name for f in dataclasses.fields(GatesConfig)} & {
        f.name for f in dataclasses.fields(FinetuneConfig)
    }


def test_flags_reach_the_configs():
    configs = _configs(
        [
            "--target-sparsity",
            "0.4",
            "--target-modules",
            "query",
            "value",
            "--max-train-samples",
            "100",
            "--no-benchmark",
            "--gate-lr",
            "0.05",
            "--text-pair-column",
            "none",
        ]
    )
    run, gates = configs["finetune"], configs["gates"]
    assert (gates.target_sparsity, gates.target_modules, gates.gate_lr) == (0.4, ["query", "value"], 0.05)
    assert (run.max_train_samples, run.benchmark, run.text_pair_column, run.epochs) == (100, False, None, 3.0)


@pytest.mark.parametrize(
    "words, expected", [(["all-linear"], "all-linear"), ([r".*\.query"], r".*\.query"), (["none"], None)]
)
def test_single_word_module_selections(words, expected):
    assert _configs(["--target-modules", *words])["gates"].target_modules == expected


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_file_then_flags(tmp_path, suffix):
    path = tmp_path / f"run.{suffix}"
    data = {"finetune": {"epochs": 1, "task": "boolq"}, "gates": {"target_sparsity": 0.2}}
    path.write_text(json.dumps(data))  # JSON is valid YAML
    configs = _configs(["--config", str(path), "--epochs", "2"])
    assert (configs["finetune"].epochs, configs["finetune"].task, configs["gates"].target_sparsity) == (
        2,
        "boolq",
        0.2,
    )


def test_flat_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_length: 32\ntarget_sparsity: 0.5\n")
    configs = _configs(["--config", str(path)])
    assert (configs["finetune"].max_length, configs["gates"].target_sparsity) == (32, 0.5)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--target-sparsity", "1.5"], ["target_sparsity must be in [0, 1)"]),
        (["--gate-family", "nope"], ["Unknown gate_family"]),
        (["--batch-size", "0"], ["batch_size must be >= 1"]),
        (["--lr-scheduler", "warmup"], ["lr_scheduler must be one of", "cosine"]),
        (["--task", "no-such-task", "--output-dir", "OUT"], ["Unknown task 'no-such-task'"]),
    ],
)
def test_bad_options_fail_with_one_line(tmp_path, capsys, argv, words):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(["finetune", *argv]) == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words) and "Traceback" not in err


def test_the_head_lr_schedule_reaches_the_trainer(tmp_path):
    from finegates.workflows.finetune import training_arguments

    cfg = _configs(["--lr-scheduler", "constant"])["finetune"]  # the reference's schedule
    assert training_arguments(cfg, tmp_path, 1e-3, False).lr_scheduler_type == "constant"
    assert _configs([])["finetune"].lr_scheduler == "cosine"


def test_a_config_file_that_is_not_a_mapping_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("- 1\n- 2\n")
    assert main(["finetune", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "must hold a mapping" in err and "Traceback" not in err


def test_unknown_key_in_config_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("epochz: 3\n")
    assert main(["finetune", "--config", str(path)]) == 2
    assert "unknown keys ['epochz']" in capsys.readouterr().err


def _tiny_argv(model_dir, csv) -> list[str]:
    return [
        "finetune", "--model", str(model_dir), "--task", str(csv), "--text-column", "sentence",
        *["--label-column", "topic", "--max-length", "12", "--batch-size", "8", "--quiet"],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tiny_run_inputs, tmp_path_factory):
    """A finished tiny finetune run: (output folder, what it printed)."""
    out = tmp_path_factory.mktemp("run") / "run"
    options = "--epochs 2 --validation-size 8 --bench-batch-size 2 --bench-repeats 1 --logging-steps 2 "
    options += "--target-sparsity 0.3 --warmup-steps 4"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*_tiny_argv(*tiny_run_inputs), "--output-dir", str(out), *options.split()]) == 0
    return out, printed.getvalue()


def test_tiny_finetune_writes_config_metrics_report(tiny_run):
    out, printed = tiny_run
    assert f"Report: {out / 'report.md'}" in printed
    saved = json.loads((out / "run_config.json").read_text())
    assert FinetuneConfig(**saved["finetune"]).max_length == 12
    assert GatesConfig.from_dict(saved["gates"]).target_sparsity == 0.3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"]["removed_fraction"] >= 0.3  # finalize_gates lands on the target
    # metrics.json holds the whole run's time and the report's final place (not the .partial one)
    assert metrics["timings_s"]["total"] > metrics["timings_s"]["train"]
    assert metrics["report"] == str(out / "report.md")
    correct = metrics["accuracy"]["gated"] * metrics["task"]["test_rows"]  # a count of test rows, not a guess
    assert correct == pytest.approx(round(correct)) and metrics["task"]["train_rows"] == 64
    report = (out / "report.md").read_text()
    for heading in (
        "Budget",
        "Test accuracy",
        "Parameters removed",
        "Trainable parameters",
        "Latency",
        "Kept widths",
    ):
        assert heading in report
    budget = metrics["budget"]  # what training removed, beside what finalize made of it
    assert (
        budget["target"] == 0.3
        and budget["removed_after_finalize"] == metrics["sparsity"]["removed_fraction"]
    )
    assert (
        f"| 30.00% | {budget['removed_by_training']:.2%} | {budget['removed_after_finalize']:.2%} |" in report
    )
    for name in (
        "training_curves.png",
        "kept_widths.png",
        "gates/finegates_adapter.safetensors",
        "log_history.json",
    ):
        assert (out / name).is_file(), name
    assert main(["report", str(out)]) == 0
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").is_file()
    assert metrics["accuracy"]["compacted"] == pytest.approx(metrics["accuracy"]["gated"])  # exact compaction
    assert (
        metrics["parameters"]["compacted_model"]
        == metrics["parameters"]["dense_model"] - metrics["sparsity"]["model_removed"]
    )
    assert (out / "compressed" / "config.json").is_file() and "Speedup" in report


def test_report_of_several_runs_plots_the_tradeoff(tiny_run, tmp_path, capsys):
    """Several run folders: each report is re-rendered and tradeoff.md/.png list them by removed fraction."""
    out, _ = tiny_run
    runs = []
    for removed, accuracy in (
        (0.6, 0.5),
        (0.2, 0.9),
    ):  # a second and third run, as if trained at other targets
        run = tmp_path / f"removed-{removed}"
        shutil.copytree(out, run)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["sparsity"]["removed_fraction"], metrics["accuracy"]["compacted"] = removed, accuracy
        (run / "metrics.json").write_text(json.dumps(metrics))
        runs.append(run)
    assert main(["report", str(out), *map(str, runs)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Report: ") == 3
    tradeoff = Path(printed.split("Trade-off: ")[1].strip())
    table = tradeoff.read_text()
    assert (
        table.index("removed-0.2") < table.index(str(out)) < table.index("removed-0.6")
    )  # sorted by removed
    assert "| 0.9000 |" in table and (tradeoff.parent / "tradeoff.png").stat().st_size > 0
    assert main(["report", *map(str, runs), "--tradeoff-dir", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "tradeoff.md").is_file()


def test_tradeoff_refuses_runs_of_different_kinds(tiny_run, tmp_path):
    out, _ = tiny_run
    other = tmp_path / "posttrain"
    other.mkdir()
    sparsity = json.loads((out / "metrics.json").read_text())["sparsity"]
    (other / "metrics.json").write_text(
        json.dumps(
            {
                "sparsity": sparsity,
                "dense": {"perplexity": 20.0},
                "compressed": {"perplexity": 25.0},
                "prefill_speedup": 1.2,
                "decode_speedup": 1.1,
            }
        )
    )
    with pytest.raises(ValueError, match="measure different things"):
        render_tradeoff([out, other], tmp_path)


def _assert_same_gates(a_run: Path, b_run: Path) -> None:
    """The two runs saved bit-identical gate adapters."""
    from safetensors.torch import load_file

    a = load_file(a_run / "gates" / "finegates_adapter.safetensors")
    b = load_file(b_run / "gates" / "finegates_adapter.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_resume_ends_with_the_same_gates(tiny_run_inputs, tmp_path):
    """A run stopped after epoch 1 and resumed to epoch 2 ends like an uninterrupted 2-epoch run, with a
    constant learning rate: a decaying one (the cosine default) follows the run's length, so a 1-epoch
    run has decayed by its end where the first epoch of a 2-epoch run has not."""
    model_dir, csv = tiny_run_inputs
    common = [
        *_tiny_argv(model_dir, csv),
        *["--validation-size", "0", "--no-benchmark", "--warmup-steps", "4", "--lr-scheduler", "constant"],
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*common, "--output-dir", str(straight), "--epochs", "2"]) == 0
    assert main([*common, "--output-dir", str(resumed), "--epochs", "1"]) == 0
    assert main([*common, "--output-dir", str(resumed), "--epochs", "2", "--resume"]) == 0
    _assert_same_gates(straight, resumed)


def test_a_cosine_run_stopped_after_a_checkpoint_resumes_exactly(tiny_run_inputs, tmp_path, monkeypatch):
    """The default (cosine) schedule: a run killed right after its epoch-1 checkpoint and resumed with the
    same options ends like the run uninterrupted (the Trainer restores the schedule's step)."""
    from transformers import TrainerCallback

    from finegates.workflows.run_folder import complete_checkpoint

    workflow = sys.modules["finegates.workflows.finetune"]  # the package exports the function by that name

    class Killed(Exception):
        pass

    class KillAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Killed

    train = workflow.train_model
    model_dir, csv = tiny_run_inputs
    common = [*_tiny_argv(model_dir, csv), "--validation-size", "0", "--no-benchmark", "--warmup-steps", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*common, "--output-dir", str(straight), "--epochs", "2"]) == 0

    def killed_after_first_save(trainer, resume=None):
        trainer.add_callback(KillAfterFirstSave())
        return train(trainer, resume)

    monkeypatch.setattr(workflow, "train_model", killed_after_first_save)
    with pytest.raises(Killed):
        main([*common, "--output-dir", str(resumed), "--epochs", "2"])
    monkeypatch.setattr(workflow, "train_model", train)
    # the stopped run left its epoch-1 checkpoint, which --resume continues from (not a fresh run)
    checkpoints = [p.name for p in (tmp_path / "resumed.partial" / "checkpoints").glob("checkpoint-*")]
    assert len(checkpoints) == 1 and complete_checkpoint(tmp_path / "resumed.partial" / "checkpoints")
    assert main([*common, "--output-dir", str(resumed), "--epochs", "2", "--resume"]) == 0
    _assert_same_gates(straight, resumed)


@pytest.mark.parametrize("folder", ["gates", "compressed"])
def test_evaluate_reloads_the_run(tiny_run, tiny_run_inputs, capsys, folder):
    """`finegates evaluate` on the saved gate adapter and on the compacted model gives the run's accuracy."""
    out, _ = tiny_run
    _, csv = tiny_run_inputs
    result = out / f"eval-{folder}.json"
    argv = ["evaluate", "--model", str(out / folder), "--task", str(csv), "--text-column", "sentence"]
    assert main([*argv, *f"--label-column topic --max-length 12 --quiet --output-file {result}".split()]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(result.read_text())["test_accuracy"] == pytest.approx(metrics["accuracy"]["gated"])
    assert "accuracy" in capsys.readouterr().out


def test_evaluate_refuses_a_model_that_is_not_a_trained_classifier(tiny_run_inputs, tmp_path, capsys):
    """A base model (no classification head saved) would be scored with a new, random head."""
    from transformers import AutoModel

    model_dir, csv = tiny_run_inputs
    AutoModel.from_pretrained(model_dir).save_pretrained(tmp_path / "bare")  # a BertModel, no head
    argv = ["evaluate", "--model", str(tmp_path / "bare"), "--task", str(csv), "--text-column", "sentence"]
    assert main([*argv, "--label-column", "topic", "--quiet"]) == 2
    assert "not a trained sequence classifier (its config names BertModel)" in capsys.readouterr().err


def test_a_classifiers_adapter_on_a_causal_base_is_evaluated_as_a_classifier(tmp_path):
    """finetune on a decoder (its score head in the adapter) is scored for accuracy, not perplexity."""
    from safetensors.torch import save_file

    from finegates.workflows.causal_lm import SMOLLM2
    from finegates.workflows.evaluate_lm import is_causal_lm

    (tmp_path / "gates").mkdir()
    save_file({"score.weight": torch.zeros(2, 4)}, str(tmp_path / "gates" / "finegates_adapter.safetensors"))
    assert not is_causal_lm(str(tmp_path / "gates"), SMOLLM2)
    save_file(
        {"model.layers.0.mlp.up_proj.row_gate.theta": torch.zeros(4)},
        str(tmp_path / "gates" / "finegates_adapter.safetensors"),
    )
    assert is_causal_lm(str(tmp_path / "gates"), SMOLLM2)


def test_evaluate_int8_quantized_compacted_model(tiny_run, tiny_run_inputs, tmp_path):
    """--quantize int8 evaluates torch's dynamically quantized copy: a close but not identical loss."""
    out, _ = tiny_run
    _, csv = tiny_run_inputs
    argv = [
        "evaluate",
        "--model",
        str(out / "compressed"),
        "--task",
        str(csv),
        "--text-column",
        "sentence",
        *["--label-column", "topic", "--max-length", "12", "--quiet"],
    ]
    results = {}
    for name, extra in (("float", []), ("int8", ["--quantize", "int8"])):
        assert main([*argv, *extra, "--output-file", str(tmp_path / f"{name}.json")]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["int8"]["quantize"] == "int8" and results["float"]["quantize"] is None
    assert results["int8"]["test_loss"] != results["float"]["test_loss"]
    assert results["int8"]["test_loss"] == pytest.approx(results["float"]["test_loss"], abs=0.05)
    with pytest.raises(ValueError, match="quantize"):
        EvaluateConfig(quantize="int4")


def test_dense_baseline_is_saved_and_reloads(tiny_run_inputs, tmp_path):
    model_dir, csv = tiny_run_inputs
    out = tmp_path / "run"
    argv = [
        *_tiny_argv(model_dir, csv),
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--validation-size",
        "0",
        "--no-benchmark",
        "--dense-baseline",
    ]
    assert main(argv) == 0
    dense = json.loads((out / "metrics.json").read_text())["accuracy"]["dense_baseline"]
    result = tmp_path / "dense.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out / "dense"),
                "--task",
                str(csv),
                "--text-column",
                "sentence",
                *f"--label-column topic --max-length 12 --quiet --output-file {result}".split(),
            ]
        )
        == 0
    )
    assert json.loads(result.read_text())["test_accuracy"] == pytest.approx(dense)


def test_report_to_tensorboard_logs_the_sparsity_curves(tiny_run_inputs, tmp_path, monkeypatch):
    """`--report-to tensorboard` goes to transformers' TensorBoard callback, sparsity scalars included;
    nothing is logged outside the run folder."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "run"
    argv = [
        *_tiny_argv(*tiny_run_inputs),
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--validation-size",
        "0",
        "--no-benchmark",
        "--logging-steps",
        "2",
        "--report-to",
        "tensorboard",
    ]
    assert main(argv) == 0
    (folder,) = {path.parent for path in out.glob("checkpoints/runs/*/events.out.tfevents.*")}
    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/sparsity_removed", "train/sparsity_target", "test/accuracy"} <= scalars
    assert list(cwd.iterdir()) == []


def test_a_finished_run_is_never_overwritten_by_accident(tiny_run, tiny_run_inputs, capsys):
    """A second run into a finished run's folder is refused; a failing --overwrite run leaves it whole."""
    out, _ = tiny_run
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*_tiny_argv(*tiny_run_inputs), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run. Give --overwrite" in err and "Traceback" not in err
    model_dir, _ = tiny_run_inputs
    missing = out.parent / "missing.csv"
    assert main([*_tiny_argv(model_dir, missing), "--output-dir", str(out), "--overwrite"]) == 2
    assert "missing.csv" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


@pytest.mark.parametrize(
    "text, words",
    [
        ('resume: "no"\n', ["run.yaml: resume must be true or false, got 'no' (str)"]),
        ("target_sparsity: abc\n", ["run.yaml: target_sparsity must be a number, got 'abc'"]),
        ("epochs: [1, 2]\n", ["run.yaml: epochs must be a number"]),
        ("target_modules: [1, 2]\n", ["run.yaml: target_modules must be a list of a string"]),
        ("epochs: 3\n  bad: [\n", ["run.yaml is not valid YAML", "line 2"]),
        ("epochs: .inf\n", ["epochs must be a finite number > 0, got inf"]),
    ],
)
def test_config_file_values_are_typed(tmp_path, capsys, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["finetune", "--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words) and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_bad_json_config_names_the_file(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text('{"epochs": 3,}')
    assert main(["finetune", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"Config file {path} is not valid JSON" in err and "line 1" in err


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_epochs_must_be_finite(tmp_path, capsys, value):
    assert main(["finetune", "--epochs", value, "--output-dir", str(tmp_path / "out")]) == 2
    assert "epochs must be a finite number > 0" in capsys.readouterr().err


def test_an_output_dir_that_is_a_file_is_refused(tiny_run_inputs, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main([*_tiny_argv(*tiny_run_inputs), "--output-dir", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err


def test_python_dash_m_runs_the_command_line():
    """`python -m finegates` is the `finegates` command."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "finegates", "posttrain", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--target-sparsity" in out.stdout
