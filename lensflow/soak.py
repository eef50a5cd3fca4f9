"""`lensflow soak`: the embedded stack on durable servers, under load and a seeded random
fault schedule, then a check of everything it recorded (issue 23; in the manner of
Jepsen's nemesis).

- Servers: moto (S3) and Tansu on its **S3 storage engine** writing into that S3 (a broker
  restart keeps its log: README, "Durable servers"); ``lensflow up --kafka --s3`` as a
  child process (the dispatcher and the predict replicas); ``lensflow dashboard``.
- Load: a steady stream of uploads through the ordinary upload path (``upload_one``),
  with bursts; one upload in twenty is hostile (corrupt, oversized, a decompression bomb,
  an unknown bucket).
- Faults (``FAULTS``): at the times of ``plan(seed, duration)``, a pure function of both;
  each in its own thread, so faults on different processes overlap (faults on one
  process wait for each other).
- Afterwards: wait until every acknowledged upload is predicted or dead-lettered (or
  ``settle_s`` passed), read the pointer history, stop ``up`` (its archiver writes what
  it holds), drain the archive (``lensflow archive --once``) and read it back, stop
  everything, look for processes left behind, and hand the ``History`` to
  ``lensflow.soak_check.check``.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lensflow.faults import Watch, kill9, pause, processes_with, resume
from lensflow.process import ChildProcess, free_port, http_ok
from lensflow.scenes import scene_jpeg
from lensflow.seeding import seed_training_data
from lensflow.servers import KafkaBroker, S3Server, Server
from lensflow.soak_check import (
    NOTIFY_RETRY,
    PRODUCE_TIMEOUT,
    SESSION_LOST,
    UNKNOWN_BUCKET,
    VALID,
    DeadLettered,
    FaultRun,
    History,
    Predicted,
    Report,
    Upload,
    check,
    iso_seconds,
)
from lensflow.stack import kafkasource_settings
from lensflow.upload import upload_file
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config, default
from lensflow_eventing.dispatcher import SESSION_TIMEOUT_MS
from lensflow_eventing.notify_queue import CLIENT_ID as NOTIFY_CLIENT
from lensflow_eventing.notify_queue import MESSAGE_TIMEOUT_S
from lensflow_eventing.offsets import group_lag
from lensflow_model_store import ModelStore, ModelStoreError
from lensflow_predict.sink import CLIENT_ID as PREDICT_CLIENT
from lensflow_predict.sink import PRODUCE_TIMEOUT_S

FAULTS: dict[str, str] = {
    "kill-replica": "kill -9 of a predict replica (the pool starts another)",
    "stop-replica": "SIGSTOP of a predict replica, SIGCONT after the pause",
    "kill-dispatcher": "kill -9 of `lensflow up` (dispatcher and replicas), started again",
    "stop-dispatcher": "SIGSTOP of `lensflow up`, SIGCONT after the pause",
    "kill-dashboard": "kill -9 of the dashboard, started again",
    "stop-dashboard": "SIGSTOP of the dashboard, SIGCONT after the pause",
    "broker-restart": "kill -9 of Tansu (S3 storage engine), started again after the pause",
    "s3-freeze": "SIGSTOP of the S3 server, SIGCONT after the pause",
    "flip": "flip the pointer to another stored version during load",
    "rollback": "roll the pointer back during load",
    "train": "a training round during load (`lensflow train --once --force`)",
    "kill-archiver": "kill -9 of the archiver while it holds a batch (`up` starts it again)",
}
# How often each fault is drawn, relative to the others (a round takes a minute of CPU).
WEIGHT = {"train": 0.3, "broker-restart": 0.7, "s3-freeze": 0.7, "rollback": 0.7}
# (shortest, longest) pause of a SIGSTOP, or time down before a restart.
HOLD_S = {"s3-freeze": (2.0, 10.0), "broker-restart": (0.5, 3.0), "kill-replica": (0.0, 0.0)}
HOLD_DEFAULT_S = {"stop": (1.0, 8.0), "kill": (0.5, 3.0)}
MEAN_GAP_S = 15.0  # between faults, on average
MIN_FAULTS = 6  # a short soak still gets this many (closer together)
BASE_RATE = 3.0  # uploads per second
BURST_FACTOR = 4.0
HOSTILE_EVERY = 20
HOSTILE_KINDS = ("corrupt", "oversized", "bomb", UNKNOWN_BUCKET)
MAX_IMAGE_BYTES = 1024 * 1024  # the soak's limit; "oversized" uploads are above it
MARKER = "LENSFLOW_SOAK_RUN"  # in every process the soak starts: what is left behind
PREFIX = "soak"
LABEL_SCENES = ("field", "forest", "water")
ARCHIVE_ONCE = [sys.executable, "-m", "lensflow", "archive", "--once", "--json"]
TRAIN = [sys.executable, "-m", "lensflow", "train", "--once", "--force", "--json", "--quiet"]


# --- the schedule: a pure function of seed and duration -------------------------------------


@dataclass(frozen=True)
class Planned:
    at_s: float  # seconds after the load starts
    fault: str
    hold_s: float = 0.0  # the pause of a SIGSTOP, or the time down before a restart
    pick: float = 0.0  # which replica or version, as a fraction of those there are


@dataclass(frozen=True)
class Burst:
    at_s: float
    length_s: float
    factor: float = BURST_FACTOR


@dataclass(frozen=True)
class Schedule:
    seed: int
    duration_s: float
    faults: tuple[Planned, ...]
    bursts: tuple[Burst, ...]

    def rate_at(self, t: float, base: float = BASE_RATE) -> float:
        for burst in self.bursts:
            if burst.at_s <= t < burst.at_s + burst.length_s:
                return base * burst.factor
        return base

    def lines(self) -> list[str]:
        out = [f"{b.at_s:7.1f}s  burst x{b.factor:g} for {b.length_s:.1f} s" for b in self.bursts]
        for p in self.faults:
            hold = f" ({p.hold_s:.1f} s)" if p.hold_s else ""
            out.append(f"{p.at_s:7.1f}s  {p.fault}{hold}")
        return sorted(out, key=lambda line: float(line.split("s")[0]))


def plan(seed: int, duration_s: float, faults: tuple[str, ...] = tuple(FAULTS)) -> Schedule:
    """The faults and bursts of a soak of ``duration_s`` seconds: the same for the same
    seed, duration and fault names. Faults start after a short warm-up and stop before
    the end (``duration_s`` of load; the soak then settles)."""
    rng = random.Random(seed)
    warmup, tail = min(10.0, duration_s * 0.1), min(10.0, duration_s * 0.1)
    span = max(duration_s - warmup - tail, 0.0)
    gap = min(MEAN_GAP_S, span / MIN_FAULTS) if span else 0.0
    names = sorted(faults)
    weights = [WEIGHT.get(name, 1.0) for name in names]
    planned: list[Planned] = []
    t = warmup + (rng.expovariate(1 / gap) if gap else 0.0)
    while gap and t < warmup + span:
        name = rng.choices(names, weights)[0]
        kind = name.split("-")[0]
        low, high = HOLD_S.get(name, HOLD_DEFAULT_S.get(kind, (0.0, 0.0)))
        hold = round(rng.uniform(low, high), 1) if high else 0.0
        planned.append(Planned(round(t, 1), name, hold, round(rng.random(), 3)))
        t += rng.expovariate(1 / gap)
    bursts = []
    t = rng.uniform(5.0, 30.0)
    while t < duration_s - 5.0:
        length = round(rng.uniform(5.0, 10.0), 1)
        bursts.append(Burst(round(t, 1), min(length, duration_s - t)))
        t += rng.uniform(45.0, 90.0)
    return Schedule(seed, duration_s, tuple(planned), tuple(bursts))


# --- uploads ---------------------------------------------------------------------------------


def upload_one(s3, bucket: str, key: str, body: bytes) -> None:
    """One upload, the way any S3 client uploads (the event comes from the bucket's
    notification). Raises what S3 raised when it did not take the object."""
    upload_file(s3, bucket, key, body, "image/png" if key.endswith(".png") else "image/jpeg")


@functools.cache
def bomb_png(side: int = 10_000) -> bytes:
    """A 1-bit PNG of ``side`` x ``side`` pixels in a few kilobytes: a decompression bomb
    (built row by row, never held decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def hostile_body(kind: str, rng: random.Random) -> bytes:
    if kind == "corrupt":
        return b"\xff\xd8\xff\xe0" + rng.randbytes(20_000)  # a JPEG start, then noise
    if kind == "oversized":
        return rng.randbytes(MAX_IMAGE_BYTES + 100_000)
    if kind == "bomb":
        return bomb_png()
    return scene_jpeg("field", 0, (160, 120), 85)  # fine, but to a bucket that is not there


class Uploader:
    """Uploads at the schedule's rate until stopped; records every attempt."""

    def __init__(self, config: Config, schedule: Schedule, base_rate: float):
        self.config, self.schedule = config, schedule
        self.base_rate = base_rate
        self.uploads: list[Upload] = []
        self.stopping = threading.Event()
        self._rng = random.Random(schedule.seed + 1)
        self._images = [scene_jpeg(LABEL_SCENES[i % 3], i, (160, 120), 85) for i in range(12)]
        self._s3 = s3_client(config, timeout_s=30)
        self._thread = threading.Thread(target=self._run, name="uploader", daemon=True)

    def start(self) -> Uploader:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(60)

    def _run(self) -> None:
        i = 0
        next_at = self.started
        while not self.stopping.is_set():
            self._upload(i)
            i += 1
            now = time.monotonic()
            next_at = max(
                next_at + 1 / self.schedule.rate_at(now - self.started, self.base_rate), now - 1
            )
            self.stopping.wait(max(0.0, next_at - now))

    def _upload(self, i: int) -> None:
        kind = (
            HOSTILE_KINDS[(i // HOSTILE_EVERY) % 4]
            if i % HOSTILE_EVERY == HOSTILE_EVERY - 1
            else VALID
        )
        bucket = self.config.image_buckets[0]
        if kind == VALID:
            body = self._images[self._rng.randrange(len(self._images))]
        else:
            body = hostile_body(kind, self._rng)
            bucket = f"{bucket}-nowhere" if kind == UNKNOWN_BUCKET else bucket
        key = f"{PREFIX}/{i:06d}-{kind}.{'png' if kind == 'bomb' else 'jpg'}"
        record = Upload(f"{bucket}/{key}", kind, time.time(), "acked")
        try:
            upload_one(self._s3, bucket, key, body)
        except Exception as exc:  # every outcome is recorded
            record.error = f"{type(exc).__name__}: {exc}"[:300]
            record.outcome = "rejected" if "NoSuchBucket" in record.error else "failed"
        self.uploads.append(record)


# --- the run ---------------------------------------------------------------------------------


class SoakStartError(RuntimeError):
    """A server of the soak did not start (the message names it); nothing is left running."""


@dataclass
class SoakOptions:
    seed: int
    duration_s: float = 600.0
    faults: tuple[str, ...] = tuple(FAULTS)
    rate: float = BASE_RATE
    settle_s: float = 240.0
    max_replicas: int = 2
    log_dir: Path | None = None


@dataclass
class SoakResult:
    schedule: Schedule
    report: Report
    faults: list[FaultRun] = field(default_factory=list)
    seconds: float = 0.0
    log_dir: str = ""

    def as_dict(self) -> dict[str, Any]:
        report = self.report.as_dict()
        return {
            "seed": self.schedule.seed,
            "duration_s": self.schedule.duration_s,
            **report,
            "faults": [asdict(f) for f in self.faults],
            "schedule": self.schedule.lines(),
            "seconds": round(self.seconds, 1),
            "logs": self.log_dir,
            "ok": self.report.ok,
        }


class Soak:
    """One soak run: ``run()`` starts the servers, loads and faults them, checks."""

    def __init__(self, options: SoakOptions, say: Callable[[str], None] = lambda text: None):
        self.options = options
        self.say = say
        self.schedule = plan(options.seed, options.duration_s, options.faults)
        self.tag = f"soak-{options.seed}-{os.getpid()}"
        self.log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="lensflow-soak-"))
        self.processes: dict[str, ChildProcess] = {}
        self.restarts: dict[str, int] = {}
        self.locks = {
            name: threading.Lock()
            for name in (
                *("replica", "dispatcher", "dashboard", "broker", "s3"),
                *("pointer", "train", "archiver"),
            )
        }
        self.fault_runs: list[FaultRun] = []
        self.env: dict[str, str] = {}
        self.config: Config | None = None
        self.dashboard_port = free_port()

    def run(self) -> SoakResult:
        started = time.monotonic()
        watch = None
        try:
            self._start_servers()
            self._seed_models()
            self._start("dispatcher")
            self._start("dashboard")
            watch = Watch(
                self.config.kafka_bootstrap,
                self.config.topic_predictions,
                self.config.topic_dlq,
                self.config.topic_images,
                durable=True,
            )
            uploads = self._load_and_faults()
            self.say(
                f"settling: waiting for {sum(u.outcome == 'acked' for u in uploads)} acknowledged uploads"
            )
            watch.settle([u.key for u in uploads if u.outcome == "acked"], self.options.settle_s)
            left = self._left_in_broker()
            pointer_history, pointer_now = self._pointer_history()
            archive, archive_error = self._drain_archive()
        finally:
            if watch is not None:
                watch.close()
            self.stop()
        observed = self.observed()
        for name, n in Counter(f.name for f in observed).items():
            self.say(f"observed in the logs: {name} x{n}")
        history = History(
            uploads=uploads,
            predictions=[p for _, r in watch.seen(watch.predictions) if (p := predicted(r))],
            dead_letters=[d for _, r in watch.seen(watch.dlq) if (d := dead_lettered(r))],
            pointer_history=pointer_history,
            pointer_now=pointer_now,
            faults=self.fault_runs + observed,
            left_behind=self.left_behind(),
            pointer_ttl_s=self.config.pointer_ttl_s,
            left_in_broker=left,
            archive=archive,
            archive_error=archive_error,
        )
        return SoakResult(
            self.schedule,
            check(history),
            self.fault_runs,
            time.monotonic() - started,
            str(self.log_dir),
        )

    # --- servers and processes ------------------------------------------------------------

    def _server(self, name: str, make: Callable[[], Server]) -> Server:
        try:
            server = make()
            server.env[MARKER] = self.tag
            self.processes[name] = server  # before start(): stop() must find it
            return server.start(timeout_s=60)
        except Exception as exc:
            raise SoakStartError(
                f"the {name} server did not start: {exc} (logs: {self.log_dir})"
            ) from None

    def _start_servers(self) -> None:
        """S3 first (it announces uploads to the broker-to-be, keeping the events until
        the broker takes them), then Tansu writing its log into that S3."""
        kafka_port = free_port()
        self.env = {
            **os.environ,
            MARKER: self.tag,
            "LENSFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
            "LENSFLOW_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
            "LENSFLOW_S3_NOTIFY_QUEUE_DIR": str(self.log_dir / "s3-events"),
        }
        s3 = self._server("s3", lambda: S3Server(log_dir=self.log_dir, notify=self.env))
        self.env["LENSFLOW_S3_ENDPOINT"] = s3.endpoint
        self.config = Config.from_env(self.env)
        ensure_buckets(s3_client(self.config), ["tansu", *self.config.buckets])
        self._server(
            "broker",
            lambda: KafkaBroker(port=kafka_port, log_dir=self.log_dir, durable_on=self.config),
        )

    def _seed_models(self) -> None:
        """A first model trained on synthetic scenes (as the demo's), and a second version
        (the same weights) so that flips and rollbacks have somewhere to go."""
        self.say("training a first model on synthetic scenes")
        seed_training_data(self.config, 10, 8)
        report = self._train_round()
        store = ModelStore.from_config(self.config)
        pointer = store.current()
        if pointer is None:
            raise SoakStartError(
                f"the first training round promoted no model: {report.get('reason') or report}"
            )
        info = store.get_version(pointer.version)
        spec = {
            k: v
            for k, v in info.metadata["input"].items()
            if k not in ("height", "width", "channels", "dtype")
        }
        store.publish(
            store.read_file(pointer.version, "model.tflite"),
            info.labels,
            parent=pointer.version,
            input_spec=spec,
            created_by="soak",
        )

    def _train_round(self, timeout_s: float = 900.0) -> dict[str, Any]:
        n = self.restarts["train"] = self.restarts.get("train", 0) + 1
        report_path = self.log_dir / f"train-{n}.json"
        job = ChildProcess(
            "train",
            TRAIN,
            env=self.env,
            log_path=self.log_dir / "train.log",
            stdout_path=report_path,
        )
        self.processes[f"train-{n}"] = job
        try:
            job.spawn()
            code = job.proc.wait(timeout_s)
        finally:
            job.stop()
            self.processes.pop(f"train-{n}", None)
        text = report_path.read_text().strip()
        try:
            report = json.loads(text) if text else {}
        except ValueError:
            report = {"reason": text[-300:]}
        if code != 0:
            raise RuntimeError(f"training round exited {code}: {report.get('reason', '?')}")
        return report

    def _start(self, name: str) -> None:
        """Start (or start again) ``lensflow up`` (the dispatcher) or the dashboard."""
        n = self.restarts[name] = self.restarts.get(name, 0) + 1
        log_path = self.log_dir / f"{name}-{n}.log"
        if name == "dispatcher":
            command = [
                sys.executable,
                "-m",
                "lensflow",
                "up",
                "--no-dashboard",
                "--idle",
                "60",
                "--max-replicas",
                str(self.options.max_replicas),
                "--kafka",
                self.config.kafka_bootstrap,
                "--s3",
                self.config.s3_endpoint,
                "--log-dir",  # the replicas' and the archiver's logs, kept with the soak's
                str(self.log_dir / f"up-{n}"),
            ]
            ready = lambda: "stack is up" in log_path.read_text(errors="replace")  # noqa: E731
        else:
            command = [
                sys.executable,
                "-m",
                "lensflow",
                "dashboard",
                "--port",
                str(self.dashboard_port),
            ]
            ready = http_ok(f"http://127.0.0.1:{self.dashboard_port}/api/state", 2.0)
        process = ChildProcess(name, command, env=self.env, log_path=log_path)
        self.processes[name] = process
        try:
            process.start(ready, timeout_s=120)
        except Exception as exc:
            raise SoakStartError(f"the {name} did not start: {exc} (log: {log_path})") from None

    def stop(self) -> None:
        """Stop everything the soak started: the dispatcher first (it drains into a broker
        that is still there), the servers last."""
        order = [
            "dashboard",
            "dispatcher",
            *[n for n in self.processes if n.startswith("train")],
            "broker",
            "s3",
        ]
        for name in order:
            process = self.processes.pop(name, None)
            if process is not None:
                if process.alive:
                    resume(process.pid)  # a SIGSTOPped process cannot stop
                process.stop(timeout_s=30 if name == "dispatcher" else 10)

    def _drain_archive(self) -> tuple[list[Predicted], str]:
        """Stop ``up`` (its archiver writes and commits what it holds), then archive what
        is left (``lensflow archive --once``) and read the whole archive back."""
        for name in ("dashboard", "dispatcher"):
            process = self.processes.pop(name, None)
            if process is not None:
                resume(process.pid)
                process.stop(timeout_s=60)
        self.say("draining the archive (lensflow archive --once)")
        log_path = self.log_dir / "archive-drain.log"
        job = ChildProcess("archive", ARCHIVE_ONCE, env=self.env, log_path=log_path)
        self.processes["archive-drain"] = job
        try:
            job.spawn()
            code = job.proc.wait(300)
        except Exception as exc:  # a drain that hangs is a finding
            return [], f"the drain did not finish: {exc} (log: {log_path})"
        finally:
            job.stop()
            self.processes.pop("archive-drain", None)
        if code != 0:
            return [], f"`lensflow archive --once` exited {code} (log: {log_path})"
        try:
            return archived(self.config), ""
        except Exception as exc:
            return [], f"cannot read the archive: {type(exc).__name__}: {exc}"[:300]

    def observed(self) -> list[FaultRun]:
        """Causes of redelivery the logs show that no injected fault explains."""
        found = []
        for what in OBSERVED:
            paths = sorted(self.log_dir.glob(what.logs))
            lines = [line for p in paths for line in p.read_text(errors="replace").splitlines()]
            found += observed_in(lines, what)
        return found

    def archivers(self) -> list[int]:
        """Pids of the archivers running now (``lensflow up``'s child)."""
        return self._children(b"lensflow_archive.job")

    def left_behind(self, wait_s: float = 10.0) -> list[int]:
        deadline = time.monotonic() + wait_s
        while (left := processes_with(f"{MARKER}={self.tag}")) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def _left_in_broker(self) -> int | None:
        """What the dispatcher's consumer group has not finished, asked of the broker
        (None if it cannot say): tells a record stuck in the log from one gone."""
        try:
            group = kafkasource_settings()[2]
            return group_lag(self.config.kafka_bootstrap, self.config.topic_images, group)
        except Exception:  # a diagnosis only
            return None

    def _pointer_history(self) -> tuple[list[dict[str, Any]], str | None]:
        store = ModelStore.from_config(self.config)
        for attempt in range(5):
            try:
                pointer = store.current()
                return store.history(), pointer.version if pointer else None
            except ModelStoreError:
                if attempt == 4:
                    raise
                time.sleep(2.0)
        return [], None

    # --- load and faults ------------------------------------------------------------------

    def _load_and_faults(self) -> list[Upload]:
        uploader = Uploader(self.config, self.schedule, self.options.rate).start()
        t0 = uploader.started
        self.wall_t0 = time.time() - (time.monotonic() - t0)
        self.say(f"load and faults for {self.options.duration_s:g} s")
        threads = []
        try:
            for planned in self.schedule.faults:
                if uploader.stopping.wait(max(0.0, t0 + planned.at_s - time.monotonic())):
                    break
                thread = threading.Thread(target=self._inject, args=(planned, t0), daemon=True)
                thread.start()
                threads.append(thread)
            uploader.stopping.wait(max(0.0, t0 + self.options.duration_s - time.monotonic()))
        finally:
            uploader.stop()
            for thread in threads:
                thread.join(900)
        return uploader.uploads

    def _inject(self, planned: Planned, t0: float) -> None:
        target = TARGET[planned.fault]
        with self.locks[target]:
            run = FaultRun(planned.fault, time.time(), 0.0)
            try:
                run.note = INJECT[planned.fault](self, planned)
            except Exception as exc:  # recorded; the checker reports it
                run.error = f"{type(exc).__name__}: {exc}"[:300]
            run.ended = time.time()
        self.fault_runs.append(run)
        self.say(
            f"{run.started - self.wall_t0:7.1f}s  {planned.fault}: {run.note or ''}"
            + (f" FAILED: {run.error}" if run.error else "")
        )

    def replicas(self) -> list[int]:
        """Process-group leaders of the predict replicas running now."""
        return self._children(b"functions-framework", b"predict")

    def _children(self, *words: bytes) -> list[int]:
        """Process-group leaders started by this soak whose command line has ``words``."""
        found = []
        for pid in processes_with(f"{MARKER}={self.tag}"):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
                if all(w in command for w in words) and os.getpgid(pid) == pid:
                    found.append(pid)
            except OSError:
                continue
        return sorted(found)


def _replica(soak: Soak, planned: Planned) -> int | None:
    pids = soak.replicas()
    return pids[min(int(planned.pick * len(pids)), len(pids) - 1)] if pids else None


def kill_replica(soak: Soak, planned: Planned) -> str:
    pid = _replica(soak, planned)
    if pid is None:
        return "no replica running (scaled to zero, or up restarting)"
    kill9(pid)
    return f"kill -9 of replica {pid}"


def stop_replica(soak: Soak, planned: Planned) -> str:
    pid = _replica(soak, planned)
    if pid is None:
        return "no replica running (scaled to zero, or up restarting)"
    pause(pid, planned.hold_s)
    return f"SIGSTOP of replica {pid} for {planned.hold_s:g} s"


def restart(name: str) -> Callable[[Soak, Planned], str]:
    def fault(soak: Soak, planned: Planned) -> str:
        process = soak.processes[name]
        kill9(process.pid)
        process.proc.wait(10)
        process.stop()
        time.sleep(planned.hold_s)
        if name == "broker":
            broker = process
            soak._server(
                "broker",
                lambda: KafkaBroker(
                    port=broker.port,
                    log_dir=soak.log_dir / f"broker-{planned.at_s:g}",
                    durable_on=broker.durable_on,
                ),
            )
        else:
            soak._start(name)
        return (
            f"kill -9 of the {name} (pid {process.pid}), started again {planned.hold_s:g} s later"
        )

    return fault


def freeze(name: str) -> Callable[[Soak, Planned], str]:
    def fault(soak: Soak, planned: Planned) -> str:
        pid = soak.processes[name].pid
        pause(pid, planned.hold_s)
        return f"SIGSTOP of the {name} (pid {pid}) for {planned.hold_s:g} s"

    return fault


def flip(soak: Soak, planned: Planned) -> str:
    store = ModelStore.from_config(soak.config)
    current = store.current()
    others = [
        v.version for v in store.list_versions() if current is None or v.version != current.version
    ]
    if not others:
        return "no other version to flip to"
    target = others[min(int(planned.pick * len(others)), len(others) - 1)]
    try:
        store.flip(target, expect=current.version if current else None, reason="soak", by="soak")
    except ModelStoreError as exc:  # moved meanwhile, or the store is frozen: refused
        return f"refused, nothing written ({exc})"
    return f"{current.version if current else 'none'} -> {target}"


def rollback(soak: Soak, planned: Planned) -> str:
    store = ModelStore.from_config(soak.config)
    try:
        pointer = store.rollback(reason="soak", by="soak")
    except ModelStoreError as exc:  # nothing to go back to, moved meanwhile, store frozen
        return f"refused, nothing written ({exc})"
    return f"back to {pointer.version}"


def kill_archiver(soak: Soak, planned: Planned, restart_s: float = 90.0) -> str:
    """kill -9 of the archiver; with the soak's flush time it holds records nearly always
    (the note says how many predictions were not committed), then ``up`` starts another."""
    pids = soak.archivers()
    if not pids:
        return "no archiver running (`lensflow up` restarting)"
    try:
        held = group_lag(
            soak.config.kafka, soak.config.topic_predictions, soak.config.archive_group
        )
    except Exception:  # a note only (the broker may be restarting)
        held = "?"
    kill9(pids[0])
    deadline = time.monotonic() + restart_s
    while time.monotonic() < deadline:
        if [p for p in soak.archivers() if p != pids[0]]:
            return f"kill -9 of the archiver (pid {pids[0]}) with {held} uncommitted; restarted"
        time.sleep(0.5)
    raise RuntimeError(f"no archiver started again within {restart_s:g} s")


def train(soak: Soak, planned: Planned) -> str:
    report = soak._train_round()
    return f"round: {report.get('reason') or report.get('outcome') or 'done'}"[:200]


INJECT: dict[str, Callable[[Soak, Planned], str]] = {
    "kill-replica": kill_replica,
    "stop-replica": stop_replica,
    "kill-dispatcher": restart("dispatcher"),
    "stop-dispatcher": freeze("dispatcher"),
    "kill-dashboard": restart("dashboard"),
    "stop-dashboard": freeze("dashboard"),
    "broker-restart": restart("broker"),
    "s3-freeze": freeze("s3"),
    "flip": flip,
    "rollback": rollback,
    "train": train,
    "kill-archiver": kill_archiver,
}
# Faults on one target wait for each other; on different targets they overlap.
TARGET = {
    name: {
        "flip": "pointer",
        "rollback": "pointer",
        "broker-restart": "broker",
        "s3-freeze": "s3",
    }.get(name, name.split("-")[-1])
    for name in FAULTS
}


# librdkafka's log lines, with their time: ``SESSTMOUT``/``MAXPOLL`` when a member leaves
# its group on its own (no answer from the coordinator, or the application stopped
# polling); ``REQTMOUT`` when a request got no answer in time.
_RDKAFKA = re.compile(r"^%\d\|(\d+(?:\.\d+)?)\|([A-Z]+)\|([^|]*)\|")


@dataclass(frozen=True)
class Observed:
    """A cause of redelivery a log shows: librdkafka's lines ``facilities`` of the client
    ``client`` (its ``client.id``) in the soak's logs ``logs``, each the end of a window of
    ``window_s`` in which what was sent may be sent again."""

    cause: str
    facilities: frozenset[str]
    client: str
    window_s: float
    logs: str


OBSERVED = (
    # the dispatcher's group session lost: what it delivered may not have been committed
    Observed(SESSION_LOST, frozenset({"SESSTMOUT", "MAXPOLL"}),
             f"{default('LENSFLOW_SOURCE_GROUP')}-dispatcher", SESSION_TIMEOUT_MS / 1000,
             "dispatcher-*.log"),
    # the S3 notifier's produce unanswered: the event is produced again (MinIO's queue_dir)
    Observed(NOTIFY_RETRY, frozenset({"REQTMOUT"}), NOTIFY_CLIENT,
             MESSAGE_TIMEOUT_S, "s3*.log"),
    # a replica's produce unanswered: it answers 503, the dispatcher delivers again
    Observed(PRODUCE_TIMEOUT, frozenset({"REQTMOUT"}), PREDICT_CLIENT,
             PRODUCE_TIMEOUT_S, "up-*/predict-*.log"),
)  # fmt: skip


def observed_in(lines: Iterable[str], what: Observed) -> list[FaultRun]:
    """The windows ``what`` shows in ``lines``."""
    found = []
    for line in lines:
        match = _RDKAFKA.match(line)
        if match and match[2] in what.facilities and match[3].startswith(f"{what.client}#"):
            at = float(match[1])
            found.append(FaultRun(what.cause, at - what.window_s, at, match[2]))
    return found


def predicted(record: Any) -> Predicted | None:
    """The checker's view of a ``Prediction`` read from the topic."""
    if record is None:
        return None
    data = record.data if isinstance(record.data, dict) else {}
    timings = data.get("timings_ms") or {}
    return Predicted(
        key=record.subject,
        version=record.model_version,
        at=iso_seconds(record.time),
        request_s=sum(v for v in timings.values() if isinstance(v, (int, float))) / 1000,
        id=record.event_id,
        source=str(data.get("source_event_id") or ""),
    )


def archived(config: Config) -> list[Predicted]:
    """Every row of the archive, as the checker sees a prediction."""
    from lensflow_archive.query import query

    result = query(
        config,
        "SELECT bucket || '/' || key, model_version, time, id, source_event_id FROM predictions",
    )
    return [
        Predicted(key, version, at.timestamp(), id=event_id, source=source)
        for key, version, at, event_id, source in result.rows
    ]


def dead_lettered(record: Any) -> DeadLettered | None:
    if record is None or record.key is None:
        return None
    return DeadLettered(
        record.key.decode(errors="replace"), record.code, record.reason, record.dead_lettered_at
    )
