"""`lensflow archive` (the archiver; `compact`) and `lensflow predictions query|report`."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from lensflow.cli.config import load_config
from lensflow.cli.output import CliError, add_json_flag, emit


def register(subparsers) -> None:
    archive = subparsers.add_parser(
        "archive", help="archive the predictions topic as Parquet in the object store"
    )
    archive.add_argument(
        "action",
        nargs="?",
        choices=("run", "compact"),
        default="run",
        help="run: archive (default); compact: merge the small files of committed ranges",
    )
    mode = archive.add_mutually_exclusive_group()
    mode.add_argument(
        "--once", action="store_true", help="drain from the committed offsets, exit (default)"
    )
    mode.add_argument("--follow", action="store_true", help="keep archiving until stopped")
    archive.add_argument(
        "--day",
        action="append",
        metavar="YYYY-MM-DD",
        help="compact: this date (repeatable; default every date)",
    )
    add_json_flag(archive)
    archive.set_defaults(func=cmd_archive)


def register_predictions(predictions_sub) -> None:
    """``query`` and ``report`` under ``lensflow predictions``."""
    from lensflow_archive.query import REPORTS

    query = predictions_sub.add_parser(
        "query", help="SQL (DuckDB) over the archive's predictions view"
    )
    query.add_argument(
        "sql", metavar="SQL", help='one read-only query, e.g. "select count(*) from predictions"'
    )
    _output_flags(query)
    query.set_defaults(func=cmd_query)
    report = predictions_sub.add_parser("report", help="a named question of the archive, no SQL")
    report.add_argument(
        "name", choices=sorted(REPORTS), help="; ".join(f"{k}: {v[0]}" for k, v in REPORTS.items())
    )
    report.add_argument(
        "--sql", action="store_true", help="print the question's SQL, do not run it"
    )
    _output_flags(report)
    report.set_defaults(func=cmd_report)


def _output_flags(parser: argparse.ArgumentParser) -> None:
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--csv", action="store_true", help="CSV with a header row")
    form.add_argument("--json", action="store_true", help="a JSON list of objects")


def cmd_archive(args: argparse.Namespace) -> int:
    from lensflow_archive.job import run_archive, stop_on_signals

    config = load_config()
    if args.action == "compact":
        return _compact(args, config)
    code, report = run_archive(config, follow=args.follow, stop=stop_on_signals())
    if code != 0:
        raise CliError(report.get("error", "the archiver failed"))
    emit(
        args,
        report,
        f"archived {report['archived']}, set aside {report['rejected']}, "
        f"{report['files']} files in s3://{report['bucket']}/predictions/",
    )
    return 0


def _compact(args: argparse.Namespace, config) -> int:
    from lensflow_archive.compact import compact_day
    from lensflow_archive.store import ArchiveStore, ArchiveUnwritable
    from lensflow_core.s3 import s3_client
    from lensflow_eventing.offsets import committed_offsets

    store = ArchiveStore(s3_client(config), config.archive_bucket)
    committed = committed_offsets(config.kafka, config.topic_predictions, config.archive_group)
    try:
        days = args.day or store.days()
        done = [compact_day(store, day, config.topic_predictions, committed) for day in days]
    except ArchiveUnwritable as exc:
        raise CliError(str(exc)) from None
    emit(
        args,
        done,
        "\n".join(f"{d['day']}: merged {d['merged']} files" for d in done) or "nothing to compact",
    )
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from lensflow_archive.query import QueryError, query

    try:
        result = query(load_config(), args.sql)
    except QueryError as exc:
        raise CliError(str(exc)) from None
    _print(args, result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lensflow_archive.query import QueryError, report, report_sql

    config = load_config()
    if args.sql:
        print(report_sql(args.name, config))
        return 0
    try:
        result = report(config, args.name)
    except QueryError as exc:
        raise CliError(str(exc)) from None
    _print(args, result)
    return 0


def _print(args: argparse.Namespace, result) -> None:
    if args.json:
        print(json.dumps(result.records(), indent=2, default=str))
    elif args.csv:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
        sys.stdout.write(out.getvalue())
    else:
        print(table_text(result.columns, result.rows))


def table_text(columns: list[str], rows: list[tuple]) -> str:
    """Columns aligned for a terminal, and a count."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(lines)
