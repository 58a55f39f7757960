"""How much latency does the metered proxy add? Prints p50/p99 and throughput, direct vs proxied.

    .venv/bin/python bench/proxy_overhead.py [--pg postgres://postgres@127.0.0.1:5432] [--requests 400]

Sets up a scratch PostgreSQL database (``tt_bench_proxy``, dropped and re-created), a fake
upstream (a subprocess answering fixed completions at once, so the upstream itself costs next to
nothing), and Daphne serving Tokentill against both. Then, for non-streamed and streamed chat
completions at concurrency 1, 16 and 64, it times the same requests sent straight to the fake
upstream and through Tokentill; "added" is the difference of the medians. Everything runs on
this one machine, so the load generator, Daphne, PostgreSQL and the fake upstream share its CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench/model"
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


def _chunk(delta: dict, finish=None) -> bytes:
    body = {"id": "gen-bench", "object": "chat.completion.chunk", "model": MODEL}
    body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return b"data: " + json.dumps(body).encode() + b"\n\n"


STREAM = (
    _chunk({"role": "assistant", "content": ""})
    + b"".join(_chunk({"content": w}) for w in ["Po", "ng", ".", " Done", "."])
    + _chunk({}, "stop")
    + b'data: {"id":"gen-bench","object":"chat.completion.chunk","model":"bench/model","choices":[],'
    + b'"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"cost":0.0000123}}\n\n'
    + b"data: [DONE]\n\n"
)


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm on, each reply would
    # wait ~40 ms for a delayed ACK and the "direct" baseline would measure that, not the server.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        payload, kind = (STREAM, "text/event-stream") if body.get("stream") else (COMPLETION, "application/json")
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class UpstreamServer(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog of 5 resets connections under a burst
    daemon_threads = True


def serve_upstream(port: int) -> None:
    server = UpstreamServer(("127.0.0.1", port), Upstream)
    server.serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: process exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def prepare_database(pg: str) -> tuple[str, str]:
    """Scratch database, migrated, with a funded user, an API key and the bench model's price."""
    import psycopg

    name = "tt_bench_proxy"
    with psycopg.connect(f"{pg}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    url = f"{pg}/{name}"
    os.environ.update(DATABASE_URL=url, DJANGO_SETTINGS_MODULE="config.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from decimal import Decimal

    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from accounts.services import api_key_create, user_signup
    from proxy.models import ModelPrice
    from wallet.models import EntryKind
    from wallet.services import wallet_credit

    ModelPrice.objects.create(model=MODEL, prompt=Decimal("0.15"), completion=Decimal("0.60"))
    user = user_signup(email="bench@example.com", password="bench bench bench")
    wallet_credit(wallet=user.wallet, amount=10**18, kind=EntryKind.TOP_UP, idempotency_key="bench")
    return url, api_key_create(user=user, name="bench")[1]


async def run(url: str, token: str, *, stream: bool, concurrency: int, total: int) -> tuple[list[float], float]:
    import httpx

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}], "max_tokens": 64}
    if stream:
        body["stream"] = True
    headers = {"Authorization": f"Bearer {token}"}
    latencies: list[float] = []
    queue = asyncio.Queue()
    for _ in range(total):
        queue.put_nowait(None)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker():
            while not queue.empty():
                queue.get_nowait()
                start = time.perf_counter()
                if stream:
                    async with client.stream("POST", url, json=body, headers=headers) as response:
                        async for _ in response.aiter_raw():
                            pass
                else:
                    response = await client.post(url, json=body, headers=headers)
                if response.status_code != 200:
                    raise SystemExit(f"{url}: HTTP {response.status_code} {response.read()[:200]!r}")
                latencies.append((time.perf_counter() - start) * 1000)

        # Warm up connections (and the proxy's price cache) before timing.
        for _ in range(3):
            await client.post(url, json={**body, "stream": False}, headers=headers)
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return latencies, total / elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432", help="server URL, no database")
    parser.add_argument("--requests", type=int, default=400, help="requests per scenario")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        return serve_upstream(args.serve_upstream)

    database_url, token = prepare_database(args.pg)
    up_port, tt_port = free_port(), free_port()
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
    daphne_bin = str(Path(sys.executable).with_name("daphne"))
    daphne = subprocess.Popen(
        # Launched as scripts/run launches it (no per-request access log).
        [daphne_bin, "-v", "0", "-b", "127.0.0.1", "-p", str(tt_port), "config.asgi:application"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{up_port}/", upstream)
        wait_for(f"http://127.0.0.1:{tt_port}/healthz", daphne)
        direct = f"http://127.0.0.1:{up_port}/api/v1/chat/completions"
        proxied = f"http://127.0.0.1:{tt_port}/v1/chat/completions"
        print(f"{os.cpu_count()} CPUs, PostgreSQL, {args.requests} requests per scenario; latencies in ms")
        print(
            f"{'mode':<10}{'conc':>5} | {'direct p50':>10}{'p99':>8}{'req/s':>8} | {'proxy p50':>10}{'p99':>8}"
            f"{'req/s':>8} | {'added p50':>9}{'p99':>8} | {'server CPU ms/req':>17}"
        )
        for stream in (False, True):
            for concurrency in (1, 16, 64):
                d, d_rps = asyncio.run(run(direct, token, stream=stream, concurrency=concurrency, total=args.requests))
                cpu_before = cpu_seconds(daphne.pid)
                p, p_rps = asyncio.run(run(proxied, token, stream=stream, concurrency=concurrency, total=args.requests))
                cpu_per_request = (cpu_seconds(daphne.pid) - cpu_before) * 1000 / (args.requests + 3)
                mode = "stream" if stream else "whole"
                print(
                    f"{mode:<10}{concurrency:>5} | {pct(d, 50):>10.2f}{pct(d, 99):>8.2f}{d_rps:>8.0f} | "
                    f"{pct(p, 50):>10.2f}{pct(p, 99):>8.2f}{p_rps:>8.0f} | "
                    f"{pct(p, 50) - pct(d, 50):>9.2f}{pct(p, 99) - pct(d, 99):>8.2f} | {cpu_per_request:>17.2f}",
                    flush=True,
                )
    finally:
        daphne.terminate()
        upstream.terminate()
        daphne.wait(10)
        upstream.wait(10)


if __name__ == "__main__":
    main()
