"""``lensflow demo``: the whole story on one laptop in about a minute.

Start the embedded stack, make sure a model is serving (train a first one on synthetic
scenes if the store is empty), fly the simulated drones (with a 10x burst), show a live
table of what happens, and close the learning loop mid-flight: the predict function queues
the photos its model is unsure of (``to-label/``), a scripted labeller labels a batch of the
most uncertain ones with the simulator's ground truth, and a training round learns from
them; batches continue until a round promotes (or ``label_rounds`` run out), so the model
version changes under load and the summary says how many labels that took. Then wait for
the backlog to drain, print a summary, stop everything.

Upload-to-prediction latency is the prediction record's Kafka timestamp (the predict
function's produce time) minus the moment the drone's upload completed (the notification
record's ``eventTime``), both on this machine's clock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from lensflow.demo_labeller import label_queued
from lensflow.figures import percentile, rounded
from lensflow.seeding import seed_training_data
from lensflow.simulate import Burst, Plan, Simulator
from lensflow.stack import EmbeddedStack
from lensflow_core.settings import Config
from lensflow_eventing.predictions import Prediction, PredictionFeed, TopicReader
from lensflow_model_store import ModelStore

# A first model on little data: good enough to serve, with room for the drones' labelled
# photos to improve on in the mid-flight round.
SEED_LABELLED_PER_CLASS = 10
SEED_HOLDOUT_PER_CLASS = 8


@dataclass
class DemoOptions:
    duration_s: float = 60.0
    drones: int = 4
    rate: float = 3.0
    bursts: tuple[Burst, ...] = (Burst(10.0, 20.0, 15.0),)
    labelled_fraction: float = 0.0  # labels come from the queue, not straight from drones
    train_mid_flight: bool = True
    label_batch: int = 24  # photos the scripted labeller labels before each round
    label_rounds: int = 3  # batches (and rounds) at most
    train_at: float = 0.25  # when the mid-flight round starts, as a share of the flight
    drain_timeout_s: float = 90.0
    max_replicas: int = 4
    idle_s: float = 10.0
    seed: int = 0


class PredictionCounts:
    """Counts predictions, versions and upload-to-prediction latency as they arrive (a
    ``PredictionFeed`` from the predictions topic's end at start), and the dead-letter
    topic's growth since then."""

    def __init__(self, config: Config, uploaded_at: dict[str, float]):
        self.config = config
        self.uploaded_at = uploaded_at  # "<bucket>/<key>" -> upload time (epoch seconds)
        self.predictions = 0
        self.subjects: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.latest_version: str | None = None
        self.latencies: list[float] = []
        self.recent: deque[tuple[float, float]] = deque()  # (seen at, latency) of 10 s
        self.per_second: Counter[int] = Counter()  # images predicted, by wall-clock second
        self.dead_lettered = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._lock = threading.Lock()
        self._dlq_start: int | None = None
        self._next_dlq = 0.0
        self._feed = PredictionFeed(
            config.kafka,
            config.topic_predictions,
            self._count,
            from_end=True,
            group="lensflow-demo-watch",
            on_open=self._dlq_mark,
            on_poll=self._dlq_growth,
        )

    def start(self) -> PredictionCounts:
        self._feed.start()
        return self

    def stop(self) -> None:
        self._feed.stop()

    def _dlq_mark(self, reader: TopicReader) -> None:
        if self._dlq_start is None:
            self._dlq_start = reader.high_watermark(self.config.topic_dlq)

    def _dlq_growth(self, reader: TopicReader) -> None:
        if time.monotonic() > self._next_dlq and self._dlq_start is not None:
            high = reader.high_watermark(self.config.topic_dlq, timeout_s=2)
            self.dead_lettered = max(high - self._dlq_start, 0)
            self._next_dlq = time.monotonic() + 1.0

    def _count(self, prediction: Prediction, produced_ms: int) -> None:
        now = time.time()
        with self._lock:
            self.predictions += 1
            self.subjects[prediction.subject] += 1
            if self.subjects[prediction.subject] == 1:
                self.per_second[int(now)] += 1
            if prediction.model_version:
                self.versions[prediction.model_version] += 1
                self.latest_version = prediction.model_version
            self.first_at = self.first_at or now
            self.last_at = now
            uploaded = self.uploaded_at.get(prediction.subject)
            if uploaded is not None and self.subjects[prediction.subject] == 1:
                latency = max(produced_ms / 1000 - uploaded, 0.0)
                self.latencies.append(latency)
                self.recent.append((now, latency))
            while self.recent and self.recent[0][0] < now - 10:
                self.recent.popleft()

    def peak_rate(self, window_s: int = 5) -> float:
        """The most images predicted per second over any ``window_s`` seconds."""
        with self._lock:
            if not self.per_second:
                return 0.0
            first, last = min(self.per_second), max(self.per_second)
            sums = [
                sum(self.per_second[s] for s in range(t, t + window_s))
                for t in range(first, max(first, last - window_s + 1) + 1)
            ]
            return max(sums) / window_s

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            everything = sorted(self.latencies)
            recent = sorted(latency for _, latency in self.recent)
            return {
                "predictions": self.predictions,
                "predicted_images": len(self.subjects),
                "duplicates": self.predictions - len(self.subjects),
                "dead_lettered": self.dead_lettered,
                "model_version": self.latest_version,
                "versions": dict(self.versions),
                "latency_p50_s": rounded(percentile(everything, 50)),
                "latency_p95_s": rounded(percentile(everything, 95)),
                "latency_max_s": rounded(everything[-1] if everything else None),
                "recent_p50_s": rounded(percentile(recent, 50)),
                "recent_p95_s": rounded(percentile(recent, 95)),
            }


@dataclass
class DemoState:
    """What the live table shows; updated by the demo's threads."""

    phase: str = "starting"
    options: DemoOptions = field(default_factory=DemoOptions)
    flight_started: float | None = None
    planned: int = 0
    training: str = "-"
    seeded: dict[str, Any] | None = None
    peak_replicas: int = 0
    peak_lag: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    labels_given: int = 0
    promoted_after_labels: int | None = None


def ensure_model(stack: EmbeddedStack, say: Callable[[str], None]) -> dict[str, Any]:
    """The serving model; trains and promotes a first one if the store has none."""
    store = ModelStore.from_config(stack.config)
    pointer = store.current()
    if pointer is not None:
        return {"version": pointer.version, "seeded": False}

    started = time.monotonic()
    per_class = SEED_LABELLED_PER_CLASS
    for attempt in (1, 2):
        say("no model yet: rendering synthetic training scenes")
        counts = seed_training_data(stack.config, per_class, SEED_HOLDOUT_PER_CLASS)
        say(f"training a first model on {counts['labeled']} scenes ({counts['holdout']} held out)")
        report = stack.train_round("demo: first model", force=True)
        pointer = store.current()
        if pointer is not None:
            break
        if attempt == 2:
            raise RuntimeError(
                f"the first training round did not promote a model: "
                f"{report.get('reason') or report}"
            )
        say(f"not good enough ({report.get('reason')}); again with more scenes")
        per_class *= 3  # same seed: adds scenes to the ones already there
    return {
        "version": pointer.version,
        "seeded": True,
        "data": counts,
        "seconds": round(time.monotonic() - started, 1),
        "reason": report.get("reason"),
    }


def run_demo(
    stack: EmbeddedStack,
    options: DemoOptions,
    *,
    live: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The demo, start to finish, on a running ``stack``; returns the summary."""
    return _run(stack, options, DemoState(options=options), live, say)


def _prepare(
    stack: EmbeddedStack, options: DemoOptions, state: DemoState, say: Callable[[str], None]
) -> tuple[Plan, Simulator]:
    """A model served (seeded when there is none) and the drones' photos rendered."""
    state.phase = "seeding a model"
    state.seeded = ensure_model(stack, say)
    say(
        f"serving model {state.seeded['version']}"
        + (f" (trained in {state.seeded['seconds']} s)" if state.seeded["seeded"] else "")
    )
    plan = Plan(
        drones=options.drones,
        rate=options.rate,
        duration_s=options.duration_s,
        bursts=options.bursts,
        labelled_fraction=options.labelled_fraction,
        seed=options.seed,
    )
    simulator = Simulator(stack.config, plan)
    say(f"rendering {plan.pool_size} drone photos ({plan.size[0]}x{plan.size[1]})")
    simulator.prepare()
    return plan, simulator


def _run(
    stack: EmbeddedStack,
    options: DemoOptions,
    state: DemoState,
    live: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    plan, simulator = _prepare(stack, options, state, say)
    watcher = PredictionCounts(stack.config, simulator.uploaded_at).start()
    stop = threading.Event()
    result: dict[str, Any] = {}

    def fly() -> None:
        result["simulation"] = simulator.run(stop).to_dict()

    def train_mid_flight() -> None:
        # a quarter in: the queue has filled, a round takes 10-20 s on a busy laptop, and
        # the new version should serve a good part of the flight
        if stop.wait(options.duration_s * options.train_at):
            return
        try:
            close_the_loop(stack, options, state, stop)
        except Exception as exc:  # the demo goes on without it
            state.training = f"failed: {exc}"
            state.rounds.append({"outcome": "failed", "reason": str(exc)})

    state.phase = "flying"
    state.planned = len(plan.schedule())
    state.flight_started = time.monotonic()
    flight = threading.Thread(target=fly, name="flight", daemon=True)
    trainer = threading.Thread(target=train_mid_flight, name="mid-flight-training", daemon=True)
    flight.start()
    if options.train_mid_flight:
        trainer.start()
    try:
        _watch(stack, simulator, watcher, state, flight, trainer, live, say)
    except KeyboardInterrupt:
        stop.set()
        flight.join(10)
        state.phase = "interrupted"
        raise
    finally:
        watcher.stop()
    flown = time.monotonic() - state.flight_started
    summary = _summary(stack, watcher, state, result.get("simulation", {}), flown)
    state.phase = "archiving"
    summary["archive"] = archive_summary(stack, watcher.snapshot()["predictions"])
    return summary


ARCHIVE_COUNT = (
    "SELECT count(*) AS rows, count(DISTINCT id) AS ids, count(latency_ms) AS timed, "
    "quantile_cont(latency_ms, 0.5) AS p50_ms FROM predictions"
)


def archive_summary(stack: EmbeddedStack, expected: int, timeout_s: float = 30.0):
    """What the archive holds once it has the ``expected`` predictions (or the time is up:
    the archiver writes at least every ``LENSFLOW_ARCHIVE_FLUSH_S``)."""
    from lensflow_archive.query import QueryError, query

    if stack.archiver is None:
        return None
    started = time.monotonic()
    while True:
        try:
            rows, ids, timed, p50_ms = query(stack.config, ARCHIVE_COUNT).rows[0]
        except QueryError as exc:
            return {"error": str(exc)}
        waited = time.monotonic() - started
        if rows >= expected or waited > timeout_s or not stack.archiver.alive:
            break
        time.sleep(0.5)
    return {
        "rows": rows,
        "distinct_ids": ids,
        "with_upload_latency": timed,  # upload (the notification's eventTime) to prediction
        "upload_latency_p50_ms": round(p50_ms, 1) if p50_ms is not None else None,
        "expected": expected,
        "waited_s": round(waited, 1),
        "archiver_running": stack.archiver.alive,
        "where": f"s3://{stack.config.archive_bucket}/predictions/",
    }


def close_the_loop(
    stack: EmbeddedStack, options: DemoOptions, state: DemoState, stop: threading.Event
) -> None:
    """Label a batch of the most uncertain queued photos, train; again until promoted.

    A batch waits until the queue holds enough photos for a round to start
    (``LENSFLOW_TRAIN_MIN_NEW``), or until 60% of the flight is over."""
    from lensflow_core.s3 import s3_client
    from lensflow_model_store.label_queue import LabelQueue

    s3 = s3_client(stack.config)
    store = ModelStore.from_config(stack.config, s3)
    queue = LabelQueue(s3, stack.config.train_bucket, stack.config.label_queue_max)
    batch = max(options.label_batch, stack.config.train_min_new)
    for _ in range(options.label_rounds):
        deadline = time.monotonic() + max(0.0, 0.6 - options.train_at) * options.duration_s
        while queue.count() < batch and time.monotonic() < deadline:
            state.training = f"waiting for {batch} queued photos ({queue.count()} so far)"
            if stop.wait(2):
                return
        pointer = store.current()
        known = store.get_version(pointer.version).labels if pointer else None
        state.training = "labelling the most uncertain photos"
        got = label_queued(stack.config, s3, batch, known)
        state.labels_given += got["labelled"]
        if not got["labelled"]:
            state.training = "nothing queued to label"
            if stop.wait(5):
                return
            continue
        state.training = f"round on {state.labels_given} new labels"
        report = stack.train_round(f"demo: {state.labels_given} labels from the queue")
        data = report.get("data") or {}
        state.training = f"{report.get('outcome', '?')}: {report.get('pointer') or '-'}"
        state.rounds.append(
            {
                **{k: report.get(k) for k in ("outcome", "reason", "pointer", "timings")},
                "labels_given": state.labels_given,
                "queued": got["queued"],
                "new_since_champion": data.get("new_since_champion"),
            }
        )
        if report.get("outcome") == "promoted":
            state.promoted_after_labels = state.labels_given
            return


def _watch(
    stack: EmbeddedStack,
    simulator: Simulator,
    watcher: PredictionCounts,
    state: DemoState,
    flight: threading.Thread,
    trainer: threading.Thread,
    live: bool,
    say: Callable[[str], None],
) -> None:
    """Refresh the table (or, without a terminal, say a status line every 10 s) until the
    flight is over and the backlog has drained."""
    display = None
    if live:
        from rich.live import Live

        display = Live(
            render_table(stack, simulator, watcher, state), refresh_per_second=4, transient=False
        )
    drain_deadline: float | None = None
    next_line = time.monotonic() + 10
    with display or nullcontext():
        while True:
            _sample(stack, state)
            if display is not None:
                display.update(render_table(stack, simulator, watcher, state))
            elif time.monotonic() > next_line:
                say(status_line(stack, simulator, watcher, state))
                next_line += 10
            if flight.is_alive() or trainer.is_alive():
                time.sleep(0.25)
                continue
            uploaded = simulator.progress.uploaded
            if watcher.snapshot()["predicted_images"] + watcher.dead_lettered >= uploaded:
                break
            if drain_deadline is None:
                state.phase = "draining the backlog"
                drain_deadline = time.monotonic() + state.options.drain_timeout_s
            elif time.monotonic() > drain_deadline:
                state.phase = "gave up waiting for the backlog"
                break
            time.sleep(0.25)
        state.phase = "done"
        if display is not None:
            display.update(render_table(stack, simulator, watcher, state))


def _sample(stack: EmbeddedStack, state: DemoState) -> None:
    stats = stack.stats()
    pool = stats["predict"] or {}
    state.peak_replicas = max(state.peak_replicas, pool.get("replicas", 0))
    lag = (stats["dispatcher"] or {}).get("lag") or 0
    state.peak_lag = max(state.peak_lag, lag)


def render_table(
    stack: EmbeddedStack, simulator: Simulator, watcher: PredictionCounts, state: DemoState
):
    from rich.table import Table

    stats = stack.stats()
    pool = stats["predict"] or {}
    dispatcher = stats["dispatcher"] or {}
    seen = watcher.snapshot()
    progress = simulator.progress
    elapsed = time.monotonic() - state.flight_started if state.flight_started else 0.0
    plan = simulator.plan
    t = min(elapsed, plan.duration_s)
    rate = plan.rate_at(t) if elapsed < plan.duration_s else 0.0
    burst = " (burst)" if rate > plan.rate else ""

    table = Table(title="lensflow demo", show_header=False, min_width=64)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("phase", f"{state.phase}  {t:4.0f} / {plan.duration_s:.0f} s")
    flying = f"at {rate:.0f} photos/s{burst}" if elapsed < plan.duration_s else "landed"
    table.add_row("drones", f"{plan.drones} drones {flying}")
    table.add_row(
        "events in",
        f"{progress.uploaded} / {state.planned} planned"
        + (f"  ({progress.errors} upload errors)" if progress.errors else ""),
    )
    table.add_row(
        "predictions out",
        f"{seen['predicted_images']} images"
        + (f" (+{seen['duplicates']} duplicates)" if seen["duplicates"] else ""),
    )
    table.add_row("dead-lettered", str(seen["dead_lettered"]))
    table.add_row(
        "consumer lag",
        f"{dispatcher.get('lag') or 0}  (in flight "
        f"{dispatcher.get('in_flight', 0)}, retried {dispatcher.get('retried', 0)})",
    )
    table.add_row(
        "predict replicas",
        f"{pool.get('replicas', 0)} ready, "
        f"{pool.get('starting', 0)} starting  (cold starts {pool.get('cold_starts', 0)},"
        f" ups {pool.get('scale_ups', 0)}, downs {pool.get('scale_downs', 0)})",
    )
    versions = ", ".join(f"{v}: {n}" for v, n in sorted(seen["versions"].items()))
    table.add_row(
        "model",
        f"{seen['model_version'] or (state.seeded or {}).get('version')}"
        + (f"  ({versions})" if versions else ""),
    )
    table.add_row("training", state.training)
    table.add_row(
        "latency p50 / p95",
        f"{_fmt(seen['recent_p50_s'])} / "
        f"{_fmt(seen['recent_p95_s'])} (last 10 s);  {_fmt(seen['latency_p50_s'])} / "
        f"{_fmt(seen['latency_p95_s'])} overall",
    )
    return table


def status_line(
    stack: EmbeddedStack, simulator: Simulator, watcher: PredictionCounts, state: DemoState
) -> str:
    """One line of the table, for logs and terminals without live display."""
    seen = watcher.snapshot()
    stats = stack.stats()
    pool = stats["predict"] or {}
    elapsed = time.monotonic() - state.flight_started if state.flight_started else 0.0
    return (
        f"{elapsed:5.0f} s  {state.phase}: {simulator.progress.uploaded} in, "
        f"{seen['predicted_images']} predicted, {seen['dead_lettered']} dead-lettered, "
        f"lag {(stats['dispatcher'] or {}).get('lag') or 0}, "
        f"{pool.get('replicas', 0)} replicas, model {seen['model_version'] or '-'}, "
        f"p95 {_fmt(seen['recent_p95_s'])}"
    )


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _summary(
    stack: EmbeddedStack,
    watcher: PredictionCounts,
    state: DemoState,
    simulation: dict[str, Any],
    flown_s: float,
) -> dict[str, Any]:
    seen = watcher.snapshot()
    stats = stack.stats()
    predicted_s = (
        (watcher.last_at - watcher.first_at) if watcher.first_at and watcher.last_at else 0.0
    )
    uploaded = simulation.get("uploaded", 0)
    return {
        "phase": state.phase,
        "model": state.seeded,
        "simulation": simulation,
        "uploaded": uploaded,
        "predicted_images": seen["predicted_images"],
        "missing": max(uploaded - seen["predicted_images"] - seen["dead_lettered"], 0),
        "duplicates": seen["duplicates"],
        "dead_lettered": seen["dead_lettered"],
        "throughput_per_s": round(seen["predicted_images"] / predicted_s, 2)
        if predicted_s
        else None,
        "peak_throughput_per_s": round(watcher.peak_rate(), 2),
        "wall_s": round(flown_s, 1),
        "latency_s": {k: seen[f"latency_{k}_s"] for k in ("p50", "p95", "max")},
        "model_versions": seen["versions"],
        "training_rounds": state.rounds,
        "labels_given": state.labels_given,
        "promoted_after_labels": state.promoted_after_labels,
        "peak_replicas": state.peak_replicas,
        "peak_lag": state.peak_lag,
        "predict": stats["predict"],
        "dispatcher": {
            k: v
            for k, v in (stats["dispatcher"] or {}).items()
            if k in ("delivered", "dead_lettered", "failed", "retried", "lag")
        },
    }


def summary_text(summary: dict[str, Any]) -> str:
    pool = summary.get("predict") or {}
    lat = summary["latency_s"]
    lines = [
        f"uploaded {summary['uploaded']} photos, predicted {summary['predicted_images']} "
        f"(missing {summary['missing']}, duplicates {summary['duplicates']}, "
        f"dead-lettered {summary['dead_lettered']}) in {summary['wall_s']} s",
        f"throughput {summary['throughput_per_s']} predictions/s (peak 5 s: "
        f"{summary['peak_throughput_per_s']}/s); upload-to-prediction "
        f"p50 {_fmt(lat['p50'])}, p95 {_fmt(lat['p95'])}, max {_fmt(lat['max'])}",
        f"predict replicas: peak {summary['peak_replicas']}, cold starts "
        f"{pool.get('cold_starts')} (last {pool.get('last_cold_start_s')} s), scale-ups "
        f"{pool.get('scale_ups')}, scale-downs {pool.get('scale_downs')}; peak lag "
        f"{summary['peak_lag']}",
        "model versions serving: "
        + (", ".join(f"{v} ({n})" for v, n in sorted(summary["model_versions"].items())) or "-"),
    ]
    archive = summary.get("archive")
    if archive and "rows" in archive:
        lines.append(
            f"archive: {archive['rows']} predictions ({archive['distinct_ids']} distinct ids) in "
            f"{archive['where']}; ask it: lensflow predictions report per-class-per-day"
        )
    elif archive:
        lines.append(f"archive: {archive['error']}")
    for report in summary["training_rounds"]:
        given = report.get("labels_given")
        after = f" (after {given} labels from the queue)" if given else ""
        lines.append(f"training round{after}: {report.get('reason') or report.get('outcome')}")
    if summary.get("promoted_after_labels"):
        lines.append(
            f"learning loop closed: uncertain photos queued, {summary['promoted_after_labels']} "
            "labelled by the scripted labeller, and the round they fed promoted a new model"
        )
    elif summary.get("labels_given"):
        lines.append(
            f"learning loop: {summary['labels_given']} photos labelled from the queue; "
            "no round promoted yet"
        )
    return "\n".join(lines)
