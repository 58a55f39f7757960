"""Helpers for tests that talk to a real server process: the shipped uvicorn command in a
subprocess, a tiny WebSocket client (RFC 6455, text frames only) over asyncio streams, and the
test database's URL.

The server processes share the test database: its name is read after pytest-django created it,
and tests using them are ``transaction=True`` so what they write is committed and visible.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import httpx

BASE_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shared_database_url() -> str:
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = quote(db.get("USER") or "")
    if db.get("PASSWORD"):
        auth += ":" + quote(db["PASSWORD"])
    return f"postgres://{auth}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"


# The flags scripts/run serves with, so the tests exercise what ships. One worker per process,
# whatever WEB_CONCURRENCY says: a test that needs several processes starts several and knows
# which one it talks to.
UVICORN_FLAGS = [
    *("--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio", "--ws-per-message-deflate", "false"),
    *("--lifespan", "off", "--no-access-log", "--workers", "1"),
]


_running: dict[str, subprocess.Popen] = {}


def crash(url: str) -> None:
    """SIGKILL the server at ``url``: no finally blocks, no graceful shutdown — a crash."""
    proc = _running[url]
    proc.kill()
    proc.wait(timeout=5)


@contextmanager
def live_server(*, port: int | None = None, **env_overrides: str):
    """Run ``config.asgi:application`` under uvicorn on a loopback port (``port``, else a free
    one); yields its base URL. A test that restarts a server after ``crash()`` passes the same
    ``port`` again, so its clients find the new process where the old one was."""
    with live_servers(1, ports=[port] if port else None, **env_overrides) as (url,):
        yield url


@contextmanager
def live_servers(count: int, *, ports: list[int] | None = None, workers: int = 1, **env_overrides: str):
    """``count`` server processes started side by side (start-up is the slow part); yields their
    URLs. ``workers`` > 1 runs each as ``scripts/run`` does with ``WEB_CONCURRENCY`` (uvicorn's
    supervisor and that many worker processes on one socket: ``worker_pids``, ``serving_pid``).
    Each has ``HOST``/``PORT`` in its environment naming where it listens, as ``scripts/run``
    exports them, and logs to ``var/server-<port>.log`` while it runs (the tail is in the error if
    it does not start). Every process is terminated on the way out, whatever happened."""
    skip = {"REDIS_URL", "REDIS_PREFIX", "WEB_CONCURRENCY", "HOST", "PORT", "APP_URL"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update(DATABASE_URL=shared_database_url(), DJANGO_SETTINGS_MODULE="config.settings")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(env_overrides)
    uvicorn = Path(sys.executable).with_name("uvicorn")
    (BASE_DIR / "var").mkdir(exist_ok=True)
    servers: list[tuple[subprocess.Popen, str, Path]] = []
    try:
        for index in range(count):
            port = ports[index] if ports else free_port()
            log_path = BASE_DIR / "var" / f"server-{port}.log"
            command = [str(uvicorn), "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
            # As scripts/run does: HOST and PORT in the environment too (an unset APP_URL follows them).
            server_env = {"HOST": "127.0.0.1", "PORT": str(port), **env}
            with open(log_path, "wb") as log:
                flags = [*UVICORN_FLAGS[:-1], str(workers)]  # the last flag is --workers' value
                proc = subprocess.Popen(
                    [*command, *flags], cwd=BASE_DIR, env=server_env, stdout=log, stderr=subprocess.STDOUT
                )
            servers.append((proc, f"http://127.0.0.1:{port}", log_path))
        for proc, url, log_path in servers:
            _wait_until_up(proc, url, log_path)
            _running[url] = proc
        yield [url for _, url, _ in servers]
    finally:
        for _, url, _ in servers:
            _running.pop(url, None)
        for proc, _, _ in servers:
            proc.terminate()
        for proc, _, log_path in servers:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            log_path.unlink(missing_ok=True)


def worker_pids(url: str) -> list[int]:
    """The processes of the server at ``url`` that may hold its connections: the worker processes
    uvicorn's supervisor spawned (with ``--workers 1`` there are none: the supervisor serves
    itself). Multiprocessing's resource tracker, its other child, is no worker."""
    root = _running[url].pid
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == root and b"spawn_main" in _cmdline(entry):
                children.append(int(entry.name))
    return children or [root]


def _cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""


def serving_pid(url: str, client_port: int) -> int | None:
    """Which process of the server at ``url`` holds the connection from our ``client_port``
    (Linux /proc: the server side's socket inode, then whose file descriptor it is); None while
    the connection still waits to be accepted."""
    server_port = int(url.rsplit(":", 1)[1])
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
            inode = fields[9]
    if inode in (None, "0"):
        return None
    wanted = f"socket:[{inode}]"
    for pid in worker_pids(url):
        try:
            descriptors = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(descriptor.path) == wanted:
                    return pid
            except OSError:
                continue
    return None


def _wait_until_up(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not answer within {timeout:.0f} s: {log_path.read_text()[-2000:]}")
        time.sleep(0.1)


class WebSocketClosed(Exception):
    def __init__(self, code: int | None):
        super().__init__(f"closed with {code}")
        self.code = code


class MiniWebSocket:
    """Just enough of a WebSocket client for tests: handshake, masked text frames out,
    text/close/ping frames in. Every read is bounded by a timeout."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, url: str, path: str, headers: dict[str, str] | None = None, timeout: float = 5):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in (headers or {}).items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status, *header_lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in status + " ":
            writer.close()
            raise WebSocketClosed(int(status.split()[1]))
        accept = base64.b64encode(hashlib.sha1((key + cls.GUID).encode()).digest()).decode()
        received = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        assert received.get("sec-websocket-accept") == accept
        return cls(reader, writer)

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    async def send_json(self, data) -> None:
        self.writer.write(self._frame(0x1, json.dumps(data).encode()))
        await self.writer.drain()

    async def receive_json(self, timeout: float = 1):
        return json.loads(await asyncio.wait_for(self._receive_text(), timeout))

    async def _receive_text(self) -> str:
        while True:
            first, second = await self.reader.readexactly(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(length)
            if opcode == 0x1:
                return payload.decode()
            if opcode == 0x8:
                raise WebSocketClosed(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None)
            if opcode == 0x9:
                self.writer.write(self._frame(0xA, payload))

    async def close(self) -> None:
        try:
            self.writer.write(self._frame(0x8, struct.pack("!H", 1000)))
            await self.writer.drain()
        except ConnectionError:
            pass
        self.writer.close()
