# SPDX-License-Identifier: Apache-2.0
"""The tree follows the `[tool.ruff]` settings in pyproject.toml (line length 119, as transformers): lint and format."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ruff"] if not shutil.which("ruff") else ["ruff"]
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"])
def test_ruff(args):
    result = _ruff(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
