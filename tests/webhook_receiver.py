"""A loopback webhook receiver for tests: a threaded HTTP server that records every delivery.

Each path answers from its own script — a list of ``Reply(status, delay, headers)`` used in
order, the last one repeating — so one server plays "succeeds", "500 then 200", "slower than the
worker's timeout", "hangs until released" at once. It also notices two requests carrying the
same ``webhook-id`` to the same path in flight at the same time (``overlaps``), which must never
happen.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    status: int = 200
    delay: float = 0.0  # seconds before answering
    headers: dict = field(default_factory=dict)
    hang: bool = False  # wait until the receiver is released (or shut down) before answering


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: str

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    def __init__(self):
        self.received: list[Received] = []
        self.scripts: dict[str, list[Reply]] = {}
        self.overlaps: list[tuple[str, str]] = []
        self.released = threading.Event()
        self.arrived = threading.Condition()
        self._inflight: dict[tuple[str, str], int] = defaultdict(int)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def script(self, path: str, *replies: Reply) -> str:
        """Answer ``path`` with these replies in turn (the last repeats); its URL."""
        self.scripts[path] = list(replies)
        return self.url(path)

    def to(self, path: str) -> list[Received]:
        return [item for item in self.received if item.path == path]

    def wait_for(self, count: int, timeout: float = 30) -> None:
        """Until ``count`` deliveries in all have arrived (headers and body read)."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.received)} of {count} deliveries arrived")
                self.arrived.wait(left)

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no request is being answered (a hung one released, say)."""
        deadline = time.monotonic() + timeout
        while any(self._inflight.values()):
            if time.monotonic() > deadline:
                raise AssertionError("requests still in flight")
            time.sleep(0.02)

    def _reply_for(self, path: str) -> Reply:
        with self._lock:
            script = self.scripts.get(path) or [Reply()]
            return script.pop(0) if len(script) > 1 else script[0]

    def handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
                headers = {name.lower(): value for name, value in self.headers.items()}
                # One delivery is one (endpoint, event): the same event may reach two paths at once.
                webhook_id = (self.path, headers.get("webhook-id", ""))
                with receiver._lock:
                    receiver._inflight[webhook_id] += 1
                    if receiver._inflight[webhook_id] > 1:
                        receiver.overlaps.append(webhook_id)
                try:
                    reply = receiver._reply_for(self.path)
                    with receiver.arrived:
                        receiver.received.append(Received(self.path, headers, body))
                        receiver.arrived.notify_all()
                    if reply.hang:
                        receiver.released.wait(60)
                    if reply.delay:
                        time.sleep(reply.delay)
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):  # the worker gave up on us (timeout, killed)
                    pass
                finally:
                    with receiver._lock:
                        receiver._inflight[webhook_id] -= 1

            def log_message(self, *args):  # quiet
                pass

        return Handler


@contextmanager
def receiver():
    """A running ``Receiver`` on a free loopback port, shut down on the way out."""
    found = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), found.handler())
    server.daemon_threads = True
    found._server = server
    # shutdown() waits for serve_forever's next poll: 0.5 s by default, on every test's way out
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        found.released.set()
        server.shutdown()
        server.server_close()
