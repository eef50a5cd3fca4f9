"""The fault suite (issue 11): inject each fault into a running stack under load, count.

``make test-faults`` (``python -m bench.faults [--repeats N] [SCENARIO...]``) runs every
scenario ``--repeats`` times (2) and prints, per run: uploads **sent** (PUTs S3 answered;
its bucket notification keeps each event until the broker has it), **predicted** (a prediction on the predictions topic), **dead-lettered** (on
the dead-letter topic, not predicted), **duplicates** (predictions beyond the first for
one upload) and **lost** (acknowledged, neither predicted nor dead-lettered). Objects
are counted by key, as the issue's injector did. ``make bench`` runs it once per scenario
(``run(out_dir)`` writes ``bench/results/faults.json``). It takes several minutes, so it
is not part of ``make test``; the same faults are covered once each by the suite's
``tests/test_faults.py`` and ``tests/test_predict_limits.py``.

Lost is 0 everywhere except ``broker-restart``: the embedded broker keeps records in
memory (Tansu's memory engine), so what it had acknowledged and not yet dispatched
when it was killed is gone with it. That is the documented limit of ``lensflow up``
without ``--kafka`` (README, "Durable servers").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import mobilenet_v2_tflite, write_json
from lensflow.faults import Watch, pause, processes_with
from lensflow.process import free_port
from lensflow.scenes import scene_jpeg
from lensflow.servers import KafkaBroker, S3Server
from lensflow.stack import EmbeddedStack
from lensflow.upload import upload_file
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config
from lensflow_eventing.contracts import ObjectEvent, notification_record
from lensflow_eventing.producer import make_producer, send
from lensflow_model_store import ModelStore

LABELS = ["field", "forest", "water"]
UPLOADS = 40
RATE = 10.0  # uploads per second
SETTLE_S = 120.0


@dataclass
class Outcome:
    scenario: str
    run: int
    sent: int = 0
    predicted: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    lost: int = 0
    note: str = ""
    seconds: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)


class Uploads:
    """``UPLOADS`` images put into S3 at ``RATE`` per second in a thread, as drones do (the
    bucket's notification makes each an event), and ``bad`` records produced among them;
    ``acked`` are the keys S3 stored (or, for bad records, the broker acknowledged)."""

    def __init__(self, config: Config, prefix: str, bad: Callable[[str], dict] | None = None):
        self.config = config
        self.bucket = config.image_buckets[0]
        self.s3 = s3_client(config)
        self.photos = [
            (f"{prefix}/{i}.jpg", scene_jpeg(LABELS[i % 3], i, (320, 240), 85))
            for i in range(UPLOADS)
        ]
        self.bad: list[tuple[str, bytes, dict]] = []
        for name, (value, headers) in (bad(self.bucket) if bad else {}).items():
            self.bad.append((f"{self.bucket}/{prefix}/bad-{name}", value, headers))
        self.acked: list[str] = []
        self.thread = threading.Thread(target=self._upload, daemon=True)

    def start(self) -> Uploads:
        self.thread.start()
        return self

    def _upload(self) -> None:
        producer = make_producer(self.config.kafka_bootstrap, **{"message.timeout.ms": 30000})
        pending = [
            (path, send(producer, self.config.topic_images, path.encode(), value, headers))
            for path, value, headers in self.bad
        ]
        for key, data in self.photos:
            try:
                upload_file(self.s3, self.bucket, key, data, "image/jpeg")
                self.acked.append(f"{self.bucket}/{key}")
            except Exception:  # not stored: not sent
                pass
            time.sleep(1 / RATE)
        producer.flush(35)
        self.acked += [path for path, future in pending if future.done() and not future.exception()]

    def join(self) -> list[str]:
        self.thread.join(60)
        return self.acked


def env_for(tag: str, s3: str, kafka: str) -> dict[str, str]:
    return {
        **os.environ,
        "LENSFLOW_S3_ENDPOINT": s3,
        "LENSFLOW_KAFKA_BOOTSTRAP": kafka,
        "LENSFLOW_IMAGE_BUCKETS": f"faults-{tag}",
        "LENSFLOW_MODEL_BUCKET": f"faults-models-{tag}",
        "LENSFLOW_TOPIC_IMAGES": f"images-{tag}",
        "LENSFLOW_TOPIC_PREDICTIONS": f"predictions-{tag}",
        "LENSFLOW_TOPIC_DLQ": f"images-dlq-{tag}",
        "LENSFLOW_LOG_LEVEL": "WARNING",
    }


def publish_model(config: Config, model: bytes) -> None:
    store = ModelStore.from_config(config)
    store.flip(store.publish(model, LABELS, created_by="faults").version)


# --- scenarios on an in-process embedded stack ----------------------------------------------


def _in_stack(
    name: str, run: int, model: bytes, fault: Callable[[EmbeddedStack], str], bad=None
) -> Outcome:
    tag = f"{name}-{run}-{os.getpid()}"
    log_dir = Path(tempfile.mkdtemp(prefix=f"faults-{name}-"))
    with contextlib.ExitStack() as servers:
        if fault is durable_broker_restart:  # external servers: S3, Tansu writing into it
            s3_port, kafka_port = free_port(), free_port()
            env = env_for(tag, f"http://127.0.0.1:{s3_port}", f"127.0.0.1:{kafka_port}")
            s3 = servers.enter_context(S3Server(port=s3_port, log_dir=log_dir, notify=env))
            durable_on = Config.from_env({"LENSFLOW_S3_ENDPOINT": s3.endpoint})
            ensure_buckets(s3_client(durable_on), ["tansu"])
            broker = KafkaBroker(port=kafka_port, log_dir=log_dir, durable_on=durable_on).start()
            stack = EmbeddedStack(env, log_dir=log_dir, idle_s=60, external={"kafka", "s3"})
            stack.durable_broker = broker  # type: ignore[attr-defined]
            servers.callback(lambda: stack.durable_broker.stop())
        else:
            env = env_for(tag, f"http://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
            stack = EmbeddedStack(env, log_dir=log_dir, idle_s=60)
        return _run_in(stack, name, run, model, fault, bad)


def _run_in(stack: EmbeddedStack, name: str, run: int, model: bytes, fault, bad) -> Outcome:
    outcome = Outcome(name, run)
    started = time.monotonic()
    with stack:
        config = stack.config
        publish_model(config, model)
        stack.dispatcher.wait_assigned(30)
        watch = Watch(config.kafka_bootstrap, config.topic_predictions, config.topic_dlq)
        try:
            uploads = Uploads(config, name, bad).start()
            time.sleep(1.5)  # mid-stream
            outcome.note = fault(stack)
            sent = uploads.join()
            counts = watch.settle(sent, SETTLE_S)
        finally:
            watch.close()
    outcome.sent = len(sent)
    outcome.predicted, outcome.dead_lettered, outcome.duplicates, outcome.lost = counts
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


def _server(stack: EmbeddedStack, name: str):
    return next(s for s in stack.servers if s.name == name)


def broker_restart(stack: EmbeddedStack) -> str:
    broker = _server(stack, "kafka")
    os.killpg(broker.pid, signal.SIGKILL)
    broker.proc.wait(10)
    time.sleep(1.0)
    again = KafkaBroker(port=broker.port, log_dir=stack.log_dir / "restarted").start()
    stack.servers.append(again)  # stopped with the stack
    return (
        "kill -9 of the in-memory broker, back empty 1 s later (what it held undispatched is lost)"
    )


def durable_broker_restart(stack: EmbeddedStack) -> str:
    broker = stack.durable_broker
    os.killpg(broker.pid, signal.SIGKILL)
    broker.proc.wait(10)
    time.sleep(1.0)
    stack.durable_broker = KafkaBroker(
        port=broker.port, log_dir=stack.log_dir / "restarted", durable_on=broker.durable_on
    ).start()
    return "kill -9 of Tansu on its S3 storage engine, back 1 s later: nothing lost"


def freeze(name: str, seconds: float = 10.0) -> Callable[[EmbeddedStack], str]:
    def fault(stack: EmbeddedStack) -> str:
        pause(_server(stack, name).pid, seconds, group=False)
        return f"SIGSTOP of {name} for {seconds:g} s"

    return fault


def kill_replicas(stack: EmbeddedStack) -> str:
    replicas = stack.pool.replicas()
    for replica in replicas:
        os.killpg(replica.proc.pid, signal.SIGKILL)
    return f"kill -9 of {len(replicas)} predict replica(s)"


def hostile_records(bucket: str) -> dict[str, tuple[bytes, dict]]:
    _, good = notification_record(ObjectEvent("s3:ObjectCreated:Put", bucket, "k.jpg", "e", 9))

    def with_key(key) -> bytes:
        data = json.loads(good)
        data["Records"][0]["s3"]["object"]["key"] = key
        return json.dumps(data).encode()

    return {
        "not-utf8": (b'{"Records": "\xff\xfe"}', {}),
        "key-is-5": (with_key(5), {}),
        "dot-dot": (with_key("a/../b.jpg"), {}),
        "10kb-header": (good, {"x-big": b"x" * 10_000}),
        "not-json": (b"{nope", {}),
    }


def hostile(stack: EmbeddedStack) -> str:
    return "5 hostile records among the uploads: each must be dead-lettered, not lost"


# --- scenarios on `lensflow up` as a subprocess, against servers it does not own --------------


def _up(env: dict[str, str], kafka: KafkaBroker, s3: S3Server) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lensflow",
            "up",
            "--no-dashboard",
            "--kafka",
            kafka.bootstrap,
            "--s3",
            s3.endpoint,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    while not lines or lines[-1].strip():  # its summary ends with an empty line
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"lensflow up did not start: {proc.stderr.read()[-500:]}")
        lines.append(line)
    return proc


def _with_up(name: str, run: int, model: bytes, stop_signal: int) -> Outcome:
    tag = f"{name}-{run}-{os.getpid()}"
    outcome = Outcome(name, run)
    started = time.monotonic()
    s3_port, kafka_port = free_port(), free_port()
    env = env_for(tag, f"http://127.0.0.1:{s3_port}", f"127.0.0.1:{kafka_port}")
    with KafkaBroker(port=kafka_port) as kafka, S3Server(port=s3_port, notify=env) as s3:
        config = Config.from_env(env)
        ensure_buckets(s3_client(config), config.buckets)
        publish_model(config, model)
        proc = _up(env, kafka, s3)
        watch = Watch(config.kafka_bootstrap, config.topic_predictions, config.topic_dlq)
        restarted = None
        try:
            uploads = Uploads(config, name).start()
            time.sleep(1.5)
            proc.send_signal(stop_signal)
            proc.wait(120)
            tagged = f"faults-{tag}"
            time.sleep(2.0)
            orphans = [p for p in processes_with(tagged) if p != proc.pid]
            outcome.checks["no process left behind"] = not orphans
            if stop_signal == signal.SIGKILL:
                restarted = _up(env, kafka, s3)  # a new `up` resumes from the commits
                outcome.note = "kill -9 of `up` mid-upload, then `up` again: at-least-once"
            else:
                outcome.checks["exit 0 (drained)"] = proc.returncode == 0
                outcome.note = f"SIGTERM mid-upload: drained, exit {proc.returncode}"
            sent = uploads.join()
            counts = watch.settle(sent, SETTLE_S)
        finally:
            watch.close()
            for p in (proc, restarted):
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    p.wait(120)
    outcome.sent = len(sent)
    outcome.predicted, outcome.dead_lettered, outcome.duplicates, outcome.lost = counts
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


SCENARIOS: dict[str, Callable[[int, bytes], Outcome]] = {
    "broker-restart": lambda run, model: _in_stack("broker-restart", run, model, broker_restart),
    "broker-restart-durable": lambda run, model: _in_stack(
        "broker-restart-durable", run, model, durable_broker_restart
    ),
    "broker-frozen": lambda run, model: _in_stack("broker-frozen", run, model, freeze("kafka")),
    "s3-frozen": lambda run, model: _in_stack("s3-frozen", run, model, freeze("s3")),
    "replicas-killed": lambda run, model: _in_stack("replicas-killed", run, model, kill_replicas),
    "hostile-records": lambda run, model: _in_stack(
        "hostile-records", run, model, hostile, hostile_records
    ),
    "sigterm-up": lambda run, model: _with_up("sigterm-up", run, model, signal.SIGTERM),
    "kill-9-up": lambda run, model: _with_up("kill-9-up", run, model, signal.SIGKILL),
}
IN_MEMORY_LIMIT = {"broker-restart"}  # lost may be > 0: documented


def run_suite(names: list[str], repeats: int, say=print) -> list[Outcome]:
    model = mobilenet_v2_tflite(len(LABELS), size=96)
    outcomes = []
    say(
        f"{'scenario':<16} {'run':>3} {'sent':>5} {'predicted':>9} {'dead-lettered':>13} "
        f"{'duplicates':>10} {'lost':>5}  note"
    )
    for name in names:
        for run in range(1, repeats + 1):
            outcome = SCENARIOS[name](run, model)
            outcomes.append(outcome)
            failed = [check for check, ok in outcome.checks.items() if not ok]
            say(
                f"{name:<16} {run:>3} {outcome.sent:>5} {outcome.predicted:>9} "
                f"{outcome.dead_lettered:>13} {outcome.duplicates:>10} {outcome.lost:>5}  "
                f"{outcome.note}" + (f"  FAILED: {', '.join(failed)}" if failed else "")
            )
    return outcomes


def verdict(outcomes: list[Outcome]) -> list[str]:
    """What went wrong: loss outside the documented limit, a failed check."""
    problems = []
    for o in outcomes:
        if o.lost and o.scenario not in IN_MEMORY_LIMIT:
            problems.append(f"{o.scenario} run {o.run}: {o.lost} lost")
        problems += [f"{o.scenario} run {o.run}: {c}" for c, ok in o.checks.items() if not ok]
        if o.scenario == "hostile-records" and o.dead_lettered < 5:
            problems.append(f"hostile-records run {o.run}: {o.dead_lettered} dead-lettered, not 5")
    return problems


def run(out_dir: Path) -> dict:
    """``make bench``: each scenario once."""
    outcomes = run_suite(list(SCENARIOS), repeats=1)
    problems = verdict(outcomes)
    result = {
        "uploads_per_run": UPLOADS,
        "rate_per_s": RATE,
        "runs": [asdict(o) for o in outcomes],
        "problems": problems,
        "targets": {"no loss outside the in-memory broker restart": not problems},
    }
    write_json(out_dir, "faults", result)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    parser.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (all)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)  # the table is the output; logs go to var/
    names = args.scenarios or list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    outcomes = run_suite(names, args.repeats, say=lambda text: print(text, flush=True))
    problems = verdict(outcomes)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("lost is 0 everywhere but the in-memory broker restart" if not problems else "")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
