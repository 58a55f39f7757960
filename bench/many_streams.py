"""1,000 streams open at once through one server process: its memory, its errors, its bills.

    .venv/bin/python bench/many_streams.py [--streams 1000] [--chunk-ms 1000] [--db-name tt_bench_streams]

One uvicorn process (the shipped command, ``--workers 1``) proxies ``--streams`` streamed chat
completions that are all open at the same time: the fake upstream (``bench/proxy_overhead.py``'s)
answers each at once, then sends its 9 SSE events ``--chunk-ms`` apart (default 1 s: each stream
stays open about 8 s). The load generator opens one connection per stream, starting them evenly
over ``--ramp-seconds`` (default 4 s, shorter than a stream, so every one is open while the last
are admitted; 0 sends all 1,000 in the same instant, when the hot path's 20 database connections
must take 1,000 holds within ``PROXY_DB_POOL_TIMEOUT``), and reads each to its ``[DONE]``.

``UPSTREAM_MAX_CONNECTIONS`` is set to the stream count (its default, 200, would queue the rest
behind the first 200: README, Deploying at scale); the open-file limit is raised to its hard limit
(a stream is two sockets in the server: the client's and the upstream's).

Printed: the server's resident memory before, at its peak (``VmHWM``) and after; how long the
streams took against the upstream's own duration; errors (any status but 200, any stream that did
not end with ``[DONE]``); the server's CPU. Then the ledger: a settled usage record and a usage
entry for every stream, each wallet debited exactly its records' charges, ``verify_ledger`` clean.
Target (issue 17): RSS ≤ 300 MB, no errors, every request billed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import proxy_overhead as po

ROOT = Path(__file__).resolve().parent.parent
RSS_TARGET_MB = 300


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def raise_open_files() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it
    return hard


async def open_streams(
    target: po.Target, tokens: list[str], count: int, ramp: float = 0.0
) -> tuple[list[float], list[str]]:
    """``count`` streams, each on its own connection, started evenly over ``ramp`` seconds; their
    durations (s) and the errors."""
    body = po.request_body(stream=True)
    durations: list[float] = []
    errors: list[str] = []

    async def one(index: int) -> None:
        await asyncio.sleep(ramp * index / count)
        connection = po.Connection(target)
        began = time.perf_counter()
        try:
            await connection.open()
            await connection.send(target.request(body, tokens[index % len(tokens)]), stream=True)
            durations.append(time.perf_counter() - began)
        except (po.BenchError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
        finally:
            await connection.close()

    await asyncio.gather(*(one(i) for i in range(count)))
    return durations, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432", help="server URL, no database")
    parser.add_argument("--db-name", default="tt_bench_streams", help="scratch database (dropped and re-created)")
    parser.add_argument("--streams", type=int, default=1000, help="streams open at once (default 1000)")
    parser.add_argument("--chunk-ms", type=float, default=1000, help="gap between a stream's events (default 1000)")
    parser.add_argument("--users", type=int, default=10, help="funded users the streams take turns with")
    parser.add_argument(
        "--ramp-seconds", type=float, default=4, help="start the streams evenly over this long (default 4; 0 = at once)"
    )
    args = parser.parse_args()
    # A terminated run still stops the server it started (the finally blocks below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    os.environ["TOKENTILL_DOTENV"] = "off"
    open_files = raise_open_files()
    try:
        database_url, tokens = po.prepare_database(args.pg, args.db_name, args.users)
    except po.BenchError as exc:
        print(exc, file=sys.stderr)
        return 1
    up_port, port = po.free_port(), po.free_port()
    upstream = subprocess.Popen([sys.executable, po.__file__, "--serve-upstream", str(up_port)])
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CONN_MAX_AGE": "60",
        "UPSTREAM_BASE_URL": f"http://127.0.0.1:{up_port}/api/v1",
        "UPSTREAM_API_KEY": "sk-bench",
        "UPSTREAM_KIND": "openrouter",
        "UPSTREAM_MAX_CONNECTIONS": str(args.streams),
        "LOG_LEVEL": "WARNING",
    }
    env.pop("REDIS_URL", None)
    command = [".venv/bin/uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio"]
    command += ["--ws-per-message-deflate", "false", "--lifespan", "off"]
    command += ["--no-access-log", "--workers", "1", "--backlog", str(max(2048, args.streams * 2))]
    log = tempfile.NamedTemporaryFile(prefix="tt-bench-streams-", suffix=".log", delete=False)
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    target = po.Target("127.0.0.1", port, "/v1/chat/completions")
    sent = 0
    exit_code = 0
    try:
        po.wait_for(f"http://127.0.0.1:{up_port}/", upstream)
        po.wait_for(f"http://127.0.0.1:{port}/healthz", server)
        po.set_delays(up_port, 0, 0)
        warm = po.run_async(open_streams(target, tokens, 20))  # imports, pools, caches
        sent += 20
        if warm[1]:
            raise po.BenchError(f"warm-up failed: {warm[1][0]}")
        po.set_delays(up_port, 0, args.chunk_ms)
        expected = args.chunk_ms * (len(po.STREAM_EVENTS) - 1) / 1000
        before_kb = status_kb(server.pid, "VmRSS")
        cpu_before = po.tree_cpu(server.pid)
        peak = {"kb": before_kb}
        done = threading.Event()

        def sample() -> None:  # VmHWM is the peak too; sampling also shows RSS while all are open
            while not done.wait(0.1):
                peak["kb"] = max(peak["kb"], status_kb(server.pid, "VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.perf_counter()
        durations, errors = po.run_async(open_streams(target, tokens, args.streams, args.ramp_seconds))
        elapsed = time.perf_counter() - began
        done.set()
        sampler.join()
        sent += len(durations)  # a refused stream (an error above) is never billed: nothing was held
        cpu = po.tree_cpu(server.pid) - cpu_before
        hwm_kb = status_kb(server.pid, "VmHWM")
        after_kb = status_kb(server.pid, "VmRSS")
        print(
            f"{os.cpu_count()} CPUs, one uvicorn process, {args.streams} streams started over {args.ramp_seconds:g} s, "
            f"each {expected:g} s "
            f"of upstream events ({len(po.STREAM_EVENTS)} events {args.chunk_ms:g} ms apart); open-file limit "
            f"{open_files}; load average {os.getloadavg()[0]:.2f}"
        )
        print(f"machine speed: {po.machine_speed()}")
        ok = len(durations)
        print(f"\nstreams completed: {ok} of {args.streams}; errors: {len(errors)}")
        for error in errors[:5]:
            print(f"  {error}")
        if durations:
            print(
                f"stream duration: p50 {po.pct(durations, 50):.2f} s, p99 {po.pct(durations, 99):.2f} s, max "
                f"{max(durations):.2f} s (the upstream alone: {expected:g} s); all done in {elapsed:.1f} s"
            )
        print(
            f"server RSS: {before_kb / 1024:.0f} MB before, peak {max(peak['kb'], hwm_kb) / 1024:.0f} MB "
            f"(VmHWM), {after_kb / 1024:.0f} MB after; "
            f"{(max(peak['kb'], hwm_kb) - before_kb) / max(1, args.streams):.0f} kB per open stream"
        )
        print(f"server CPU: {cpu:.1f} s, {cpu * 1000 / max(1, ok):.2f} ms per stream")
        rss_ok = max(peak["kb"], hwm_kb) / 1024 <= RSS_TARGET_MB
        print(
            f"targets: RSS ≤ {RSS_TARGET_MB} MB {'met' if rss_ok else 'MISSED'}; "
            f"no errors {'met' if not errors else 'MISSED'}"
        )
        if errors or not rss_ok:
            exit_code = 1
    except po.BenchError as exc:
        print(f"\nABORTED: {exc}", file=sys.stderr)
        exit_code = 1
    finally:
        for process in (server, upstream):
            process.terminate()
        for process in (server, upstream):
            process.wait(10)
        log.close()
        lines = [line for line in Path(log.name).read_text().splitlines() if not line.startswith("INFO:")]
        if lines:
            print(f"\nserver log ({log.name}), {len(lines)} lines:\n" + "\n".join(lines[:20]), file=sys.stderr)
        else:
            os.unlink(log.name)
    if not po.check_ledger(sent):
        exit_code = 1
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
