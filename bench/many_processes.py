"""Does a second worker process buy throughput? One run, 1 and 2 uvicorn workers side by side.

    .venv/bin/python bench/many_processes.py [--workers 1,2] [--conc 64] [--requests 3000] [--users 64]
        [--mode whole|stream] [--upstream-ms 0] [--redis redis://127.0.0.1:6379/0] [--db-name tt_bench_procs]

The pieces are ``bench/proxy_overhead.py``'s (its scratch database, fake upstream, closed-loop load
generator and /proc CPU meters); what this adds is the shipped command at each ``--workers`` count
(``WEB_CONCURRENCY`` in ``scripts/run``), with ``REDIS_URL`` set for every count — more than one
worker needs it, and one worker pays the same Redis round trips, so the comparison is fair.

For each worker count: the server is started, warmed up, and ``--requests`` billed requests are sent
by ``--conc`` closed-loop connections (``--users`` funded users, default 64: spread wallets, as
many apps are; ``--users 1`` is the one-hot-wallet case, where a wallet's row lock serialises the
holds whatever the process count). Printed: req/s, p50/p99 latency, and CPU per request of every
party on the machine — the server (all uvicorn processes), PostgreSQL, Redis, the fake upstream and
this load generator — plus the whole machine's busy share (/proc/stat, so other tenants of a shared
VM show up as "other").

The ceiling: with every core busy, req/s cannot exceed cores ÷ (CPU per request of every party the
request needs: server, PostgreSQL, Redis, fake upstream, load generator). On a 2-core machine
those share the cores with the server, so a second worker can only take what they leave: the
"ceiling" column is that bound (other tenants of the machine — "other" — lower it further), and
the ratio of the two rows is to be read against it, not against 2.

At the end the ledger is checked as ``proxy_overhead.py`` does (every request settled once,
``verify_ledger`` clean).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import proxy_overhead as po

ROOT = Path(__file__).resolve().parent.parent


def machine_cpu() -> float:
    """CPU seconds the whole machine spent busy (every core; /proc/stat, idle and iowait excluded)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def named_cpu(name: str) -> float:
    return sum(cpu for each, _, cpu in po._processes().values() if each == name)


def database_cpu(database: str) -> float:
    """CPU seconds of the PostgreSQL backends serving ``database`` (their command line names it):
    on a shared machine, every ``postgres`` process would count other tenants' queries too. The
    server-wide processes (WAL writer, checkpointer) are left out: a small under-count."""
    total = 0.0
    for pid, (name, _, cpu) in po._processes().items():
        if name == "postgres":
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f" {database} ".encode() in cmdline:
                total += cpu
    return total


def run_workers(workers: int, args, env: dict, tokens: list[str], upstream_pid: int) -> tuple[po.Result, int]:
    port = po.free_port()
    command = [".venv/bin/uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio"]
    command += ["--ws-per-message-deflate", "false", "--lifespan", "off"]
    command += ["--no-access-log", "--workers", str(workers)]
    log = tempfile.NamedTemporaryFile(prefix=f"tt-bench-procs-{workers}-", suffix=".log", delete=False)
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    target = po.Target("127.0.0.1", port, "/v1/chat/completions")
    stream = args.mode == "stream"
    try:
        po.wait_for(f"http://127.0.0.1:{port}/healthz", server)
        # Warm every worker: imports, pools and caches are per process, and which worker a new
        # connection lands on is the kernel's choice, so warm with more connections than workers.
        po.run_async(
            po.closed_loop(
                target,
                tokens,
                stream=stream,
                concurrency=args.conc,
                total=0,
                warmup=10 * args.conc,
                stagger=0,
                meters={},
            )
        )
        meters = {
            "server": lambda: po.tree_cpu(server.pid),
            "postgres": lambda: database_cpu(args.db_name),
            "redis": lambda: named_cpu("redis-server"),
            "upstream": lambda: po.tree_cpu(upstream_pid),
            "client": time.process_time,
            "machine": machine_cpu,
        }
        warmup = 2 * args.conc
        result = po.run_async(
            po.closed_loop(
                target,
                tokens,
                stream=stream,
                concurrency=args.conc,
                total=args.requests,
                warmup=warmup,
                stagger=0,
                meters=meters,
            )
        )
        return result, 10 * args.conc + warmup + args.requests
    finally:
        server.terminate()
        server.wait(10)
        log.close()
        lines = [line for line in Path(log.name).read_text().splitlines() if not line.startswith("INFO:")]
        if lines:
            print(f"server log ({log.name}):\n" + "\n".join(lines[:20]), file=sys.stderr)
        else:
            os.unlink(log.name)


