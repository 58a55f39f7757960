"""10,000 idle ``/ws/events`` subscribers on one server process: its memory, and how fast a balance
change still reaches its user's sockets.

    .venv/bin/python bench/many_sockets.py [--sockets 10000] [--users 100] [--changes 5]
        [--redis redis://…] [--db-name tt_bench_sockets]

One uvicorn process (the shipped command, ``--workers 1``), with the in-memory channel layer, or
Redis's with ``--redis`` (what several processes need). The load generator (the ``websockets``
client library) opens ``--sockets`` sockets spread evenly over ``--users`` users, each
authenticated with its user's API key in the ``Authorization`` header and reading its snapshot,
``--open-concurrency`` handshakes at a time; then they sit idle. The open-file limit is raised to
its hard limit in this process and the server it starts (each socket is a descriptor on both ends).

Then ``--changes`` times, one user's balance is changed through the server (``POST
/v1/user/balance/deposit`` with an operator's billing key) and the time from sending that request
until each of the user's sockets has the balance event is measured: the slowest socket's time is
the figure. Target (issue 17): RSS ≤ 500 MB with every socket open; an event within 1 s.

The in-memory channel layer (Channels' ``InMemoryChannelLayer``) scans every channel and group
for expired messages on each ``receive``; since the sockets of a process share one layer channel
(``accounts.fanout``) that scan no longer grows with them. Pass ``--redis`` for the layer several
processes need.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import many_streams
import proxy_overhead as po

ROOT = Path(__file__).resolve().parent.parent
RSS_TARGET_MB = 500
EVENT_TARGET_S = 1.0


async def open_sockets(port: int, tokens: list[str], count: int, concurrency: int) -> tuple[dict[int, list], list[str]]:
    """``count`` sockets, socket ``i`` as user ``i % len(tokens)``; {user index: sockets}, errors."""
    from websockets.asyncio.client import connect

    gate = asyncio.Semaphore(concurrency)
    by_user: dict[int, list] = {}
    errors: list[str] = []

    async def one(index: int) -> None:
        user = index % len(tokens)
        async with gate:
            try:
                ws = await connect(
                    f"ws://127.0.0.1:{port}/ws/events",
                    additional_headers={"Authorization": f"Bearer {tokens[user]}"},
                    ping_interval=None,  # idle: the server's own pings keep it honest
                    open_timeout=60,
                )
                snapshot = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if snapshot.get("reason") != "snapshot":
                    raise po.BenchError(f"expected a snapshot, got {snapshot}")
                by_user.setdefault(user, []).append(ws)
            except Exception as exc:  # any failure to open is counted and reported, never lost
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    await asyncio.gather(*(one(i) for i in range(count)))
    return by_user, errors


async def change_and_listen(port: int, billing_key: str, email: str, sockets: list, n: int) -> tuple[float, float]:
    """Deposit to ``email`` through the server; (seconds until the deposit's answer, seconds until
    the last of ``sockets`` had the event)."""
    import httpx

    began = time.perf_counter()

    async def heard(ws) -> float:
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if event.get("reason") == "bonus":
                return time.perf_counter() - began

    listeners = [asyncio.ensure_future(heard(ws)) for ws in sockets]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as http:
        answer = await http.post(
            "/v1/user/balance/deposit",
            json={"user": email, "amount": "0.01", "kind": "bonus"},
            headers={"Authorization": f"Bearer {billing_key}", "Idempotency-Key": f"bench-sockets-{n}"},
        )
    answered = time.perf_counter() - began
    if answer.status_code != 201:
        raise po.BenchError(f"deposit: HTTP {answer.status_code}: {answer.text[:300]}")
    return answered, max(await asyncio.gather(*listeners))


async def measure(port: int, tokens: list[str], emails: list[str], billing_key: str, args, pid: int) -> dict:
    began = time.perf_counter()
    by_user, errors = await open_sockets(port, tokens, args.sockets, args.open_concurrency)
    opened_in = time.perf_counter() - began
    await asyncio.sleep(2)  # let the server settle after the handshakes before reading its memory
    figures = {
        "opened": sum(len(each) for each in by_user.values()),
        "errors": errors,
        "opened_in": opened_in,
        "rss_kb": many_streams.status_kb(pid, "VmRSS"),
        "changes": [],
    }
    for n in range(args.changes):
        user = n * max(1, len(tokens) // max(1, args.changes)) % len(tokens)
        answered, heard = await change_and_listen(port, billing_key, emails[user], by_user.get(user, []), n)
        figures["changes"].append((len(by_user.get(user, [])), answered, heard))
    for each in by_user.values():
        await asyncio.gather(*(ws.close() for ws in each), return_exceptions=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432", help="server URL, no database")
    parser.add_argument("--db-name", default="tt_bench_sockets", help="scratch database (dropped and re-created)")
    parser.add_argument("--sockets", type=int, default=10_000, help="sockets held open (default 10000)")
    parser.add_argument("--users", type=int, default=100, help="users the sockets are spread over (default 100)")
    parser.add_argument("--changes", type=int, default=5, help="balance changes timed (default 5)")
    parser.add_argument("--open-concurrency", type=int, default=200, help="handshakes in flight while opening")
    parser.add_argument("--redis", default="", help="REDIS_URL: the Redis channel layer instead of the in-memory one")
    args = parser.parse_args()
    # A terminated run still stops the server it started (the finally blocks below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    os.environ["TOKENTILL_DOTENV"] = "off"
    open_files = many_streams.raise_open_files()
    if args.sockets + 100 > open_files:
        print(f"--sockets {args.sockets} needs more than the open-file limit {open_files}", file=sys.stderr)
        return 1
    try:
        database_url, tokens = po.prepare_database(args.pg, args.db_name, args.users)
    except po.BenchError as exc:
        print(exc, file=sys.stderr)
        return 1
    from accounts.services import api_key_create, user_signup

    operator = user_signup(email="operator@example.com", password="bench bench bench")
    billing_key = api_key_create(user=operator, name="billing", scopes=["billing"])[1]
    from django.db import connections

    connections.close_all()
    emails = [f"bench{n}@example.com" for n in range(args.users)]
    port = po.free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "CONN_MAX_AGE": "60", "LOG_LEVEL": "WARNING"}
    env.pop("REDIS_URL", None)
    if args.redis:
        env.update(REDIS_URL=args.redis, REDIS_PREFIX=f"tt-bench-{uuid.uuid4().hex[:8]}")
    command = [".venv/bin/uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio"]
    command += ["--ws-per-message-deflate", "false", "--lifespan", "off"]
    command += ["--no-access-log", "--workers", "1"]
    log = tempfile.NamedTemporaryFile(prefix="tt-bench-sockets-", suffix=".log", delete=False)
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    exit_code = 0
    try:
        po.wait_for(f"http://127.0.0.1:{port}/healthz", server)
        before_kb = many_streams.status_kb(server.pid, "VmRSS")
        figures = po.run_async(measure(port, tokens, emails, billing_key, args, server.pid))
        hwm_kb = many_streams.status_kb(server.pid, "VmHWM")
        layer = "Redis" if args.redis else "in-memory"
        print(
            f"{os.cpu_count()} CPUs, one uvicorn process, {layer} channel layer; {args.sockets} sockets over "
            f"{args.users} users; open-file limit {open_files}; load average {os.getloadavg()[0]:.2f}"
        )
        print(f"machine speed: {po.machine_speed()}")
        print(
            f"\nsockets open: {figures['opened']} of {args.sockets} in {figures['opened_in']:.1f} s; "
            f"errors: {len(figures['errors'])}"
        )
        for error in figures["errors"][:5]:
            print(f"  {error}")
        rss_mb = figures["rss_kb"] / 1024
        print(
            f"server RSS: {before_kb / 1024:.0f} MB before, {rss_mb:.0f} MB with every socket open (peak "
            f"{hwm_kb / 1024:.0f} MB, VmHWM); {(figures['rss_kb'] - before_kb) / max(1, figures['opened']):.1f} kB "
            "per socket"
        )
        for sockets, answered, heard in figures["changes"]:
            print(
                f"balance change: deposit answered in {answered * 1000:.0f} ms; all {sockets} of the user's sockets "
                f"had the event after {heard * 1000:.0f} ms"
            )
        slowest = max(heard for _, _, heard in figures["changes"]) if figures["changes"] else float("inf")
        rss_ok, event_ok = rss_mb <= RSS_TARGET_MB, slowest <= EVENT_TARGET_S
        print(
            f"targets: RSS ≤ {RSS_TARGET_MB} MB {'met' if rss_ok else 'MISSED'}; an event within "
            f"{EVENT_TARGET_S:g} s {'met' if event_ok else 'MISSED'} (slowest {slowest * 1000:.0f} ms)"
        )
        if figures["errors"] or not (rss_ok and event_ok):
            exit_code = 1
    except po.BenchError as exc:
        print(f"\nABORTED: {exc}", file=sys.stderr)
        exit_code = 1
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        lines = [line for line in Path(log.name).read_text().splitlines() if not line.startswith("INFO:")]
        if lines:
            print(f"\nserver log ({log.name}), {len(lines)} lines:\n" + "\n".join(lines[:20]), file=sys.stderr)
        else:
            os.unlink(log.name)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
