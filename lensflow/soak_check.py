"""The soak's checker: a pure function of the history a soak recorded (``History``).

What it holds every run to (issue 23):

- every acknowledged valid upload has a prediction; with an archive, exactly one
  archived prediction. An upload whose image event was delivered twice, or whose
  notification was sent twice, within the at-least-once window is predicted twice on the
  topic: counted as a duplicate by what explains it, a fault that can redeliver
  (``REDELIVERING``) or what the logs show (the dispatcher's group session lost, a
  notification produced again, a replica's produce unanswered), started between the
  upload and its last prediction; unexplained ones break an invariant. The archive must
  keep one of them: an upload with two archived predictions breaks an invariant;
- every acknowledged hostile upload is dead-lettered with its reason (the status its
  kind must get, ``HOSTILE_STATUS``) and never predicted; an upload to an unknown bucket
  is refused by the store and never arrives anywhere;
- no prediction names a version that was not serving then: the version the pointer
  named from its ``flipped_at`` until the next flip, plus the staleness a replica is
  allowed (``LENSFLOW_POINTER_TTL_S``), the request's own time, the swap (download,
  verify, load, warm: ``SWAP_SLACK_S``) and any freeze of the store or the replica
  meanwhile;
- the pointer history has no gap (sequence 1..n, each flip starting where the last
  ended, the last one where the pointer is);
- no process is left behind, and every fault did what it should (a server restarted).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

VALID = "valid"
UNKNOWN_BUCKET = "unknown-bucket"
# What a replica must answer for each hostile kind (the dead letter's knativeerrorcode).
HOSTILE_STATUS = {
    "corrupt": {415, 422},
    "oversized": {413},
    "bomb": {413},
}
HOSTILE = (*HOSTILE_STATUS, UNKNOWN_BUCKET)
# Faults that may make an event be delivered twice: the dispatcher dies (or is cut off
# from the broker) after a prediction was produced but before its offset was committed,
# or a replica dies after producing but before answering (the dispatcher retries). An S3
# freeze stalls the broker too (Tansu's log is in that S3): the dispatcher's consumer
# loses its group session (6 s), and what it had not committed is delivered again
# (found by the CI soak, seed 10934).
# A loss of the group session the soak did not cause (``SESSION_LOST``, read from the
# dispatcher's log) redelivers the same way (seed 4242: the broker's coordinator did
# not answer for 6 s with no fault under way).
SESSION_LOST = "session-lost"
# A produce of the S3 notifier left unanswered (``NOTIFY_RETRY``, read from the S3
# server's log: the broker stalled under a burst, seed 5151) sends the event again, as
# MinIO's queue_dir does: the same upload arrives twice, as two image events.
NOTIFY_RETRY = "notify-retry"
# A replica's produce left unanswered (``PRODUCE_TIMEOUT``, read from its log: the broker
# stalled, seed 5151 again): it answers 503 and the dispatcher delivers the event again,
# while the broker may have stored the first prediction after all.
PRODUCE_TIMEOUT = "produce-timeout"
REDELIVERING = {
    *("kill-dispatcher", "kill-replica", "broker-restart", "stop-dispatcher", "s3-freeze"),
    *(SESSION_LOST, NOTIFY_RETRY, PRODUCE_TIMEOUT),
}
# Faults during which a replica cannot read the pointer (it serves what it has).
STALLING = {"s3-freeze", "stop-replica", "stop-dispatcher"}
SWAP_SLACK_S = 3.0  # pointer seen -> new version serving: download, verify, load, warm
CLOCK_SLACK_S = 0.05


@dataclass
class Upload:
    key: str  # <bucket>/<key>
    kind: str  # VALID or one of HOSTILE
    sent_at: float  # Unix seconds
    outcome: str  # "acked", "rejected" (the store refused it), "failed" (not acknowledged)
    error: str = ""


@dataclass
class Predicted:
    key: str
    version: str | None
    at: float  # the prediction event's time, Unix seconds
    request_s: float = 0.0  # fetch + decode + invoke, as the replica measured it
    id: str = ""
    source: str = ""  # the image event's id (data.source_event_id)


@dataclass
class DeadLettered:
    key: str
    code: int | None
    reason: str
    at: float | None = None


@dataclass
class FaultRun:
    name: str
    started: float  # Unix seconds
    ended: float
    note: str = ""
    error: str = ""


@dataclass
class History:
    uploads: list[Upload]
    predictions: list[Predicted]
    dead_letters: list[DeadLettered]
    pointer_history: list[dict[str, Any]]
    pointer_now: str | None
    faults: list[FaultRun] = field(default_factory=list)
    left_behind: list[int] = field(default_factory=list)
    pointer_ttl_s: float = 1.0
    archive: list[Predicted] | None = None  # None: no archive to check against
    archive_error: str = ""  # why the archive could not be drained or read
    left_in_broker: int | None = None  # images-topic records the dispatcher never finished


@dataclass
class Report:
    sent: int = 0  # acknowledged uploads, valid and hostile
    rejected: int = 0  # refused by the store (unknown bucket)
    unacknowledged: int = 0  # the upload failed (store frozen, broker away): not sent
    sent_by_kind: dict[str, int] = field(default_factory=dict)  # acknowledged, by kind
    predicted: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    duplicates_why: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_keys: list[str] = field(default_factory=list)
    left_in_broker: int | None = None  # of the lost: still in the log, never dispatched
    archived: int | None = None  # rows in the archive (prediction events)
    archive_duplicates: int = 0  # extra rows of one upload: each breaks an invariant
    invariants_broken: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not self.invariants_broken

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def iso_seconds(text: str) -> float:
    """Unix seconds of an ISO 8601 time (``Z`` or an offset)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def check(history: History) -> Report:
    report = Report(left_in_broker=history.left_in_broker)
    _count_uploads(history, report)
    _check_outcomes(history, report)
    _check_duplicates(history, report)
    if history.archive is not None:
        _check_archive(history, report)
    _check_versions(history, report)
    _check_pointer_history(history, report)
    for f in history.faults:
        if f.error:
            report.invariants_broken.append(f"fault {f.name} did not complete: {f.error}")
    if history.left_behind:
        pids = ", ".join(map(str, sorted(history.left_behind)))
        report.invariants_broken.append(f"processes left behind: {pids}")
    return report


