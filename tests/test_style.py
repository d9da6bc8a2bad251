"""The codebase stays ruff-clean (pyproject's rules)."""

import subprocess
import sys

from tests.support.paths import REPO


def test_ruff_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
