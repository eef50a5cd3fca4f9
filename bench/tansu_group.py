"""Tansu's consumer groups, measured: why the dispatcher's session is 6 s with a 1 s heartbeat.

`python -m bench.tansu_group` (about 3 minutes; not in `make bench`, which it does not
feed) prints one JSON line per measure:

- ``join``: seconds from ``subscribe`` to the first assignment of a fresh group, and for a
  member started after the first was killed with -9 (no LeaveGroup), by session timeout,
  on Tansu's memory and S3 engines;
- ``freeze``: two members (heartbeat 3 s and 1 s, both with a 6 s session) of their own
  groups while the S3 under Tansu's S3 engine is frozen (SIGSTOP) for 2.5 to 5.5 s: which
  lost its session (librdkafka's ``SESSTMOUT``).

Members are child processes, so a kill is a real one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from lensflow.servers import KafkaBroker, S3Server
from lensflow_core.s3 import ensure_buckets, s3_client
from lensflow_core.settings import Config

TOPIC = "tansu-group"
# One group member: prints the seconds to its first assignment, then every loss.
MEMBER = """
import sys, time
from confluent_kafka import Consumer
bootstrap, group, session, heartbeat = sys.argv[1:5]
started, assigned = time.monotonic(), []
def on_assign(consumer, partitions):
    if not assigned:
        assigned.append(1)
        print(f"assigned {time.monotonic() - started:.2f}", flush=True)
consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                     "session.timeout.ms": int(session), "heartbeat.interval.ms": int(heartbeat)})
consumer.subscribe([sys.argv[5]], on_assign=on_assign,
                   on_lost=lambda c, p: print("lost", flush=True))
while True:
    consumer.poll(0.2)
"""


def member(bootstrap: str, group: str, session_ms: int, heartbeat_ms: int) -> subprocess.Popen:
    args = [bootstrap, group, str(session_ms), str(heartbeat_ms), TOPIC]
    return subprocess.Popen(
        [sys.executable, "-c", MEMBER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def assigned_after(process: subprocess.Popen) -> float:
    for line in process.stdout:
        if line.startswith("assigned"):
            return float(line.split()[1])
    raise RuntimeError("the member ended before its first assignment")


def joins(broker: KafkaBroker, engine: str) -> None:
    for session_ms in (6000, 10000, 20000):
        group = f"join-{engine}-{session_ms}"
        first = member(broker.bootstrap, group, session_ms, 1000)
        first_s = assigned_after(first)
        time.sleep(2)
        first.kill()
        first.wait()
        second = member(broker.bootstrap, group, session_ms, 1000)
        second_s = assigned_after(second)
        second.kill()
        second.wait()
        print(
            json.dumps(
                {
                    "measure": "join",
                    "engine": engine,
                    "session_ms": session_ms,
                    "first_join_s": first_s,
                    "after_kill_join_s": second_s,
                }
            ),
            flush=True,
        )


def freezes(broker: KafkaBroker, s3: S3Server) -> None:
    members = {hb: member(broker.bootstrap, f"freeze-{hb}", 6000, hb) for hb in (3000, 1000)}
    lines: dict[int, list[str]] = {hb: [] for hb in members}
    for hb, process in members.items():
        assigned_after(process)
        threading.Thread(target=lambda p=process, out=lines[hb]: out.extend(p.stdout)).start()
    pgrep = ["pgrep", "-P", str(s3.proc.pid)]
    frozen = [s3.proc.pid, *map(int, subprocess.run(pgrep, capture_output=True).stdout.split())]
    for hold_s in (2.5, 3.5, 4.5, 5.5):
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(hold_s)
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        time.sleep(20)
        lost = {hb: any("SESSTMOUT" in line for line in lines[hb]) for hb in members}
        for found in lines.values():
            found.clear()
        print(
            json.dumps(
                {
                    "measure": "freeze",
                    "s3_frozen_s": hold_s,
                    "session_ms": 6000,
                    "session_lost_by_heartbeat_ms": lost,
                }
            ),
            flush=True,
        )
    for process in members.values():
        process.kill()
        process.wait()


def main() -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    with S3Server() as s3:
        config = Config.from_env({"LENSFLOW_S3_ENDPOINT": s3.endpoint})
        ensure_buckets(s3_client(config), ["tansu"])
        for engine in ("memory", "s3"):
            with KafkaBroker(durable_on=config if engine == "s3" else None) as broker:
                admin = AdminClient({"bootstrap.servers": broker.bootstrap})
                admin.create_topics([NewTopic(TOPIC, 6, 1)])[TOPIC].result()
                joins(broker, engine)
                if engine == "s3":
                    freezes(broker, s3)


if __name__ == "__main__":
    main()