def _count_uploads(history: History, report: Report) -> None:
    outcomes = Counter(u.outcome for u in history.uploads)
    report.sent = outcomes["acked"]
    report.rejected = outcomes["rejected"]
    report.unacknowledged = outcomes["failed"]
    report.sent_by_kind = dict(Counter(u.kind for u in history.uploads if u.outcome == "acked"))
    for u in history.uploads:
        if u.kind == UNKNOWN_BUCKET and u.outcome == "acked":
            report.invariants_broken.append(f"{u.key}: the store took an unknown bucket")
        if u.outcome == "rejected" and u.kind != UNKNOWN_BUCKET:
            report.invariants_broken.append(f"{u.key}: {u.kind} upload refused ({u.error})")


def _check_outcomes(history: History, report: Report) -> None:
    predicted = {p.key for p in history.predictions}
    dead: dict[str, list[DeadLettered]] = defaultdict(list)
    for d in history.dead_letters:
        dead[d.key].append(d)
    for u in history.uploads:
        if u.outcome != "acked":
            if u.key in predicted or u.key in dead:
                if u.kind == UNKNOWN_BUCKET:
                    report.invariants_broken.append(f"{u.key}: refused upload arrived anyway")
            continue
        if u.key in predicted:
            report.predicted += 1
            if u.kind != VALID:
                report.invariants_broken.append(f"{u.key}: {u.kind} upload was predicted")
        elif u.key in dead:
            report.dead_lettered += 1
            _check_dead_letter(u, dead[u.key], report)
        else:
            report.lost += 1
            report.lost_keys.append(u.key)


def _check_dead_letter(upload: Upload, letters: list[DeadLettered], report: Report) -> None:
    codes = ", ".join(f"{d.code} ({d.reason})" for d in letters)
    if upload.kind == VALID:
        report.invariants_broken.append(f"{upload.key}: valid upload dead-lettered: {codes}")
        return
    wanted = HOSTILE_STATUS.get(upload.kind, set())
    if not any(d.code in wanted and d.reason for d in letters):
        report.invariants_broken.append(
            f"{upload.key}: {upload.kind} upload dead-lettered as {codes}, "
            f"not with status {'/'.join(map(str, sorted(wanted)))} and its reason"
        )


def _check_duplicates(history: History, report: Report) -> None:
    report.duplicates_why = _explain_extra(history, history.predictions, "predictions", report)
    report.duplicates = sum(report.duplicates_why.values())


