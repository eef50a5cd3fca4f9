"""`lensflow serve predict|train`: run one function exactly as its container does."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from lensflow.cli.output import CliError, add_json_flag
from lensflow.config import PREDICT_PORT, TRAIN_PORT

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"
DEFAULT_PORTS = {"predict": PREDICT_PORT, "train": TRAIN_PORT}


def function_command(name: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The functions-framework command line that serves function ``name``."""
    binary = Path(sys.executable).with_name("functions-framework")
    if not binary.exists():
        found = shutil.which("functions-framework")
        if not found:
            raise CliError("functions-framework is not installed (run `make install`)")
        binary = Path(found)
    source = FUNCTIONS_DIR / name / "main.py"
    return [
        str(binary),
        "--source",
        str(source),
        "--target",
        name,
        "--host",
        host,
        "--port",
        str(port),
    ]


def serve(args: argparse.Namespace) -> int:
    port = args.port or DEFAULT_PORTS[args.function]
    command = function_command(args.function, port, args.host)
    print(f"serving {args.function} on http://{args.host}:{port}", file=sys.stderr, flush=True)
    os.execv(command[0], command)  # the same server a Knative container runs
    return 0  # not reached


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="run one function over HTTP (functions-framework)")
    parser.add_argument("function", choices=sorted(DEFAULT_PORTS))
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--host", default="127.0.0.1")
    add_json_flag(parser)
    parser.set_defaults(func=serve)
