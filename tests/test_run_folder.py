"""Run folders: never two runs in one, never a run half-replaced, a killed run resumable from a complete
checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from finegates.workflows.run_folder import RunFolder, RunFolderError, complete_checkpoint, config_differences


def _finished_run(path, marker="old"):
    with RunFolder.claim(path) as folder:
        (folder.work / "metrics.json").write_text(json.dumps({"run": marker}))
        folder.commit()


def _checkpoint(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    if complete:
        (folder / "trainer_state.json").write_text("{}")
    return folder


def test_a_run_is_built_aside_and_swapped_in(tmp_path):
    out = tmp_path / "run"
    with RunFolder.claim(out) as folder:
        assert folder.work == tmp_path / "run.partial" and not out.exists()
        (folder.work / "metrics.json").write_text("{}")
        assert folder.lock.is_file()
        folder.commit()
    assert (out / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no partial, lock or old folder left


def test_a_finished_run_is_replaced_only_when_asked(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    with pytest.raises(RunFolderError, match="holds a finished run. Give --overwrite"):
        RunFolder.claim(out)
    with RunFolder.claim(out, overwrite=True) as folder:
        (folder.work / "metrics.json").write_text(json.dumps({"run": "new"}))
        assert json.loads((out / "metrics.json").read_text()) == {"run": "old"}  # untouched until the swap
        folder.commit()
    assert json.loads((out / "metrics.json").read_text()) == {"run": "new"}


def test_a_failed_run_leaves_the_previous_one_whole(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    with pytest.raises(OSError, match="disk full"), RunFolder.claim(out, overwrite=True) as folder:
        (folder.work / "metrics.json").write_text("partial")
        raise OSError("disk full")
    assert json.loads((out / "metrics.json").read_text()) == {"run": "old"}
    assert not (tmp_path / "run.partial").exists()  # no checkpoint in it: nothing to resume
    assert not (tmp_path / ".run.lock").exists()


@pytest.mark.parametrize("options", [{}, {"overwrite": True}, {"resume": True}])
def test_a_folder_of_other_files_is_never_taken(tmp_path, options):
    """A run replaces its folder when it ends: a folder of the user's files, or of several runs, is refused
    with or without --overwrite and --resume, and nothing in it is touched."""
    out = tmp_path / "runs"
    (out / "r8").mkdir(parents=True)
    (out / "r8" / "report.md").write_text("an earlier run")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="other files in it and no finegates run"):
        RunFolder.claim(out, **options)
    assert (out / "notes.txt").read_text() == "mine" and (out / "r8" / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no lock or partial left
    empty = tmp_path / "empty"
    empty.mkdir()
    with RunFolder.claim(empty) as folder:  # an empty folder is taken
        folder.commit()


def test_two_runs_cannot_share_a_folder(tmp_path):
    out = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".run.lock").write_text(str(other.pid))
        with pytest.raises(RunFolderError, match=f"Another run \\(process {other.pid}\\) is writing to"):
            RunFolder.claim(out)
    finally:
        other.kill()
        other.wait()
    with RunFolder.claim(out) as folder:  # the lock of a process that is gone is taken over
        assert folder.lock.read_text() == str(os.getpid())


def test_resume_takes_the_newest_complete_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    checkpoints = tmp_path / "run.partial" / "checkpoints"
    _checkpoint(checkpoints, 2)
    _checkpoint(checkpoints, 3, complete=False)  # killed while writing
    with pytest.raises(RunFolderError, match="unfinished run .* Give --resume"):
        RunFolder.claim(out)
    with RunFolder.claim(out, resume=True) as folder:
        assert folder.checkpoint() == str(checkpoints / "checkpoint-2")
    assert "checkpoint-3: it was not written to the end" in caplog.text
    assert complete_checkpoint(tmp_path / "nowhere") is None


def test_resume_refuses_other_options(tmp_path):
    from finegates.config import GatesConfig

    out = tmp_path / "run"
    with RunFolder.claim(out) as folder:
        folder.write_config({"gates": GatesConfig(target_sparsity=0.3)})
        _checkpoint(folder.work / "checkpoints", 1)
        folder.commit()
    with RunFolder.claim(out, resume=True) as folder:  # a finished run: its checkpoints come along
        assert folder.checkpoint() == str(folder.work / "checkpoints" / "checkpoint-1")
        with pytest.raises(RunFolderError, match=r"\(gates.target_sparsity differ\)"):
            folder.write_config({"gates": GatesConfig(target_sparsity=0.5)})
        folder.write_config({"gates": GatesConfig(target_sparsity=0.3)})


def test_config_differences_ignore_what_a_resumed_run_may_change():
    old = {"run": {"epochs": 1, "resume": False, "seed": 0}, "gates": {"target_sparsity": 0.3}}
    new = {"run": {"epochs": 2, "resume": True, "seed": 1}, "gates": {"target_sparsity": 0.3}}
    assert config_differences(old, new) == ["run.seed"]


def test_an_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(RunFolderError, match="is a file, not a folder"):
            RunFolder.claim(path)
