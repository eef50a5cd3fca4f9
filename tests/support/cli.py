"""The lensflow command in a child process, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys


def lensflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lensflow", *args],
        env={**os.environ, **env, "LENSFLOW_OPERATOR": "tester"},
        capture_output=True,
        text=True,
        timeout=120,
    )
