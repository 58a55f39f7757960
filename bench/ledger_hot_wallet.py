"""Benchmark: how many hold + settle pairs per second one hot wallet takes on PostgreSQL.

Every request an agent makes takes a hold on its user's wallet and settles it, so one busy user
means one contended wallet row. This runs ``--threads`` workers (default 32), each with its own
connection, doing ``hold_create`` + ``hold_settle`` in a loop on ONE wallet for ``--seconds``
(default 10), then prints pairs per second, p50/p99 latency per pair, and runs verify_ledger.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/tokentill_bench .venv/bin/python bench/ledger_hot_wallet.py

The database is created if missing and migrated; each run adds a fresh wallet, so runs never
disturb each other and verify_ledger checks the whole accumulated ledger.

What bounds it: both halves of a pair update the wallet row, and the row lock is held from that
UPDATE until the commit is flushed, so on one hot wallet every transaction queues behind the
previous one's remaining statements, its Python and its fsync. ``--processes N`` spreads the
threads over N processes, as a scaled-out deployment runs several ASGI processes (one GIL each);
``--async-commit`` takes the disk out of the measurement (not durable; never in production).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/tokentill_bench"
HOLD = 10_000_000  # $0.01 in nanodollars, a typical agent-step estimate
SETTLES = (7_000_000, 10_000_000, 12_500_000)  # actual costs below, at and above the hold
START_DELAY = 3.0  # seconds for child processes to start and connect before the clock runs


def ensure_database(url: str) -> None:
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(maintenance, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


def setup_django(async_commit: bool) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    if async_commit:
        from django.db.backends.signals import connection_created

        def no_fsync_wait(sender, connection, **kwargs):
            with connection.cursor() as cursor:
                cursor.execute("SET synchronous_commit = off")

        connection_created.connect(no_fsync_wait, weak=False)


def hammer(*, wallet_id: int, run: str, tag: str, threads: int, start_at: float, seconds: float) -> dict:
    """Run ``threads`` workers on the wallet from ``start_at`` (wall clock) for ``seconds``."""
    from django.db import connections

    from wallet.models import Wallet
    from wallet.services import InsufficientFunds, hold_create, hold_settle

    wallet = Wallet.objects.get(pk=wallet_id)
    connections.close_all()
    latencies: list[list[float]] = [[] for _ in range(threads)]
    refused = [0] * threads
    failures: list[str] = []

    def worker(index: int) -> None:
        mine = latencies[index]
        try:
            time.sleep(max(0.0, start_at - time.time()))
            end = start_at + seconds
            n = 0
            while time.time() < end:  # bounded by the deadline
                n += 1
                started = time.perf_counter()
                try:
                    hold = hold_create(wallet=wallet, amount=HOLD, request_id=f"bench-{run}-{tag}-{index}-{n}")
                except InsufficientFunds:
                    refused[index] += 1
                    continue
                hold_settle(hold=hold, amount=SETTLES[n % len(SETTLES)])
                mine.append(time.perf_counter() - started)
        except BaseException as exc:
            failures.append(repr(exc))
        finally:
            connections.close_all()

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(start_at - time.time() + seconds + 60)
    if any(thread.is_alive() for thread in pool):
        failures.append("a worker thread hung")
    return {"latencies": [x for mine in latencies for x in mine], "refused": sum(refused), "failures": failures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=32, help="worker threads in all (default 32)")
    parser.add_argument("--processes", type=int, default=1, help="spread the threads over this many processes")
    parser.add_argument(
        "--async-commit", action="store_true", help="SET synchronous_commit = off: NOT durable; isolates the disk"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "<wallet_id>:<run>:<tag>:<start_at>"
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL") or DEFAULT_URL
    if not url.startswith(("postgres://", "postgresql://")):
        print("this benchmark measures PostgreSQL row locking: set DATABASE_URL=postgres://…", file=sys.stderr)
        return 2
    os.environ["DATABASE_URL"] = url

    if args.child:
        wallet_id, run, tag, start_at = args.child.split(":")
        setup_django(args.async_commit)
        result = hammer(
            wallet_id=int(wallet_id),
            run=run,
            tag=tag,
            threads=args.threads,
            start_at=float(start_at),
            seconds=args.seconds,
        )
        json.dump(result, sys.stdout)
        return 0

    ensure_database(url)
    setup_django(args.async_commit)
    from django.core.management import CommandError, call_command
    from django.db import connections

    from accounts.models import User
    from core.money import format_usd
    from wallet.models import EntryKind, Wallet
    from wallet.services import wallet_credit, wallet_get_or_create

    call_command("migrate", verbosity=0)
    run = uuid.uuid4().hex[:12]
    wallet = wallet_get_or_create(user=User.objects.create_user(email=f"bench-{run}@example.com"))
    # Enough for every pair at the highest settle, so no worker is refused mid-run.
    wallet_credit(wallet=wallet, amount=10**15, kind=EntryKind.TOP_UP, idempotency_key=f"bench:{run}")
    connections.close_all()

    start_at = time.time() + START_DELAY
    shares = [args.threads // args.processes + (i < args.threads % args.processes) for i in range(args.processes)]
    if args.processes == 1:
        spec = {"wallet_id": wallet.pk, "run": run, "start_at": start_at, "seconds": args.seconds}
        results = [hammer(tag="p0", threads=args.threads, **spec)]
    else:
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    f"{wallet.pk}:{run}:p{i}:{start_at}",
                    "--threads",
                    str(share),
                    "--seconds",
                    str(args.seconds),
                    *(["--async-commit"] if args.async_commit else []),
                ],
                stdout=subprocess.PIPE,
                env=os.environ,
            )
            for i, share in enumerate(shares)
        ]
        results = [json.loads(child.communicate(timeout=START_DELAY + args.seconds + 120)[0]) for child in children]

    every = sorted(latency for result in results for latency in result["latencies"])
    failures = [failure for result in results for failure in result["failures"]]
    pairs = len(every)
    row = Wallet.objects.get(pk=wallet.pk)
    durability = "synchronous_commit=off (NOT durable)" if args.async_commit else "durable commits"
    print(f"threads: {args.threads} in {args.processes} process(es)  seconds: {args.seconds:g}  {durability}")
    print(
        f"hold+settle pairs: {pairs}  ({pairs / args.seconds:.0f} pairs/s, "
        f"{2 * pairs / args.seconds:.0f} holds+settles/s)"
    )
    if every:
        p50 = statistics.median(every) * 1000
        p99 = every[min(pairs - 1, int(pairs * 0.99))] * 1000
        print(f"latency per pair: p50 {p50:.1f} ms  p99 {p99:.1f} ms")
    print(f"refused holds: {sum(r['refused'] for r in results)}  worker errors: {len(failures)}")
    print(f"hot wallet: balance {format_usd(row.balance)}  held {format_usd(row.held)}")
    for failure in failures[:5]:
        print(f"  error: {failure}", file=sys.stderr)
    try:
        call_command("verify_ledger")
    except CommandError as exc:
        print(f"verify_ledger FAILED: {exc}", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
