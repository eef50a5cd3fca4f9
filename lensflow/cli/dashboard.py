"""`lensflow dashboard`: the live web page on its own (``up`` and ``demo`` start it too)."""

from __future__ import annotations

import argparse
import sys

from lensflow.cli.config import load_config
from lensflow.cli.output import CliError, add_json_flag, emit
from lensflow.process import free_port, port_open

DEFAULT_PORT = 8090


def register(subparsers) -> None:
    parser = subparsers.add_parser("dashboard", help="the live web page (also started by up, demo)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address (127.0.0.1: this machine only)"
    )
    add_json_flag(parser)
    parser.set_defaults(func=cmd_dashboard)


def start_dashboard(config, stack=None, port: int | None = DEFAULT_PORT, host: str = "127.0.0.1"):
    """A running ``DashboardServer``; another port if ``port`` is taken (``up``, ``demo``)."""
    from lensflow.dashboard import DashboardServer
    from lensflow_eventing.dispatcher_metrics import dispatcher_registry

    if port is None or port_open(host, port):
        port = free_port()
    registry = None
    if stack is not None:
        registry = dispatcher_registry(
            lambda: stack.dispatcher.stats() if stack.dispatcher else None, config.topic_images
        )
    return DashboardServer(config, stack, host=host, port=port, metrics_registry=registry).start()


def cmd_dashboard(args: argparse.Namespace) -> int:
    import uvicorn

    from lensflow.dashboard import DashboardState, make_app

    config = load_config()
    if port_open(args.host, args.port):
        raise CliError(f"port {args.port} is in use: pick another with --port")
    state = DashboardState(config).start()
    url = f"http://{args.host}:{args.port}/"
    emit(
        args,
        {"url": url, "flips": bool(config.dashboard_token)},
        f"dashboard on {url} (Ctrl-C stops)",
    )
    sys.stdout.flush()
    try:
        uvicorn.run(
            make_app(state),
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=1,
            lifespan="off",
        )
    finally:
        state.stop()
    return 0
