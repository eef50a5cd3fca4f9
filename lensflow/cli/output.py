"""How every verb speaks: plain text for people, `--json` for machines, one line on error."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


class CliError(Exception):
    """A reason to stop with a non-zero exit code and one line of explanation."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def add_json_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def emit(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    """Print ``data`` as JSON with --json, else ``text`` (or a plain rendering of data)."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif text is not None:
        print(text)
    else:
        print(json.dumps(data, indent=2, default=str))


def fail(args: argparse.Namespace, reason: str, code: int = 1) -> int:
    reason = " ".join(reason.split())  # one line
    if getattr(args, "json", False):
        print(json.dumps({"error": reason}))
    print(f"lensflow: error: {reason}", file=sys.stderr)
    return code
