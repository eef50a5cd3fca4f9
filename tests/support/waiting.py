"""Waiting for a condition, with a reason when it never holds."""

from __future__ import annotations

import time


def wait_for(check, timeout_s: float, why: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(why)
