"""`lensflow-archive-job` and `lensflow archive`: the archiver's one entry point.

On Knative a PingSource sends an event to the JobSink, which starts a Job running this
command: it drains the predictions topic from the group's committed offsets, compacts the
closed dates it wrote to, prints its report (JSON) and exits. Locally, `lensflow up` and
`lensflow demo` run ``lensflow archive --follow`` (this module, following) as a child.

Exit codes: 0 archived (or nothing to do); 1 the archive bucket cannot be written or
Kafka failed: nothing was committed, so the next run archives the same records.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any

from confluent_kafka import KafkaException

from lensflow_archive.archiver import Archiver
from lensflow_archive.store import ArchiveUnwritable
from lensflow_core.kafka import KafkaSetupError
from lensflow_core.settings import Config

log = logging.getLogger("lensflow.archive")

EXIT_OK, EXIT_FAILED = 0, 1


def run_archive(
    config: Config, *, follow: bool = False, stop: threading.Event | None = None
) -> tuple[int, dict[str, Any]]:
    """Archive (drain, or follow until ``stop``), then compact: (exit code, report)."""
    archiver = Archiver(config)
    try:
        report = archiver.run(follow=follow, stop=stop)
    except (ArchiveUnwritable, KafkaException, KafkaSetupError) as exc:
        reason = " ".join(str(exc).split())
        log.error("archiver stopped, nothing more committed: %s", reason)
        return EXIT_FAILED, {**archiver.report(), "error": reason}
    try:
        report["compacted"] = archiver.compact()
    except (ArchiveUnwritable, KafkaException) as exc:
        return EXIT_FAILED, {**report, "error": " ".join(str(exc).split())}
    return EXIT_OK, report


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM/SIGINT: the archiver writes what it holds, commits, exits."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lensflow-archive-job", description="archive the predictions topic and exit"
    )
    parser.add_argument("--follow", action="store_true", help="keep archiving until stopped")
    parser.add_argument("--event", help="the JobSink's event (read only to log its id)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = Config.from_env()
    except ValueError as exc:
        print(json.dumps({"error": str(exc)}))
        return EXIT_FAILED
    code, report = run_archive(config, follow=args.follow, stop=stop_on_signals())
    print(json.dumps(report, sort_keys=True), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
