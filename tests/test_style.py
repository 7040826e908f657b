"""Tooling enforces the boring parts: the tree is ruff-clean (lint and format, configured in pyproject.toml)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ruff():
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (it is in the 'test' extra)")
    return exe


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(ruff, args):
    result = subprocess.run([ruff, *args, "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
