"""The linter is part of the test command: ruff (configured in pyproject.toml) finds nothing in the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_ruff_finds_nothing():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "ruff", "check", str(root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
