"""`lensflow soak`: the stack on durable servers under load and a seeded fault schedule."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from lensflow.cli.output import CliError, add_json_flag, emit


def register(subparsers) -> None:
    from lensflow.soak import FAULTS

    parser = subparsers.add_parser(
        "soak",
        help="durable servers under load and a seeded random fault schedule, then a check",
    )
    parser.add_argument(
        "--duration", type=float, default=600.0, metavar="S", help="seconds of load (600)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="the schedule's seed (random, and printed)"
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        metavar="A,B,...",
        help=f"which faults to draw from (all): {', '.join(FAULTS)}",
    )
    parser.add_argument(
        "--rate", type=float, default=3.0, metavar="R", help="uploads per second outside bursts"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=240.0,
        metavar="S",
        help="after the load, how long to wait for every acknowledged upload (240)",
    )
    parser.add_argument("--schedule", action="store_true", help="print the schedule and stop")
    add_json_flag(parser)
    parser.set_defaults(func=cmd_soak)


def fault_names(text: str) -> tuple[str, ...]:
    """The comma-separated fault names of ``--faults``; CliError naming an unknown one."""
    from lensflow.soak import FAULTS

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in FAULTS]
    if unknown or not names:
        raise CliError(
            f"unknown fault {', '.join(unknown) or '(none given)'}; known: {', '.join(FAULTS)}"
        )
    return names


def options_from(args: argparse.Namespace):
    from lensflow.soak import SoakOptions

    if not args.duration > 0:
        raise CliError(f"--duration must be a positive number of seconds, not {args.duration:g}")
    if not args.rate > 0:
        raise CliError(f"--rate must be positive, not {args.rate:g}")
    if args.settle < 0:
        raise CliError(f"--settle cannot be negative ({args.settle:g})")
    if args.seed is not None and args.seed < 0:
        raise CliError(f"--seed cannot be negative ({args.seed})")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    return SoakOptions(
        seed=seed,
        duration_s=args.duration,
        faults=fault_names(args.faults),
        rate=args.rate,
        settle_s=args.settle,
    )


def cmd_soak(args: argparse.Namespace) -> int:
    from lensflow.soak import Soak, SoakStartError, plan

    options = options_from(args)

    def say(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    schedule = plan(options.seed, options.duration_s, options.faults)
    say(f"soak: seed {options.seed}, {options.duration_s:g} s, {len(schedule.faults)} faults")
    for line in schedule.lines():
        say(f"  {line}")
    if args.schedule:
        return 0
    soak = Soak(options, say)
    say(f"logs in {soak.log_dir} (removed if every invariant holds)")
    try:
        with client_logs_to(soak.log_dir / "kafka-clients.log"):
            result = soak.run()
    except SoakStartError as exc:
        raise CliError(f"soak: {exc}") from None
    if result.report.ok:  # the logs of a passing run tell nothing; a failing run's are kept
        shutil.rmtree(soak.log_dir, ignore_errors=True)
        result.log_dir = ""
    emit(args, result.as_dict(), summary(result))
    return 0 if result.report.ok else 1


@contextlib.contextmanager
def client_logs_to(path: Path) -> Iterator[None]:
    """librdkafka writes its own logs to file descriptor 2 (every broker restart makes
    hundreds of lines): send them to ``path``, and keep Python's stderr where it was."""
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    previous, sys.stderr = sys.stderr, open(saved, "w", buffering=1)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        sys.stderr.close()
        sys.stderr = previous


def summary(result) -> str:
    r = result.report
    why = ", ".join(f"{name} {n}" for name, n in r.duplicates_why.items())
    failed = [f for f in result.faults if f.error]
    lines = [
        f"seed {result.schedule.seed}, {result.schedule.duration_s:g} s of load, "
        f"{len(result.faults)} faults ({len(failed)} failed), {result.seconds:.0f} s in all",
        f"sent {r.sent}  predicted {r.predicted}  dead-lettered {r.dead_lettered}  "
        f"duplicates {r.duplicates}{f' ({why})' if why else ''}  lost {r.lost}",
        f"refused by the store {r.rejected} (unknown bucket), not acknowledged {r.unacknowledged}",
        f"archived {r.archived} predictions, second predictions of an upload in the "
        f"archive {r.archive_duplicates} (the archiver leaves them out)",
    ]
    if r.lost and r.left_in_broker:
        lines.append(
            f"of the lost, {r.left_in_broker} are still in the broker, never dispatched "
            "(the dispatcher's consumer group made no progress)"
        )
    if r.lost_keys:
        lines.append(
            f"lost: {', '.join(r.lost_keys[:10])}{' ...' if len(r.lost_keys) > 10 else ''}"
        )
    lines += [f"BROKEN: {text}" for text in r.invariants_broken[:50]]
    lines.append("every invariant held" if r.ok else "FAILED (logs: " + result.log_dir + ")")
    return "\n".join(lines)
