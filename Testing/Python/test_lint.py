"""Ruff, with Python 3.9 (Slicer 5.8's Python) as the target, over everything we ship."""

import subprocess
import sys

from conftest import REPO_ROOT


def test_ruff_is_clean_for_python_3_9():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--target-version", "py39", "--output-format", "concise", "."],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
