"""`lensflow serve predict|train`: run one function exactly as its container does."""

from __future__ import annotations

import argparse
import os
import sys

from lensflow.cli.output import CliError, add_json_flag
from lensflow.process import function_command
from lensflow_core.settings import PREDICT_PORT, TRAIN_PORT

DEFAULT_PORTS = {"predict": PREDICT_PORT, "train": TRAIN_PORT}


def serve(args: argparse.Namespace) -> int:
    port = args.port or DEFAULT_PORTS[args.function]
    try:
        command = function_command(args.function, port, args.host)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
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
