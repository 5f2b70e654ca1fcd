"""A run's output folder: one run at a time, never a mix of two runs, written whole or not at all.

A run writes into `RUN.partial` (its checkpoints too) and swaps it in as `RUN` when it finishes; a folder that
holds a run is replaced only with `overwrite`, a killed run's `RUN.partial` is continued with `resume`, and a
lock file beside the folder keeps two runs from sharing it.

>>> with RunFolder.claim("runs/minilm", overwrite=True) as folder:  # doctest: +SKIP
...     train_into(folder.work)
...     folder.commit()
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from finegates.io_utils import write_folder
from finegates.workflows.run_config import RUN_CONFIG_NAME as RUN_CONFIG
from finegates.workflows.run_config import run_config_payload, write_run_config

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
TRAINER_STATE = "trainer_state.json"
# Entries any finegates run writes: a folder holding one of them holds a run.
RUN_MARKERS = (RUN_CONFIG, "metrics.json", "report.md", "gates", "compressed", "checkpoints")
# Options that may change between a run and its resumption (a longer run may continue a shorter one).
RESUMABLE_KEYS = frozenset(
    {
        "resume",
        "overwrite",
        "quiet",
        "report_to",
        "output_dir",
        "threads",
        "epochs",
        "max_steps",
        "save_steps",
    }
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class RunFolderOptions:
    """What a run may do with an output folder that already holds a run."""

    overwrite: bool = field(default=False, metadata={"help": "Replace the run already in output_dir."})
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue the run in output_dir from its newest complete checkpoint (refused when its "
            "options differ from this run's)."
        },
    )


def trainer_loggers(report_to: list[str] | str | None) -> list[str]:
    """`report_to` as the list of Trainer loggers: `--report-to none` and configs written when it was a
    string ("none", "tensorboard") read as lists.

    >>> [trainer_loggers(value) for value in (None, "none", "tensorboard", ["wandb"])]
    [[], [], ['tensorboard'], ['wandb']]
    """
    if report_to is None:
        return []
    if isinstance(report_to, str):
        return [] if report_to.lower() in ("none", "") else [report_to]
    return list(report_to)


class RunFolderError(ValueError):
    """The output folder cannot take this run (the message says why and what to do)."""


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or a single process: the one that owns the run folder."""
    return int(os.environ.get("RANK", "0")) == 0


def _holds_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def _refuse_foreign(path: Path) -> None:
    """A run replaces its folder whole when it ends: refuse a non-empty folder that holds no run (the
    user's own files, or a folder of many runs), whatever the options."""
    if path.is_dir() and not _holds_run(path) and any(path.iterdir()):
        raise RunFolderError(
            f"--output-dir {path} is a folder with other files in it and no finegates run; a run replaces "
            "its output folder when it ends, so give a new or empty folder (e.g. a subfolder of it)."
        )


def _check_path(path: Path) -> None:
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(
                f"--output-dir {path}: {parent} is a file, not a folder. Give a folder path."
            )


