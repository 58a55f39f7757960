"""Benchmark: how many hold + settle pairs per second one hot wallet takes on PostgreSQL.

Every request an agent makes takes a hold on its user's wallet and settles it, so one busy user
means one contended wallet row. This runs ``--threads`` workers (default 32), each with its own
connection, doing ``hold_create`` + ``hold_settle`` in a loop on ONE wallet for ``--seconds``
(default 10), then prints pairs per second, p50/p99 latency per pair, and runs verify_ledger.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/tokentill_bench .venv/bin/python bench/ledger_hot_wallet.py

The database is created if missing and migrated; each run adds a fresh wallet, so runs never
disturb each other and verify_ledger checks the whole accumulated ledger.

What bounds it: both halves of a pair update the wallet row, and PostgreSQL releases a row lock
only once the commit is flushed to disk, so one hot wallet serialises on fsync latency.
``--async-commit`` takes the disk out of the measurement (not durable; never in production).
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def ensure_database(url: str) -> None:
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(maintenance, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument(
        "--async-commit",
        action="store_true",
        help="SET synchronous_commit = off for the workers: NOT durable, for measuring the code rather than "
        "the disk. Every pair commits twice while holding the wallet's row lock, so with durable commits the "
        "ceiling is about 1 / (2 × fsync time) pairs/s whatever the code does.",
    )
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL") or DEFAULT_URL
    if not url.startswith(("postgres://", "postgresql://")):
        print("this benchmark measures PostgreSQL row locking: set DATABASE_URL=postgres://…", file=sys.stderr)
        return 2
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    sys.path.insert(0, str(ROOT))
    ensure_database(url)

    import django

    django.setup()
    from django.core.management import CommandError, call_command
    from django.db import connections

    from accounts.models import User
    from wallet.models import EntryKind, Wallet
    from wallet.money import format_usd
    from wallet.services import InsufficientFunds, hold_create, hold_settle, wallet_credit, wallet_get_or_create

    call_command("migrate", verbosity=0)
    if args.async_commit:
        from django.db.backends.signals import connection_created

        def no_fsync_wait(sender, connection, **kwargs):
            with connection.cursor() as cursor:
                cursor.execute("SET synchronous_commit = off")

        connection_created.connect(no_fsync_wait, weak=False)
    run = uuid.uuid4().hex[:12]
    wallet = wallet_get_or_create(user=User.objects.create_user(email=f"bench-{run}@example.com"))
    # Enough for every pair at the highest settle, so no worker is refused mid-run.
    wallet_credit(wallet=wallet, amount=10**15, kind=EntryKind.TOP_UP, idempotency_key=f"bench:{run}")
    connections.close_all()

    barrier = threading.Barrier(args.threads + 1)
    latencies: list[list[float]] = [[] for _ in range(args.threads)]
    failures: list[BaseException] = []
    refused = [0] * args.threads
    deadline: list[float] = []

    def worker(index: int) -> None:
        mine = latencies[index]
        try:
            barrier.wait(timeout=60)
            end = deadline[0]
            n = 0
            while time.monotonic() < end:  # bounded by the deadline
                started = time.perf_counter()
                try:
                    hold = hold_create(wallet=wallet, amount=HOLD, request_id=f"bench-{run}-{index}-{n}")
                except InsufficientFunds:
                    refused[index] += 1
                    continue
                finally:
                    n += 1
                hold_settle(hold=hold, amount=SETTLES[n % len(SETTLES)])
                mine.append(time.perf_counter() - started)
        except BaseException as exc:
            failures.append(exc)
        finally:
            connections.close_all()

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.threads)]
    for thread in pool:
        thread.start()
    deadline.append(time.monotonic() + args.seconds)
    started = time.monotonic()
    barrier.wait(timeout=60)
    for thread in pool:
        thread.join(args.seconds + 60)
    elapsed = time.monotonic() - started

    every = sorted(latency for mine in latencies for latency in mine)
    pairs = len(every)
    row = Wallet.objects.get(pk=wallet.pk)
    durability = "synchronous_commit=off (not durable)" if args.async_commit else "durable commits"
    print(f"threads: {args.threads}  seconds: {elapsed:.1f}  database: {urlsplit(url).path.lstrip('/')}  {durability}")
    print(f"hold+settle pairs: {pairs}  ({pairs / elapsed:.0f} pairs/s, {2 * pairs / elapsed:.0f} ledger ops/s)")
    if every:
        p50 = statistics.median(every) * 1000
        p99 = every[min(pairs - 1, int(pairs * 0.99))] * 1000
        print(f"latency per pair: p50 {p50:.1f} ms  p99 {p99:.1f} ms")
    print(f"refused holds: {sum(refused)}  worker errors: {len(failures)}")
    print(f"hot wallet: balance {format_usd(row.balance)}  held {format_usd(row.held)}")
    for failure in failures[:5]:
        print(f"  error: {failure!r}", file=sys.stderr)
    try:
        call_command("verify_ledger")
    except CommandError as exc:
        print(f"verify_ledger FAILED: {exc}", file=sys.stderr)
        return 1
    return 1 if failures or any(thread.is_alive() for thread in pool) else 0


if __name__ == "__main__":
    sys.exit(main())
