"""Child processes: the one supervisor for every local server and function replica.

``ChildProcess`` starts a command in its own process group (so stopping it also stops
whatever it forked: gunicorn workers, Tansu's threads), sends its output to a log file,
waits until it is ready with one poll loop (``wait_ready``), and stops it with SIGTERM,
then SIGKILL. Tansu, moto, ``lensflow serve`` servers and the replica pool's replicas
are all ``ChildProcess``es.

No orphans: on Linux every child asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), so even a ``kill -9`` of ``lensflow up`` takes the broker,
S3 and every replica with it. The kernel sends that signal when the *thread* that forked
the child exits, not the process; so every child is forked by one long-lived spawner
thread (``_Spawner``), never by a short-lived worker that happens to start a replica.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path

import requests

from lensflow_core.lifetime import end_with_parent

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS_DIR = ROOT / "functions"


class NotReady(RuntimeError):
    """The process exited, was stopped, or did not become ready in time: ``reason`` says."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout_s: float = 5.0) -> Callable[[], bool]:
    """A readiness check: ``GET url`` answers 2xx."""

    def check() -> bool:
        try:
            return requests.get(url, timeout=timeout_s).ok
        except requests.RequestException:
            return False

    return check


# Functions served in functions-framework's ASGI mode (their Dockerfile's CMD says so too).
ASGI_FUNCTIONS = {"predict": ("--asgi",)}


def function_command(name: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The functions-framework command line that serves function ``name``, as its
    container does. Raises FileNotFoundError when functions-framework is not installed."""
    binary = Path(sys.executable).with_name("functions-framework")
    if not binary.exists():
        found = shutil.which("functions-framework")
        if not found:
            raise FileNotFoundError("functions-framework is not installed (run `make install`)")
        binary = Path(found)
    source = FUNCTIONS_DIR / name / f"lensflow_{name}" / "main.py"
    return [
        str(binary),
        *ASGI_FUNCTIONS.get(name, ()),
        "--source",
        str(source),
        "--target",
        name,
        "--host",
        host,
        "--port",
        str(port),
    ]


class _Spawner:
    """Forks every child from one daemon thread that lives as long as the process, so
    that PR_SET_PDEATHSIG fires when the process dies, not when some thread ends."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], subprocess.Popen], Future]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        kwargs["preexec_fn"] = functools.partial(end_with_parent, os.getpid())
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, name="spawner", daemon=True)
                self._thread.start()
            done: Future[subprocess.Popen] = Future()
            self._jobs.put((lambda: subprocess.Popen(*args, **kwargs), done))
        return done.result()

    def _run(self) -> None:
        jobs = self._jobs
        while True:
            start, done = jobs.get()
            try:
                done.set_result(start())
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)


_SPAWNER = _Spawner()


class ChildProcess:
    """One command in its own process group. ``proc`` is the ``Popen`` while it runs."""

    def __init__(
        self,
        name: str,
        command: list[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path = ROOT,
        stdout_path: Path | None = None,
    ):
        self.name = name
        self.command = command
        self.env = dict(os.environ if env is None else env)
        self.log_path = log_path
        self.stdout_path = stdout_path  # stdout apart from the log (a command's result)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self._log_file = None
        self._stdout_file = None
        self._stopped = False

    def spawn(self) -> ChildProcess:
        """Start the process (without waiting for it to be ready)."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # closed in stop(
        if self.stdout_path is not None:
            self._stdout_file = open(self.stdout_path, "wb")  # closed in stop(
        log_file = self._log_file or subprocess.DEVNULL
        self.started_at = time.monotonic()
        self.proc = _SPAWNER.popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdout=self._stdout_file or log_file,
            stderr=log_file if self._stdout_file else subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    def wait_ready(
        self,
        ready: Callable[[], bool],
        timeout_s: float,
        stopping: threading.Event | None = None,
    ) -> None:
        """Poll ``ready()`` until it is true; raise ``NotReady`` with the reason if the
        process exits, ``stopping`` is set, or ``timeout_s`` passes first."""
        deadline = (self.started_at or time.monotonic()) + timeout_s
        while time.monotonic() < deadline:
            if stopping is not None and stopping.is_set():
                raise NotReady("stopped while starting")
            if not self.alive:
                code = self.proc.returncode if self.proc else None
                raise NotReady(f"exited with code {code}")
            try:
                if ready():
                    return
            except Exception:  # not ready yet, whatever the check raised
                pass
            time.sleep(0.05)
        raise NotReady(f"not ready after {timeout_s:.0f} s")

    def start(self, ready: Callable[[], bool], timeout_s: float = 60.0) -> ChildProcess:
        """``spawn`` and ``wait_ready``; stopped again if it does not become ready."""
        self.spawn()
        try:
            self.wait_ready(ready, timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("%s ready (pid %d)", self.name, self.proc.pid)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to the group, SIGKILL after ``timeout_s``; then SIGKILL to whatever the
        process left behind (workers of a dead arbiter). Safe to call twice."""
        proc = self.proc
        if proc is not None and not self._stopped:
            self._stopped = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.poll()
        for file in (self._log_file, self._stdout_file):
            if file is not None and not file.closed:
                file.close()
