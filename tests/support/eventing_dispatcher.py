"""Helpers test modules share (they were in tests/test_eventing_dispatcher.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lensflow.process import free_port


class Sink:
    """A real HTTP server that records each POST and answers what ``respond`` says."""

    def __init__(self, respond: Callable[[dict, bytes, int], tuple[int, bytes]] | None = None):
        self.respond = respond or (lambda headers, body, n: (200, b""))
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with sink.lock:
                    sink.requests.append((headers, body, time.monotonic()))
                    n = len(sink.requests)
                status, reply = sink.respond(headers, body, n)
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def wait(self, count: int, timeout_s: float = 20.0) -> list[tuple[dict, bytes, float]]:
        wait_until(
            lambda: len(self.requests) >= count,
            timeout_s,
            lambda: f"sink got {len(self.requests)} of {count} requests",
        )
        return list(self.requests)


def wait_until(check: Callable[[], bool], timeout_s: float, why: Callable[[], str] | str = ""):
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(why() if callable(why) else why or "timed out")
        time.sleep(0.02)
