"""The `lensflow` command: one module per group of verbs, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import logging
import sys

from lensflow.cli import (
    archive,
    dashboard,
    dlq,
    eventing,
    functions,
    label,
    models,
    soak,
    stack,
    train,
)
from lensflow.cli.output import CliError, fail
from lensflow_core.kafka import KafkaSetupError

# Modules that add verbs. Each exposes ``register(subparsers)`` and sets ``func`` on its
# parsers; ``func(args) -> int`` returns the exit code.
VERB_MODULES = (models, functions, eventing, dlq, train, label, stack, dashboard, archive, soak)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lensflow", description="Drone photos in, predictions out, on a live-swapped model."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for module in VERB_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        return fail(args, str(exc), exc.code)
    except KafkaSetupError as exc:  # its message names the LENSFLOW_KAFKA_* setting to fix
        return fail(args, str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