def _explain_extra(
    history: History, predictions: list[Predicted], where: str, report: Report
) -> dict[str, int]:
    """Extra predictions of one upload, by the fault that redelivered within the upload's
    window ("unexplained", and an invariant broken, when none did)."""
    sent = {u.key: u for u in history.uploads if u.outcome == "acked"}
    of: dict[str, list[Predicted]] = defaultdict(list)
    for p in predictions:
        of[p.key].append(p)
    why_count: Counter[str] = Counter()
    for key, found in of.items():
        if len(found) < 2 or key not in sent:
            continue
        start, end = sent[key].sent_at - 1.0, max(p.at for p in found) + 1.0
        why = [  # a fault whose time overlaps the upload's, from upload to last prediction
            f.name
            for f in history.faults
            if f.name in REDELIVERING and f.started <= end and f.ended >= start
        ]
        why_count[why[0] if why else "unexplained"] += len(found) - 1
        if not why:
            report.invariants_broken.append(
                f"{key}: {len(found)} {where} with no fault that redelivers in between "
                f"(sent {sent[key].sent_at:.1f}, at {', '.join(f'{p.at:.1f}' for p in found)}; "
                f"image events {', '.join(sorted({p.source or '?' for p in found}))})"
            )
    return dict(why_count)


def _check_archive(history: History, report: Report) -> None:
    """One archived prediction per acknowledged valid upload, no event archived twice,
    nothing hostile; a valid upload missing from the archive is lost."""
    if history.archive_error:
        report.invariants_broken.append(f"archive: {history.archive_error}")
    rows = history.archive or []
    report.archived = len(rows)
    for event_id, n in Counter(p.id for p in rows).items():
        if n > 1:
            report.invariants_broken.append(f"archive: prediction event {event_id} {n} times")
    archived = Counter(p.key for p in {p.id: p for p in rows}.values())
    for key, n in archived.items():
        if n > 1:
            report.archive_duplicates += n - 1
            report.invariants_broken.append(f"{key}: {n} archived predictions, not exactly one")
    for u in history.uploads:
        if u.outcome != "acked":
            continue
        if u.kind != VALID and archived[u.key]:
            report.invariants_broken.append(f"{u.key}: {u.kind} upload was archived")
        elif u.kind == VALID and not archived[u.key]:
            report.invariants_broken.append(f"{u.key}: 0 archived predictions, not exactly one")
            if u.key not in report.lost_keys:
                report.lost += 1
                report.lost_keys.append(u.key)


def serving_intervals(history: History) -> dict[str, list[tuple[float, float]]]:
    """version -> [(from, until)] the pointer named it (until: the next flip, or now)."""
    flips = sorted(
        (iso_seconds(r["flipped_at"]), str(r["version"])) for r in history.pointer_history
    )
    intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for i, (at, version) in enumerate(flips):
        until = flips[i + 1][0] if i + 1 < len(flips) else float("inf")
        intervals[version].append((at, until))
    return intervals


def _stalled(history: History, start: float, end: float) -> float:
    """Seconds of faults that keep a replica from reading the pointer within [start, end]."""
    return sum(
        f.ended - f.started
        for f in history.faults
        if f.name in STALLING and f.started <= end and f.ended >= start
    )


def _check_versions(history: History, report: Report) -> None:
    intervals = serving_intervals(history)
    for p in history.predictions:
        ok = False
        for start, until in intervals.get(p.version or "", []):
            grace = history.pointer_ttl_s + SWAP_SLACK_S + p.request_s
            if start - CLOCK_SLACK_S <= p.at and (
                p.at <= until + grace + _stalled(history, until, p.at)
            ):
                ok = True
                break
        if not ok:
            report.invariants_broken.append(
                f"{p.key}: predicted at {datetime.fromtimestamp(p.at).isoformat()} by "
                f"version {p.version}, which was not serving then"
            )


def _check_pointer_history(history: History, report: Report) -> None:
    records = sorted(history.pointer_history, key=lambda r: int(r.get("sequence", 0)))
    previous = None
    for expected, record in enumerate(records, start=1):
        sequence = int(record.get("sequence", 0))
        if sequence != expected:
            report.invariants_broken.append(
                f"pointer history: flip {expected} is missing (found {sequence})"
            )
            return
        if record.get("from") != previous:
            report.invariants_broken.append(
                f"pointer history: flip {sequence} starts at {record.get('from')}, "
                f"the flip before ended at {previous}"
            )
        previous = record.get("version")
    if previous != history.pointer_now:
        report.invariants_broken.append(
            f"pointer history ends at {previous}, the pointer names {history.pointer_now}"
        )