HEADER = (
    f"{'workers':>7}{'req/s':>8}{'p50':>8}{'p99':>8} | {'server':>6}{'PG':>6}{'redis':>6}{'upstr':>6}{'client':>7}"
    f"{'other':>6}{'all':>6} | {'machine':>7}{'ceiling':>8}"
)


def row(workers: int, result: po.Result, cores: int) -> str:
    n = len(result.latencies)
    per = {name: seconds * 1000 / n for name, seconds in result.cpu.items()}
    parties = sum(per[name] for name in ("server", "postgres", "redis", "upstream", "client"))
    other = max(0.0, per["machine"] - parties)
    busy = result.cpu["machine"] / result.seconds / cores
    ceiling = cores * 1000 / parties  # req/s if these parties had every core to themselves
    return (
        f"{workers:>7}{result.rps:>8.0f}{po.pct(result.latencies, 50):>8.1f}{po.pct(result.latencies, 99):>8.1f} | "
        f"{per['server']:>6.2f}{per['postgres']:>6.2f}{per['redis']:>6.2f}{per['upstream']:>6.2f}{per['client']:>7.2f}"
        f"{other:>6.2f}{per['machine']:>6.2f} | {busy:>7.0%}{ceiling:>8.0f}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432", help="server URL, no database")
    parser.add_argument("--db-name", default="tt_bench_procs", help="scratch database (dropped and re-created)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="REDIS_URL for every worker count")
    parser.add_argument("--workers", type=po.csv(int), default=[1, 2], help="worker counts (default 1,2)")
    parser.add_argument("--conc", type=int, default=64, help="connections in flight (default 64)")
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per worker count (default 3000)")
    parser.add_argument("--users", type=int, default=64, help="funded users the connections take turns with")
    parser.add_argument("--mode", choices=["whole", "stream"], default="whole")
    parser.add_argument("--upstream-ms", type=float, default=0, help="fake upstream's time to first byte")
    args = parser.parse_args()
    if not args.workers or min(args.workers) < 1 or args.conc < 1 or args.requests < 1 or args.users < 1:
        parser.error("--workers, --conc, --requests and --users must be positive")
    return args


def main() -> int:
    args = parse_args()
    os.environ["TOKENTILL_DOTENV"] = "off"
    try:
        database_url, tokens = po.prepare_database(args.pg, args.db_name, args.users)
    except po.BenchError as exc:
        print(exc, file=sys.stderr)
        return 1
    up_port = po.free_port()
    upstream = subprocess.Popen([sys.executable, po.__file__, "--serve-upstream", str(up_port)])
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CONN_MAX_AGE": "60",
        "UPSTREAM_BASE_URL": f"http://127.0.0.1:{up_port}/api/v1",
        "UPSTREAM_API_KEY": "sk-bench",
        "UPSTREAM_KIND": "openrouter",
        "LOG_LEVEL": "WARNING",
        "REDIS_URL": args.redis,
        "REDIS_PREFIX": f"tt-bench-{uuid.uuid4().hex[:8]}",
    }
    cores = os.cpu_count() or 1
    sent = 0
    results: dict[int, po.Result] = {}
    exit_code = 0
    try:
        po.wait_for(f"http://127.0.0.1:{up_port}/", upstream)
        po.set_delays(up_port, args.upstream_ms, 0)
        print(
            f"{cores} CPUs; {args.mode} requests, concurrency {args.conc}, {args.requests} timed per row, "
            f"{args.users} users, upstream {args.upstream_ms:g} ms; load average {os.getloadavg()[0]:.2f} before"
        )
        print(f"machine speed: {po.machine_speed()}")
        print("CPU in ms per request; latency in ms\n")
        print(HEADER, flush=True)
        for workers in args.workers:
            result, count = run_workers(workers, args, env, tokens, upstream.pid)
            sent += count
            results[workers] = result
            print(row(workers, result, cores), flush=True)
        if len(results) > 1:
            base = min(results)
            for workers, result in results.items():
                if workers != base:
                    print(f"\n{workers} workers ÷ {base}: {result.rps / results[base].rps:.2f}× the throughput")
        print(
            "\nserver = every uvicorn process; PG = the scratch database's backends; upstream = the fake upstream; "
            "client = this load generator;\nother = the rest of the machine (kernel, other tenants); all = the "
            "machine's busy CPU per request;\nmachine = busy share of all cores; ceiling = cores ÷ (server + PG + "
            "redis + upstream + client): the req/s these parties could reach with every core to themselves"
        )
    except po.BenchError as exc:
        print(f"\nABORTED: {exc}", file=sys.stderr)
        exit_code = 1
    finally:
        upstream.terminate()
        upstream.wait(10)
    if not po.check_ledger(sent):
        exit_code = 1
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