def complete_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint-N` in `folder` that the Trainer finished writing (its trainer state is written
    last), or None."""
    if not folder.is_dir():
        return None
    numbered = [
        (int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()
    ]
    for _, path in sorted(numbered, reverse=True):
        if (path / TRAINER_STATE).is_file():
            return path
        logger.warning("Skipping %s: it was not written to the end (no %s)", path, TRAINER_STATE)
    return None


def differing_keys(
    old: dict[str, Any], new: dict[str, Any], ignore: frozenset[str] = frozenset()
) -> list[str]:
    """Keys whose values differ between two option mappings, apart from those in `ignore`."""
    return [k for k in sorted(set(old) | set(new)) if k not in ignore and old.get(k) != new.get(k)]


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys (`section.option`) whose values differ between two run configs, ignoring the options a
    resumed run may change."""
    return [
        f"{section}.{key}"
        for section in sorted(set(old) | set(new))
        for key in differing_keys(old.get(section) or {}, new.get(section) or {}, RESUMABLE_KEYS)
    ]


@dataclass
class RunFolder:
    """The final folder of a run, the folder it writes into meanwhile, and whether this process owns them."""

    final: Path
    work: Path
    resume: bool
    owner: bool

    @property
    def lock(self) -> Path:
        return lock_path(self.final)

    @classmethod
    def claim(cls, path: str | Path, overwrite: bool = False, resume: bool = False) -> RunFolder:
        """Take `path` for a new run (or the continuation of a killed one), or raise RunFolderError saying
        why it cannot be taken. Only the main process of a distributed launch checks and locks."""
        final = Path(path)
        work = final.with_name(final.name + PARTIAL_SUFFIX)
        folder = cls(final, work, resume, owner=is_main_process())
        if not folder.owner:
            return folder
        _check_path(final)
        _check_path(work)
        _acquire(folder.lock, final)
        try:
            folder._prepare(overwrite)
        except BaseException:
            folder.release()
            raise
        return folder

    def _prepare(self, overwrite: bool) -> None:
        _refuse_foreign(self.final)
        if self.resume:
            if not self.work.exists() and (self.final / "checkpoints").is_dir():
                # continuing a finished run: its checkpoints go with it, copied whole or not at all
                checkpoints = self.final / "checkpoints"
                write_folder(self.work, lambda tmp: shutil.copytree(checkpoints, tmp / "checkpoints"))
            self.work.mkdir(parents=True, exist_ok=True)
            return
        if _holds_run(self.final) and not overwrite:
            raise RunFolderError(
                f"{self.final} holds a finished run. Give --overwrite to replace it, --resume to continue "
                "it, or another --output-dir."
            )
        if self.work.exists():
            if not overwrite:
                raise RunFolderError(
                    f"{self.work} holds an unfinished run (stopped before its end). Give --resume to "
                    "continue it, --overwrite to start afresh, or another --output-dir."
                )
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)

    def write_config(self, sections: dict[str, Any]) -> None:
        """Write the run's `run_config.json` into the work folder; with `resume`, first refuse a run whose
        options differ from those its checkpoints were trained with."""
        if not self.owner:
            return
        payload = run_config_payload(sections)
        previous = self.work / RUN_CONFIG
        previous = previous if previous.is_file() else self.final / RUN_CONFIG
        if self.resume and previous.is_file():
            try:
                old = json.loads(previous.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise RunFolderError(
                    f"--resume: {previous} is unreadable ({err}); start afresh with --overwrite."
                ) from None
            differing = config_differences(old, payload)
            if differing:
                raise RunFolderError(
                    f"--resume: the checkpoints in {self.work} were trained with other options "
                    f"({', '.join(differing)} differ). Resume with the options in {previous}, or start "
                    "afresh with --overwrite."
                )
        write_run_config(self.work, sections)

    def checkpoint(self) -> str | None:
        """The checkpoint to resume from (None: start from scratch), said in the log."""
        if not self.resume:
            return None
        found = complete_checkpoint(self.work / "checkpoints")
        if found is None:
            logger.warning(
                "--resume: no complete checkpoint in %s, starting from scratch", self.work / "checkpoints"
            )
            return None
        logger.info("--resume: continuing from %s", found)
        return str(found)

    def commit(self) -> Path:
        """Swap the finished run in as the final folder (the previous run there is removed)."""
        if not self.owner:
            return self.final
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.work, self.final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        self.release()
        return self.final

    def release(self) -> None:
        if self.owner:
            _release(self.lock)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None and self.owner and self.work.exists():
            if complete_checkpoint(self.work / "checkpoints") is None:
                shutil.rmtree(self.work, ignore_errors=True)  # nothing to continue from
            else:
                logger.error(
                    "The run stopped early; its checkpoints are in %s (--resume continues it).", self.work
                )
        self.release()


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def _acquire(lock: Path, folder: Path) -> None:
    """Create `lock` holding this process's id; refuse while another live process holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    # the lock appears with this process's id in it (a hard link of a written file), never empty
    mine = lock.with_name(f"{lock.name}.{os.getpid()}")
    mine.write_text(str(os.getpid()))
    try:
        _link_lock(mine, lock, folder)
    finally:
        mine.unlink(missing_ok=True)


def _link_lock(mine: Path, lock: Path, folder: Path) -> None:
    for _ in range(2):
        try:
            os.link(mine, lock)
        except FileExistsError:
            pid = _lock_pid(lock)
            if pid is not None and pid != os.getpid() and _alive(pid):
                raise RunFolderError(
                    f"Another run (process {pid}) is writing to {folder}; wait for it or give another "
                    "--output-dir."
                ) from None
            lock.unlink(missing_ok=True)  # left by a run that was killed
            continue
        return
    raise RunFolderError(f"Could not lock {folder} ({lock} keeps reappearing).")


@contextlib.contextmanager
def exclusive(folder: str | Path) -> Iterator[Path]:
    """Hold the lock of a folder that a run fills in place (e.g. `compare`'s cache of results)."""
    folder = Path(folder)
    _check_path(folder)
    lock = lock_path(folder)
    if is_main_process():
        _acquire(lock, folder)
    try:
        yield folder
    finally:
        if is_main_process():
            _release(lock)


def _release(lock: Path) -> None:
    """Remove `lock` if this process holds it."""
    if _lock_pid(lock) == os.getpid():
        lock.unlink(missing_ok=True)


def _lock_pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
