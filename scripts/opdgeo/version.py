"""The pipeline's version: the package's, and the git commit when it runs from a checkout."""

import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def package_version() -> str:
    try:
        return version("opdgeo")
    except PackageNotFoundError:  # imported from scripts/ without being installed
        return "unknown"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(PACKAGE), *args], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


@cache
def commit() -> str | None:
    """HEAD of the checkout this package is imported from, `+dirty` when tracked files differ
    from it; None when the package is not imported from a git checkout."""
    try:
        top = Path(_git("rev-parse", "--show-toplevel"))
        if top / "scripts" / "opdgeo" != PACKAGE:  # a checkout that merely holds the venv
            return None
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return _git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def describe() -> str:
    """`0.1.0 (commit 1a2b...)`, or the package version alone outside a checkout."""
    head = commit()
    return f"{package_version()} (commit {head})" if head else package_version()
