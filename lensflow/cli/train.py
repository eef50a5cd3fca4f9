"""`lensflow train`: training rounds from the command line, once or on a timer.

Progress goes to stderr (a rich progress bar when the terminal can show one), the report
to stdout: readable text, or the round's JSON report with ``--json`` (one JSON document
per round; without ``--once`` rounds repeat every ``--interval`` seconds, like a
PingSource, until Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from lensflow.cli.config import load_config
from lensflow.cli.output import CliError, add_json_flag, emit
from lensflow_core.settings import Config

DEFAULT_INTERVAL_S = 300.0


@contextlib.contextmanager
def progress_display(enabled: bool) -> Iterator[Any]:
    """A ``progress(event)`` callback that draws on stderr; a no-op when not wanted."""
    if not enabled:
        yield None
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # rich is a `local` extra: plain lines without it

        def plain(event) -> None:
            print(f"[{event.stage}] {event.message}", file=sys.stderr, flush=True)

        yield plain
        return
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.fields[stage]:>8}"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("starting", total=None, stage="round")

        def draw(event) -> None:
            total = event.total if event.stage == "train" else None
            bar.update(
                task,
                description=event.message,
                stage=event.stage,
                total=total,
                completed=event.done or 0,
            )

        yield draw


def report_text(report: dict[str, Any]) -> str:
    """A person's view of a round report."""
    lines = [f"round {report['round_id']}: {report['reason'] or report['outcome']}"]
    data = report.get("data") or {}
    if data:
        lines.append(
            f"  data: {data.get('labeled_total', 0)} labelled "
            f"({data.get('new_since_champion', 0)} new), {data.get('holdout_total', 0)} holdout "
            f"in s3://{data.get('bucket')}"
        )
    models = []
    if report.get("champion"):
        models.append(("champion", report["champion"].get("version"), report["champion"]))
    if report.get("challenger"):
        models.append(("challenger", report["challenger"].get("version"), report["challenger"]))
    for role, version, entry in models:
        ev = entry.get("evaluation")
        if not ev:
            lines.append(f"  {role} {version}: {entry.get('problem') or 'not evaluated'}")
            continue
        lines.append(
            f"  {role} {version}: accuracy {ev['accuracy']:.3f}, macro-F1 {ev['macro_f1']:.3f} "
            f"on {ev['n']} images"
        )
        for label, m in ev["per_class"].items():
            lines.append(
                f"    {label:<14} precision {m['precision']:.2f}  recall {m['recall']:.2f}  "
                f"f1 {m['f1']:.2f}  ({m['support']})"
            )
    timings = report.get("timings") or {}
    if timings:
        lines.append("  time: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in timings.items()))
    lines.append(f"  pointer: {report.get('pointer') or '(none)'}")
    return "\n".join(lines)


def run_once(
    config: Config, force: bool, show_progress: bool, metrics_file: str | None = None
) -> dict[str, Any]:
    """One round by the training Job's own entry point (``lensflow_train.job.run_job``)."""
    from lensflow_train.job import EXIT_OK, run_job
    from lensflow_train.metrics import write_textfile
    from lensflow_train.trigger import Trigger

    trigger = Trigger("manual", force, type="lensflow train", source="lensflow/cli")
    started = time.perf_counter()
    with progress_display(show_progress) as progress:
        code, report = run_job(config, trigger, progress=progress)
    if metrics_file:
        write_textfile(metrics_file, report, time.perf_counter() - started)
    if code != EXIT_OK:
        raise CliError(f"training round failed: {report['reason']}")
    return report


def train(args: argparse.Namespace) -> int:
    config = load_config()
    show_progress = not args.quiet and sys.stderr.isatty()
    if args.once:
        report = run_once(config, args.force, show_progress, args.metrics_file)
        emit(args, report, report_text(report))
        return 0
    if args.interval <= 0:
        raise CliError("--interval must be positive")
    while True:
        started = time.monotonic()
        report = run_once(config, args.force, show_progress, args.metrics_file)
        if args.json:
            print(json.dumps(report, sort_keys=True, default=str), flush=True)
        else:
            print(report_text(report), flush=True)
        time.sleep(max(0.0, args.interval - (time.monotonic() - started)))


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="training rounds: train, evaluate, promote if better (--once for one)"
    )
    parser.add_argument("--once", action="store_true", help="run one round and exit")
    parser.add_argument(
        "--force", action="store_true", help="train even without enough new labelled images"
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL_S,
        metavar="S",
        help=f"seconds between rounds without --once (default {DEFAULT_INTERVAL_S:.0f})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="write the round's Prometheus metrics here (node-exporter textfile, e.g. *.prom)",
    )
    add_json_flag(parser)
    parser.set_defaults(func=train)
