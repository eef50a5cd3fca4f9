"""What the fault suite (``bench/faults.py``) and the soak (``lensflow.soak``) share: the
history of the output topics, read the whole time a fault runs, and the signals that
make the faults.

- ``Watch``: reads the predictions and dead-letter topics from the start, in threads,
  across broker restarts, keeping every record once, decoded.
- ``processes_with``: the processes whose environment carries a marker (what a run left
  behind).
- ``kill9``, ``pause`` and ``resume``: ``kill -9`` of a process group; ``SIGSTOP``, a
  wait, ``SIGCONT``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lensflow_eventing.dlq_replay import parse_dead_letter
from lensflow_eventing.predictions import TopicReader, parse_prediction


class Watch:
    """Reads the predictions and dead-letter topics from the start, all the time, and
    survives the broker restarting (records are told apart by key, partition, offset and
    timestamp, so re-reading after a reconnect counts nothing twice).

    ``records[topic]`` maps that identity to the decoded record: a ``Prediction`` (or
    None for a record that is not a CloudEvent) on the predictions topic, a
    ``DeadLetter`` on the dead-letter topic (``images`` names the topic it came from).
    """

    def __init__(
        self,
        bootstrap: str,
        predictions: str,
        dlq: str,
        images: str = "images",
        durable: bool = False,
    ):
        self.records: dict[str, dict[tuple, Any]] = {predictions: {}, dlq: {}}
        # ``durable``: offsets never go back, so a reconnect goes on where it was; reading
        # every record again each time loads the broker more the longer the run (issue
        # 23's soak). An in-memory broker restarts empty: read from the start again.
        self._next: dict[str, dict[int, int]] | None = (
            {predictions: {}, dlq: {}} if durable else None
        )
        self.predictions, self.dlq, self.images = predictions, dlq, images
        self._bootstrap = bootstrap
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, args=(topic,), daemon=True)
            for topic in self.records
        ]
        for thread in self._threads:
            thread.start()

    def _decode(self, topic: str, message) -> Any:
        try:
            if topic == self.predictions:
                return parse_prediction(message)
            return parse_dead_letter(message, self.images)
        except Exception:  # kept undecoded: still counted by key
            return None

    def _read(self, topic: str) -> None:
        while not self._stop.is_set():
            try:
                start = dict(self._next[topic]) if self._next is not None else None
                with TopicReader(self._bootstrap, topic, timeout_s=3, start=start) as reader:
                    idle_since = time.monotonic()
                    while not self._stop.is_set():
                        records = reader.poll(0.2)
                        for m in records:
                            if m.key():
                                identity = (
                                    m.key().decode(errors="replace"),
                                    m.partition(),
                                    m.offset(),
                                    m.timestamp()[1],
                                )
                                with self._lock:
                                    if identity not in self.records[topic]:
                                        self.records[topic][identity] = self._decode(topic, m)
                            if self._next is not None:
                                self._next[topic][m.partition()] = m.offset() + 1
                        if records:
                            idle_since = time.monotonic()
                        elif not reader.partitions or time.monotonic() - idle_since > 3:
                            break  # topic missing, or maybe recreated: open again
            except Exception:  # broker away: try again
                pass
            self._stop.wait(0.5)

    def seen(self, topic: str) -> list[tuple[str, Any]]:
        """(record key, decoded record) of every record of ``topic`` so far."""
        with self._lock:
            return [(identity[0], record) for identity, record in self.records[topic].items()]

    def counts(self, sent: list[str]) -> tuple[int, int, int, int]:
        """predicted, dead-lettered (and not predicted), duplicates, lost, of ``sent``."""
        predictions = Counter(key for key, _ in self.seen(self.predictions))
        dead = {key for key, _ in self.seen(self.dlq)}
        wanted = set(sent)
        predicted = {k for k in wanted if predictions[k]}
        dead_only = (wanted & dead) - predicted
        duplicates = sum(predictions[k] - 1 for k in predicted)
        return len(predicted), len(dead_only), duplicates, len(wanted - predicted - dead_only)

    def settle(self, sent: list[str], timeout_s: float) -> tuple[int, ...]:
        """``counts`` once every sent upload is predicted or dead-lettered, or the time
        is up (a second later: late duplicates show)."""
        deadline = time.monotonic() + timeout_s
        while True:
            counts = self.counts(sent)
            if counts[3] == 0 or time.monotonic() > deadline:
                time.sleep(1.0)
                return self.counts(sent)
            time.sleep(0.5)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)


def processes_with(text: str) -> list[int]:
    """Pids of processes (other than this one) whose environment mentions ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if text.encode() in Path(f"/proc/{entry}/environ").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def kill9(pid: int) -> None:
    """``kill -9`` of ``pid``'s process group (a server and whatever it forked)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def pause(pid: int, seconds: float, group: bool = True) -> None:
    """``SIGSTOP`` of ``pid`` (its group), ``seconds``, then ``SIGCONT``; a process that
    died meanwhile is no error."""
    send = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError):
        send(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        resume(pid, group)


def resume(pid: int, group: bool = True) -> None:
    """``SIGCONT`` of ``pid`` (its group); a process that is gone is no error."""
    with contextlib.suppress(ProcessLookupError):
        (os.killpg if group else os.kill)(pid, signal.SIGCONT)
