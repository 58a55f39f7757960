"""How much latency and CPU does the metered proxy add to a chat completion? Direct vs proxied.

    .venv/bin/python bench/proxy_overhead.py [--db-name tt_bench_proxy] [--pg postgres://postgres@127.0.0.1:5432]
        [--profiles instant,realistic] [--modes whole,stream] [--conc 1,16,64] [--requests 400]
        [--upstream-ms 50] [--chunk-ms 10] [--workers 1] [--run-seconds 8] [--no-stagger] [--users 1] [--no-floor]

What runs, all on this machine:

* a scratch PostgreSQL database ``--db-name`` (dropped and re-created), migrated, with ``--users``
  funded users (default 1: every request on one hot wallet row, the worst case for its lock), an API
  key each and the bench model's price;
* a fake upstream (a subprocess: an asyncio server on uvloop, HTTP/1.1 keep-alive, Nagle off) that
  answers ``POST …/chat/completions`` with OpenRouter-shaped bodies — JSON with ``usage.cost``, or
  SSE events ending with a usage chunk and ``data: [DONE]``, each event written as its own HTTP
  chunk — after a configurable time to first byte and, in streams, gap between events. Under load
  it costs tens of microseconds of CPU per request, and a delay is a timer, so 64+ (tested to 256)
  delayed requests in flight are cheap;
* Tokentill, launched with exactly the shipped command (``.venv/bin/uvicorn config.asgi:application
  … --loop uvloop --http httptools --workers N``), ``CONN_MAX_AGE=60``, the upstream set to the fake;
* the floor (``bench/floor_proxy.py``, unless ``--no-floor``): a bare ASGI app under the same uvicorn
  command that does only the database and upstream work a metered request cannot skip — the hold's
  statement, the upstream call, the settlement's statement — with no framework and none of
  Tokentill's rules. Each proxied row is followed by a ``floor`` row: the same requests through it.
  Its "added" is what this machine charges for those hops and writes; Tokentill's minus the
  floor's is what Tokentill's own code costs;
* the load generator, in this process: a minimal HTTP/1.1 client over raw asyncio streams, one
  keep-alive connection per worker, closed loop (a worker sends its next request when the last one
  has been read to the end). Its CPU per request is small and the same for direct and proxied runs.

For each profile, mode (non-streamed ``whole`` / ``stream``) and concurrency, the same requests are
sent straight to the fake upstream ("direct") and through Tokentill ("proxied"), each run after a
warm-up on the same connections. Latency is from writing the request to reading the last byte of
the body (for streams: after the settlement, which the proxy finishes before its final SSE line).
"added p50/p99" is the difference of the percentiles, proxied minus direct. CPU per request is
measured over the timed proxied run only: the server (every uvicorn process, workers included, from
/proc), PostgreSQL (every ``postgres`` process, from /proc — approximate: it counts anything else the
database server does meanwhile) and the load generator (this process); "busy" is the server's CPU as
a share of one core over the run — near 100 % with one worker, latency is queueing for that core.
At low request rates every process's CPU per request also carries the cost of waking up from idle
(on these VMs about 0.1–0.2 ms a wake-up, seen in the load generator and the fake upstream too), so
realistic rows at concurrency 1 read higher than instant ones: the loaded instant rows are the
figure for CPU per request.

Why two profiles:

* ``instant`` — the upstream answers at once. At concurrency 16 and 64 the closed loop then drives
  the 2 CPUs to saturation, so latencies there are queueing behind everything on the machine (load
  generator, fake upstream, PostgreSQL, server) and say little about one request. What this profile
  measures is throughput (proxied req/s at saturation) and CPU per request; its concurrency-1 row is
  the unloaded per-request cost.
* ``realistic`` — 50 ms to the first byte; streams 50 ms, then 10 ms between the 9 SSE events
  (~130 ms in all). That is *shorter* than any real LLM call (hundreds of milliseconds to seconds),
  so it flatters nothing: the offered load is concurrency ÷ upstream time, and a longer upstream
  offers the server less at the same concurrency. (At 50 ms, concurrency 16 offers ~320 req/s of
  non-streamed calls — about what one uvicorn worker serves flat out, so watch "busy"; with real
  call times, say ``--upstream-ms 1000``, the same 16 in flight offer 16 req/s.) Here concurrency
  means requests in flight, as an app's agent loops create them, and "added" is what the proxy
  adds to each of them. Workers start staggered across one upstream period
  (``--no-stagger`` starts them together): with a fixed upstream delay, workers started together
  stay in lockstep and hit the server in bursts of ``conc`` simultaneous requests, which real
  independent clients do not do.

Request counts: ``--requests`` per run (default 400), except that a realistic run is cut to fit
about ``--run-seconds`` (default 8) of upstream time, never below 100 requests — at concurrency 1
that is 160 non-streamed / 100 streamed requests — so the default run (both profiles, both modes,
concurrency 1, 16, 64) takes under two minutes. The row's ``n`` column shows the count used.

At the end, in this process, ``manage.py verify_ledger`` runs against the scratch database and each
wallet is checked to have been debited exactly the sum of its usage records' charges, with a settled
("ok") record for every request sent through Tokentill or the floor, none pending and no active
hold. Exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench/model"
FUNDING = 10**18  # nanodollars credited to the bench wallet; never the constraint
REQUEST_TIMEOUT = 60  # seconds; a request slower than this aborts the benchmark
COMPLETION = json.dumps(
    {
        "id": "gen-bench",
        "object": "chat.completion",
        "created": 1761300000,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Pong."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14, "cost": 0.0000123},
    }
).encode()


def _event(delta: dict, finish=None) -> bytes:
    body = {"id": "gen-bench", "object": "chat.completion.chunk", "model": MODEL}
    body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return b"data: " + json.dumps(body).encode() + b"\n\n"


STREAM_EVENTS = [
    _event({"role": "assistant", "content": ""}),
    *(_event({"content": w}) for w in ["Po", "ng", ".", " Done", "."]),
    _event({}, "stop"),
    b'data: {"id":"gen-bench","object":"chat.completion.chunk","model":"bench/model","choices":[],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"cost":0.0000123}}\n\n',
    b"data: [DONE]\n\n",
]
STREAM_END = b"data: [DONE]\n\n"


# --- HTTP/1.1 over raw asyncio streams (both the fake upstream and the load generator) -----------


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes]]:
    """The start line and the headers (names lower-cased) of a request or a response."""
    lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
            parts.append((await reader.readexactly(size + 2))[:-2])
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, if any
            pass
        return b"".join(parts)
    if b"content-length" in headers:
        return await reader.readexactly(int(headers[b"content-length"]))
    return await reader.read()  # delimited by the connection closing


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# --- the fake upstream ---------------------------------------------------------------------------


class FakeUpstream:
    """Answers chat completions after ``ttfb`` seconds; stream events ``gap`` seconds apart.

    ``POST /_bench/delays`` with ``{"upstream_ms": …, "chunk_ms": …}`` switches the delays, so one
    process (and the proxy's pooled connections to it) serves every profile. ``GET`` is a health check.
    """

    def __init__(self) -> None:
        self.ttfb = self.gap = 0.0

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        try:
            while True:
                try:
                    start, headers = await _read_head(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, path, _ = start.split(b" ", 2)
                body = await reader.readexactly(int(headers.get(b"content-length", 0)))
                await self.respond(writer, method, path, body)
                await writer.drain()
                if headers.get(b"connection", b"").lower() == b"close":
                    return
        finally:
            writer.close()

    async def respond(self, writer: asyncio.StreamWriter, method: bytes, path: bytes, body: bytes) -> None:
        if method == b"POST" and path.endswith(b"/chat/completions"):
            stream = json.loads(body or b"{}").get("stream") is True
            if self.ttfb:
                await asyncio.sleep(self.ttfb)
            if not stream:
                writer.write(_head(200, "application/json", len(COMPLETION)) + COMPLETION)
                return
            writer.write(_head(200, "text/event-stream") + _chunk(STREAM_EVENTS[0]))
            for event in STREAM_EVENTS[1:]:
                if self.gap:
                    await writer.drain()
                    await asyncio.sleep(self.gap)
                # The zero-length chunk that ends the body goes with the last event, as soon as it.
                writer.write(_chunk(event) + (b"0\r\n\r\n" if event is STREAM_EVENTS[-1] else b""))
        elif method == b"POST" and path == b"/_bench/delays":
            delays = json.loads(body)
            self.ttfb, self.gap = delays["upstream_ms"] / 1000, delays["chunk_ms"] / 1000
            writer.write(_head(200, "application/json", 2) + b"{}")
        elif method == b"GET":
            writer.write(_head(200, "text/plain", 2) + b"ok")
        else:
            writer.write(_head(404, "text/plain", 9) + b"not found")


def _head(status: int, content_type: str, length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    reason = {200: "OK", 404: "Not Found"}[status]
    return f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode()


def serve_upstream(port: int) -> None:
    async def serve() -> None:
        server = await asyncio.start_server(FakeUpstream().connection, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    run_async(serve())


# --- the load generator --------------------------------------------------------------------------


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str

    def request(self, body: bytes, token: str) -> bytes:
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection: write a request, read its whole response."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.target.host, self.target.port)
        _nodelay(self.writer)

    async def send(self, raw: bytes, *, stream: bool) -> None:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            self.writer.write(raw)
            start, headers = await _read_head(self.reader)
            body = await _read_body(self.reader, headers)
        status = int(start.split(b" ", 2)[1])
        if status != 200:
            raise BenchError(f"{self.target.path}: HTTP {status}: {body[:500].decode(errors='replace')}")
        if stream and not body.endswith(STREAM_END):
            raise BenchError(f"{self.target.path}: stream did not end with [DONE]: …{body[-300:]!r}")
        delimited = b"content-length" in headers or headers.get(b"transfer-encoding", b"").lower() == b"chunked"
        if not delimited or headers.get(b"connection", b"").lower() == b"close":
            await self.close()
            await self.open()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()


def request_body(stream: bool) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}], "max_tokens": 64}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


@dataclass
class Result:
    latencies: list[float]  # ms
    seconds: float  # wall time of the timed part
    cpu: dict[str, float]  # seconds of CPU over the timed part, by what

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds


async def closed_loop(
    target: Target,
    tokens: list[str],
    *,
    stream: bool,
    concurrency: int,
    total: int,
    warmup: int,
    stagger: float,
    meters: dict,
) -> Result:
    """``concurrency`` workers, one connection each, share ``total`` requests after ``warmup`` untimed ones;
    worker ``i`` sends with ``tokens[i % len(tokens)]``."""
    body = request_body(stream)
    raws = [target.request(body, tokens[i % len(tokens)]) for i in range(concurrency)]
    connections = [Connection(target) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in connections))
    latencies: list[float] = []
    remaining = warmup

    async def worker(index: int, connection: Connection, timed: bool) -> None:
        nonlocal remaining
        if timed and stagger:
            await asyncio.sleep(stagger * index / concurrency)
        while remaining > 0:
            remaining -= 1
            began = time.perf_counter()
            await connection.send(raws[index], stream=stream)
            if timed:
                latencies.append((time.perf_counter() - began) * 1000)

    try:
        await asyncio.gather(*(worker(i, c, False) for i, c in enumerate(connections)))
        remaining = total
        before = {name: meter() for name, meter in meters.items()}
        began = time.perf_counter()
        await asyncio.gather(*(worker(i, c, True) for i, c in enumerate(connections)))
        elapsed = time.perf_counter() - began
        cpu = {name: meter() - before[name] for name, meter in meters.items()}
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    return Result(latencies, elapsed, cpu)


def run_async(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# --- CPU accounting from /proc -------------------------------------------------------------------


def _processes() -> dict[int, tuple[str, int, float]]:
    """pid → (command name, parent pid, CPU seconds of the process and of its reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime, stime, cutime, cstime: a child's CPU moves into its parent's c* fields when it is
        # reaped, so the sum over live processes also counts children that exited meanwhile.
        found[int(entry.name)] = (name, int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    return found


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and all its descendants (uvicorn's supervisor and its workers)."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            total += procs[pid][2]
            todo.extend(children.get(pid, []))
    return total


def postgres_cpu() -> float:
    """CPU seconds of every ``postgres`` process (postmaster, backends, background workers)."""
    return sum(cpu for name, _, cpu in _processes().values() if name == "postgres")


# --- setup ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 30) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an environment proxy
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{url}: process exited with {proc.returncode}")
        try:
            opener.open(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{url} did not come up")


def set_delays(port: int, upstream_ms: float, chunk_ms: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    body = json.dumps({"upstream_ms": upstream_ms, "chunk_ms": chunk_ms}).encode()
    opener.open(urllib.request.Request(f"http://127.0.0.1:{port}/_bench/delays", data=body), timeout=5).read()


def prepare_database(pg: str, name: str, users: int) -> tuple[str, list[str]]:
    """Scratch database, migrated, with ``users`` funded users, an API key each and the bench model's price."""
    import psycopg

    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise BenchError(f"--db-name must be a plain lower-case identifier, not {name!r}")
    try:
        with psycopg.connect(f"{pg}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
    except psycopg.Error as exc:
        raise BenchError(f"cannot prepare {name} on {pg}: {exc}")
    url = f"{pg}/{name}"
    os.environ.update(DATABASE_URL=url, DJANGO_SETTINGS_MODULE="config.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from decimal import Decimal

    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", verbosity=0)
    from accounts.services import api_key_create, user_signup
    from proxy.models import ModelPrice
    from wallet.models import EntryKind
    from wallet.services import wallet_credit

    ModelPrice.objects.create(model=MODEL, prompt=Decimal("0.15"), completion=Decimal("0.60"))
    tokens = []
    for n in range(users):
        user = user_signup(email=f"bench{n}@example.com", password="bench bench bench")
        wallet_credit(wallet=user.wallet, amount=FUNDING, kind=EntryKind.TOP_UP, idempotency_key="bench")
        tokens.append(api_key_create(user=user, name="bench")[1])
    connections.close_all()  # nothing of ours stays connected while the server is measured
    return url, tokens


def check_ledger(proxied_requests: int) -> bool:
    """verify_ledger, then: every proxied request settled once, the wallet debited exactly Σ charges."""
    from django.core.management import CommandError, call_command
    from django.db.models import Count, Sum

    from core.money import format_usd
    from proxy.models import UsageRecord, UsageStatus
    from wallet.models import Entry, EntryKind, Hold, HoldStatus, Wallet

    print("\nmanage.py verify_ledger:", flush=True)
    try:
        call_command("verify_ledger")
        verified = True
    except CommandError as exc:
        print(f"  FAILED: {exc}")
        verified = False
    wallets = list(Wallet.objects.filter(user__email__startswith="bench"))
    records = UsageRecord.objects.all()
    by_status = dict(records.values_list("status").annotate(n=Count("id")).order_by())
    by_source = dict(records.values_list("cost_source").annotate(n=Count("id")).order_by())
    charged_by_user = dict(records.values_list("user").annotate(total=Sum("charge")).order_by())
    charged = sum(charged_by_user.values())
    usage = Entry.objects.filter(kind=EntryKind.USAGE).aggregate(total=Sum("amount"), n=Count("id"))
    active_holds = Hold.objects.filter(status=HoldStatus.ACTIVE).count()
    debited = sum(FUNDING - wallet.balance for wallet in wallets)
    held = sum(wallet.held for wallet in wallets)
    checks = {
        f"a usage record for each of the {proxied_requests} proxied requests": records.count() == proxied_requests,
        "every record settled ok (none pending, cancelled or failed)": by_status == {UsageStatus.OK: proxied_requests},
        "each wallet debited exactly Σ its records' charges": all(
            FUNDING - wallet.balance == charged_by_user.get(wallet.user_id, 0) for wallet in wallets
        ),
        "Σ usage entries = −Σ record charges": -(usage["total"] or 0) == charged,
        "no active holds, nothing held": active_holds == 0 and held == 0,
        "verify_ledger passed": verified,
    }
    print(
        f"\nLedger check: {records.count()} usage records {by_status}, cost sources {by_source}; "
        f"{usage['n']} usage entries; Σ charges ${format_usd(charged)}; {len(wallets)} wallets debited "
        f"${format_usd(debited)}; {active_holds} active holds, held ${format_usd(held)}"
    )
    for label, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {label}")
    exact = all(checks.values())
    print("Ledger exact." if exact else "LEDGER NOT EXACT.")
    return exact


# --- the benchmark -------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Bench:
    direct: Target
    proxied: Target
    floor: Target | None  # bench/floor_proxy.py, or None with --no-floor
    tokens: list[str]
    upstream_port: int
    servers: dict  # target → the pid of the process serving it (for its CPU)
    proxied_requests: int = 0  # every request sent through Tokentill or the floor, warm-ups included

    def run(self, target: Target, **kw) -> Result:
        meters = {"postgres": postgres_cpu, "client": time.process_time}
        if target in self.servers:
            meters["server"] = lambda: tree_cpu(self.servers[target])
        result = run_async(closed_loop(target, self.tokens, meters=meters, **kw))
        if target in self.servers:
            self.proxied_requests += kw["warmup"] + kw["total"]
        return result


HEADER = (
    f"{'mode':<7}{'conc':>4}{'n':>5} | {'direct p50':>10}{'p99':>8}{'req/s':>7} | {'proxy p50':>9}{'p99':>8}"
    f"{'req/s':>7} | {'added p50':>9}{'p99':>8} | {'server':>6}{'busy':>5}{'PG≈':>6}{'client':>7}"
)


def row(mode: str, concurrency: int, d: Result, p: Result) -> str:
    n = len(p.latencies)
    cpu = {name: seconds * 1000 / n for name, seconds in p.cpu.items()}
    d50, d99, p50, p99 = pct(d.latencies, 50), pct(d.latencies, 99), pct(p.latencies, 50), pct(p.latencies, 99)
    return (
        f"{mode:<7}{concurrency:>4}{n:>5} | {d50:>10.2f}{d99:>8.2f}{d.rps:>7.0f} | {p50:>9.2f}{p99:>8.2f}"
        f"{p.rps:>7.0f} | {p50 - d50:>9.2f}{p99 - d99:>8.2f} | {cpu['server']:>6.2f}"
        f"{p.cpu['server'] / p.seconds:>5.0%}{cpu['postgres']:>6.2f}{cpu['client']:>7.2f}"
    )


def run_profile(bench: Bench, profile: str, args: argparse.Namespace) -> None:
    realistic = profile == "realistic"
    upstream_ms, chunk_ms = (args.upstream_ms, args.chunk_ms) if realistic else (0, 0)
    set_delays(bench.upstream_port, upstream_ms, chunk_ms)
    if realistic:
        print(
            f"\nrealistic: {upstream_ms:g} ms to first byte; streams then {chunk_ms:g} ms between "
            f"{len(STREAM_EVENTS)} events (shorter than any real LLM call); workers start "
            f"{'together' if args.no_stagger else 'staggered over one upstream period'}"
        )
    else:
        print("\ninstant: upstream answers at once (saturation: read req/s and CPU, not latency at 16/64)")
    print(HEADER)
    for mode in args.modes:
        stream = mode == "stream"
        period = (upstream_ms + chunk_ms * (len(STREAM_EVENTS) - 1) * stream) / 1000  # upstream time, seconds
        for concurrency in args.conc:
            total = args.requests
            if realistic:  # keep a run to about --run-seconds, but never below 100 requests
                total = min(total, max(100, math.ceil(args.run_seconds * concurrency / period)))
            kw = dict(
                stream=stream,
                concurrency=concurrency,
                total=total,
                warmup=max(10, 2 * concurrency),
                stagger=0 if args.no_stagger else period,
            )
            d = bench.run(bench.direct, **kw)
            p = bench.run(bench.proxied, **kw)
            print(row(mode, concurrency, d, p), flush=True)
            if bench.floor is not None:
                print(row("floor", concurrency, d, bench.run(bench.floor, **kw)), flush=True)


def csv(kind):
    return lambda text: [kind(part) for part in text.split(",") if part]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432", help="server URL, no database")
    parser.add_argument("--db-name", default="tt_bench_proxy", help="scratch database (dropped and re-created)")
    parser.add_argument("--profiles", type=csv(str), default=["instant", "realistic"], help="instant,realistic")
    parser.add_argument("--modes", type=csv(str), default=["whole", "stream"], help="whole,stream")
    parser.add_argument("--conc", type=csv(int), default=[1, 16, 64], help="concurrencies (default 1,16,64)")
    parser.add_argument("--requests", type=int, default=400, help="timed requests per run (default 400)")
    parser.add_argument("--upstream-ms", type=float, default=50, help="realistic: time to first byte (default 50)")
    parser.add_argument("--chunk-ms", type=float, default=10, help="realistic: gap between SSE events (default 10)")
    parser.add_argument("--run-seconds", type=float, default=8, help="realistic: upstream time per run (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn --workers (default 1)")
    parser.add_argument(
        "--users", type=int, default=1, help="users (wallets) the workers take turns with (default 1: one hot wallet)"
    )
    parser.add_argument("--no-stagger", action="store_true", help="realistic: start a run's workers together")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor rows (bench/floor_proxy.py)")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for option, allowed in (("profiles", {"instant", "realistic"}), ("modes", {"whole", "stream"})):
        if not getattr(args, option) or not set(getattr(args, option)) <= allowed:
            parser.error(f"--{option}: choose from {','.join(sorted(allowed))}")
    if not args.conc or min(args.conc) < 1 or args.requests < 1 or args.users < 1:
        parser.error("--conc, --requests and --users must be positive")
    return args


def machine_speed() -> str:
    """A fixed slice of Python work timed in CPU time, best of five — the same figure on the same
    machine whatever else the benchmark does, so two runs' tables can be told apart from two
    machines' (or one shared VM's busy and quiet hours)."""
    best = float("inf")
    for _ in range(5):
        began = time.process_time()
        total = 0
        for i in range(200_000):
            total += i * i
        json.dumps({"values": list(range(2000))})
        best = min(best, time.process_time() - began)
    return f"{best * 1000:.1f} ms for the reference loop"


def loopback_round_trip() -> str:
    """The wall time of one small request/response between two processes over loopback TCP (Nagle
    off), best of three runs of 5,000 back to back: what the kernel and the VM charge for each
    exchange. The proxied path makes four more of them than the direct one — three statements to
    PostgreSQL and the hop through the server — so this is the floor under "added" that no code
    in the server can remove, and it need not move with the reference loop (it is mostly kernel
    and hypervisor time)."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    child = os.fork()
    if child == 0:  # the echo side
        conn, _ = listener.accept()
        while data := conn.recv(64):
            conn.sendall(data)
        os._exit(0)
    listener.close()
    with socket.create_connection(address) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        best = float("inf")
        for _ in range(3):
            began = time.perf_counter()
            for _ in range(5000):
                conn.sendall(b"x" * 32)
                conn.recv(64)
            best = min(best, (time.perf_counter() - began) / 5000)
    os.waitpid(child, 0)
    return f"{best * 1e6:.0f} µs for a loopback TCP round trip"


def main() -> int:
    args = parse_args()
    # The scratch database and the servers run on what this script sets, never a developer's .env
    # (whose trial credit, say, would put every wallet off the funding the ledger check expects).
    os.environ["TOKENTILL_DOTENV"] = "off"
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    try:
        database_url, tokens = prepare_database(args.pg, args.db_name, args.users)
    except BenchError as exc:
        print(exc, file=sys.stderr)
        return 1
    up_port, tt_port, floor_port = free_port(), free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(up_port)])
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CONN_MAX_AGE": "60",  # persistent connections, as a production deployment would run
        "UPSTREAM_BASE_URL": f"http://127.0.0.1:{up_port}/api/v1",
        "UPSTREAM_API_KEY": "sk-bench",
        "UPSTREAM_KIND": "openrouter",
        "LOG_LEVEL": "WARNING",
    }
    env.pop("REDIS_URL", None)
    server_log = tempfile.NamedTemporaryFile(prefix="tt-bench-uvicorn-", suffix=".log", delete=False)
    # The shipped server command, verbatim.
    command = [".venv/bin/uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(tt_port)]
    command += ["--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio"]
    command += ["--ws-per-message-deflate", "false", "--lifespan", "off"]
    command += ["--no-access-log", "--workers", str(args.workers)]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=server_log, stderr=subprocess.STDOUT)
    processes = [server, upstream]
    bench = Bench(
        direct=Target("127.0.0.1", up_port, "/api/v1/chat/completions"),
        proxied=Target("127.0.0.1", tt_port, "/v1/chat/completions"),
        floor=None if args.no_floor else Target("127.0.0.1", floor_port, "/v1/chat/completions"),
        tokens=tokens,
        upstream_port=up_port,
        servers={},
    )
    bench.servers[bench.proxied] = server.pid
    if bench.floor is not None:
        # The same uvicorn command, serving the floor instead of Tokentill.
        floor_command = [part if part != "config.asgi:application" else "floor_proxy:application" for part in command]
        floor_command[floor_command.index(str(tt_port))] = str(floor_port)
        floor_command += ["--app-dir", str(ROOT / "bench")]
        floor = subprocess.Popen(
            floor_command, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=server_log, stderr=subprocess.STDOUT
        )
        processes.append(floor)
        bench.servers[bench.floor] = floor.pid
    exit_code = 0
    try:
        wait_for(f"http://127.0.0.1:{up_port}/", upstream)
        wait_for(f"http://127.0.0.1:{tt_port}/healthz", server)
        if bench.floor is not None:
            wait_for(f"http://127.0.0.1:{floor_port}/", processes[-1])
        # The first requests after start pay imports, connections and caches: keep them out of every run.
        for target in bench.servers:
            for stream in (False, True):
                bench.run(target, stream=stream, concurrency=4, total=0, warmup=40, stagger=0)
        print(
            f"{os.cpu_count()} CPUs, PostgreSQL, uvicorn --workers {args.workers}; "
            "latencies in ms, CPU in ms per proxied request"
        )
        print(f"machine speed: {machine_speed()} (compare runs only at similar speeds: shared VMs drift)")
        print(f"machine speed: {loopback_round_trip()} (the proxied path makes 4 more per request than direct)")
        for profile in args.profiles:
            run_profile(bench, profile, args)
        print(
            "\nserver = CPU of all uvicorn processes, busy = the same as a share of one core over the run; "
            "PG≈ = CPU of all\npostgres processes (approximate: includes anything else the database server did); "
            "client = this load generator"
        )
    except BenchError as exc:
        print(f"\nABORTED: {exc}", file=sys.stderr)
        exit_code = 1
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)
        server_log.close()
    sys.stdout.flush()
    log_lines = [line for line in Path(server_log.name).read_text().splitlines() if not line.startswith("INFO:")]
    if log_lines:
        print(f"\nserver log ({server_log.name}), {len(log_lines)} lines besides uvicorn's INFO:", file=sys.stderr)
        print("\n".join(log_lines[:40]), file=sys.stderr, flush=True)
    else:
        os.unlink(server_log.name)
    if not check_ledger(bench.proxied_requests):
        exit_code = 1
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
