"""`lensflow-train-job`: the training Job's entry point. One event in, one round, an exit code.

On Knative a PingSource (or an operator) sends an event to the JobSink, which starts a Job
and mounts the event at ``/etc/jobsink-event/event`` (``--event`` names another file).
``run_job`` is the one way a round runs: this command, `lensflow train --once` (in
process), the local stack's timer and `lensflow serve train` (both as a child running this
command) all call it.

Exit codes:

- 0: the round ran, or was refused (no holdout, too little new data, too many images for
  the memory, another round holds the lease); the reason is logged and the round's JSON
  report is printed on stdout either way;
- 1: the round failed (store unreachable, a bug): the Job's ``backoffLimit`` retries it;
- 2: no event, or not the expected one: refused with a one-line reason before anything
  touches the store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from lensflow_core.cpus import usable_cpus
from lensflow_core.settings import Config
from lensflow_model_store import LeaseHeldError, ModelStore
from lensflow_train.round import Progress, RoundReport, run_round
from lensflow_train.trigger import EVENT_PATH, Trigger, TriggerError, read_event

log = logging.getLogger("lensflow.train")

EXIT_OK, EXIT_FAILED, EXIT_BAD_EVENT = 0, 1, 2
THREAD_VARIABLES = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def bind_threads() -> int:
    """Size TensorFlow's and OpenMP's thread pools before TensorFlow starts: from the
    variables the Job's manifest sets (limits.cpu), else from the CPUs this process may
    use (``lensflow_core.cpus.usable_cpus``: affinity and cgroup quota)."""
    n = 0
    for name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
        try:
            n = n or int(os.environ.get(name, ""))
        except ValueError:
            pass
    n = n if n > 0 else usable_cpus()
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(n))
    return n  # lensflow_train.model hands these to tf.config.threading on import


def refused(config: Config, reason: str) -> dict[str, Any]:
    """The report of a round that did not start."""
    return RoundReport.begin(config, reason=reason).to_dict()


def run_job(
    config: Config,
    trigger: Trigger,
    *,
    progress: Progress | None = None,
    s3=None,
) -> tuple[int, dict[str, Any]]:
    """One round under the model store's lease: (exit code, report)."""
    bind_threads()
    log.info(
        "round requested: %s%s (event %s)",
        trigger.reason,
        " (force)" if trigger.force else "",
        trigger.id or "-",
    )
    store = ModelStore.from_config(config, s3)
    lease_file = store.lease(config.train_lease_ttl_s)
    try:
        lease = lease_file.acquire()
    except LeaseHeldError as exc:
        log.warning("round refused: %s", exc)
        return EXIT_OK, {**refused(config, str(exc)), "trigger": trigger.to_dict()}
    except Exception as exc:  # any failure to take the lease is a failed Job
        return _failed(config, trigger, "taking the training lease", exc)
    log.info("lease %s taken (%s)", lease_file.key, lease.describe())
    try:
        report = run_round(config, progress=progress, force=trigger.force, s3=s3, store=store)
    except Exception as exc:  # a failed round is a failed Job, whatever broke
        return _failed(config, trigger, "the round", exc)
    finally:
        try:
            lease_file.release(lease)
        except Exception as exc:  # it expires by itself
            log.warning("could not release the lease (it expires at its TTL): %s", exc)
    level = logging.INFO if report.outcome != "skipped" else logging.WARNING
    log.log(level, "round %s %s: %s", report.round_id, report.outcome, report.reason)
    return EXIT_OK, {**report.to_dict(), "trigger": trigger.to_dict(), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (what the Job's memory limit bounds)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _failed(
    config: Config, trigger: Trigger, doing: str, exc: Exception
) -> tuple[int, dict[str, Any]]:
    reason = f"{doing} failed: {type(exc).__name__}: {exc}"
    log.error("%s", reason, exc_info=not _is_store_error(exc))
    report = RoundReport.begin(config, reason=reason, outcome="failed").to_dict()
    report["trigger"] = trigger.to_dict()
    return EXIT_FAILED, report


def _is_store_error(exc: Exception) -> bool:
    from botocore.exceptions import BotoCoreError

    from lensflow_model_store import ModelStoreError

    return isinstance(exc, (ModelStoreError, BotoCoreError))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lensflow-train-job",
        description="Run one training round from a JobSink event and exit (0: ran or refused, 1: failed, 2: bad event).",
    )
    parser.add_argument(
        "--event", default=EVENT_PATH, help=f"the event file (default {EVENT_PATH})"
    )
    args = parser.parse_args(argv)
    try:
        trigger = read_event(args.event)
    except TriggerError as exc:
        print(f"lensflow-train-job: refused: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_EVENT
    try:
        config = Config.from_env()
    except ValueError as exc:
        print(f"lensflow-train-job: bad configuration: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    logging.basicConfig(
        stream=sys.stderr,
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code, report = run_job(config, trigger)
    print(json.dumps(report, sort_keys=True, default=str), flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
