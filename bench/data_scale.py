"""Is Tokentill as fast at ten million usage rows as at ten? Load a realistic ledger, time what people open.

    .venv/bin/python bench/data_scale.py [--db-name tt_scale] [--pg postgres://postgres@127.0.0.1:5432]
        [--records 10000000] [--users 100000] [--models 200] [--days 90] [--heavy-entries N]
        [--skip-load] [--runs 5] [--no-verify] [--no-csv] [--partitions]

What it does, all on this machine:

* **load** (unless ``--skip-load``): drops and re-creates the scratch database ``--db-name``,
  migrates it, and generates the data set *inside PostgreSQL* (``INSERT … SELECT`` over
  ``generate_series``: nothing crosses the wire, which beats even ``COPY`` from Python), through
  the models' own tables — every column list comes from ``Model._meta``, so the loader follows the
  migrations, and a NOT NULL column it does not know is filled from the field's default or stops the
  load. ``--records`` usage records spread evenly over ``--days`` days across ``--users`` users
  (skewed: a few users make most requests) and ``--models`` priced models, each with its settled
  hold and its usage debit in the ledger; one heavy user (``heavy@bench.example``) has
  ``--heavy-entries`` ledger entries (default records ÷ 10: 1 million at full scale). Every wallet
  is funded by a Stripe-shaped top-up (a ``Payment`` and its ``top_up`` entry) before its first
  request — the heavy user tops up daily too — so no balance goes negative. The result is what
  ``verify_ledger`` checks: balance = Σ entries, held = Σ active holds (none), every entry's
  ``balance_after`` the running sum, every record's charge its ledger debit. The big tables' unique,
  foreign-key and secondary indexes are dropped for the load and rebuilt after it (faster than
  maintaining them row by row); the script then checks that the schema's indexes and constraints
  are exactly what the migrations made, runs ``rebuild_usage_rollups`` when that command exists,
  and ANALYZEs.
* **timings**, warm (one untimed request first), p50 and max of ``--runs``: each page and API
  through the real app (Django's test client in this process: the view, its middleware, its
  queries and its rendering — no network), as a superuser (dashboard) or the heavy user
  (session for the portal, a bearer token from ``/api/auth/token`` for the API). Deep cursor pages
  are asked with a cursor the paginator itself encodes for a position 90 % of the way back.
* **CSV export**: the heavy user's whole history (``/api/wallet/entries?format=csv``) from a
  separate uvicorn process (the shipped command); its RSS (``/proc``) before, at its peak while the
  body streams, and after.
* ``manage.py verify_ledger`` over everything (and ``--incremental`` when it exists), once each.
* ``--partitions``: a copy of the usage table partitioned by month next to a plain copy (same
  rows, same indexes), the dashboard's and a user's queries against both, and pruning the oldest
  month: DELETE from the plain copy vs DROP of its partition.

Figures print as a table with the targets of issue 17 beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench bench bench"
HEAVY_EMAIL = "heavy@bench.example"
STAFF_EMAIL = "staff@bench.example"
# The tables whose unique, foreign-key and secondary indexes are dropped for the load.
BIG = ("proxy_usagerecord", "wallet_hold", "wallet_entry", "payments_payment")


class BenchError(Exception):
    pass


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432", help="server URL, no database")
    parser.add_argument("--db-name", default="tt_scale", help="scratch database (dropped and re-created)")
    parser.add_argument("--records", type=int, default=10_000_000, help="usage records (default 10,000,000)")
    parser.add_argument("--users", type=int, default=100_000, help="users (default 100,000)")
    parser.add_argument("--models", type=int, default=200, help="priced models (default 200)")
    parser.add_argument("--days", type=int, default=90, help="days the records span, ending now (default 90)")
    parser.add_argument(
        "--heavy-entries", type=int, default=None, help="the heavy user's ledger entries (default records ÷ 10)"
    )
    parser.add_argument("--seed", type=float, default=0.17, help="PostgreSQL setseed() for the random figures")
    parser.add_argument("--skip-load", action="store_true", help="migrate and time the database a previous run loaded")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per page (default 5)")
    parser.add_argument("--timeout", type=int, default=120, help="statement timeout for the pages, s (default 120)")
    parser.add_argument("--verify-timeout", type=int, default=1200, help="verify_ledger is killed after, s")
    parser.add_argument("--no-verify", action="store_true", help="skip verify_ledger")
    parser.add_argument("--no-csv", action="store_true", help="skip the CSV export and its uvicorn")
    parser.add_argument("--no-pages", action="store_true", help="skip the page timings")
    parser.add_argument("--partitions", action="store_true", help="measure monthly partitions of usage records")
    args = parser.parse_args()
    if args.heavy_entries is None:
        args.heavy_entries = max(args.records // 10, args.days + 2)
    if not args.days + 2 <= args.heavy_entries <= args.records:
        parser.error("--heavy-entries must lie between --days + 2 and --records")
    if args.users < 2 or args.models < 1 or args.days < 1:
        parser.error("at least 2 users, 1 model and 1 day")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", args.db_name):
        parser.error("--db-name must be a plain lower-case identifier")
    return args


def setup_django(url: str) -> None:
    os.environ.update(DATABASE_URL=url, DJANGO_SETTINGS_MODULE="config.settings", LOG_LEVEL="WARNING")
    os.environ.pop("REDIS_URL", None)
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


# --- loading ------------------------------------------------------------------------------------------


class Loader:
    """Generates the data set in the database. Ids are assigned here, not by sequences, so the
    ledger's order (by id) is the order of time and every cross-reference is arithmetic."""

    def __init__(self, args: argparse.Namespace):
        from django.db import connection

        self.args = args
        self.cursor = connection.cursor()
        self.steps: list[tuple[str, float, int]] = []
        self.before = self.schema()  # what the migrations made, compared after the load

    def sql(self, label: str, statement: str, params=None) -> int:
        started = time.perf_counter()
        self.cursor.execute(statement, params)
        rows = self.cursor.rowcount
        spent = time.perf_counter() - started
        self.steps.append((label, spent, rows))
        print(f"  {label:<44} {spent:8.1f} s  {rows if rows >= 0 else '':>11}", flush=True)
        return rows

    def value(self, statement: str, params=None):
        self.cursor.execute(statement, params)
        return self.cursor.fetchone()[0]

    # Every column of ``model``'s table, each from ``exprs`` (by attname) or else the field's
    # default, or NULL where allowed: a column a migration adds is either known here or loud.
    def insert(self, label: str, model, exprs: dict[str, str], source: str, params: dict | None = None) -> int:
        from django.db.models import NOT_PROVIDED
        from django.db.models.fields.json import JSONField

        columns, values, params = [], [], dict(params or {})
        for field in model._meta.concrete_fields:
            columns.append(f'"{field.column}"')
            if field.attname in exprs:
                values.append(exprs[field.attname])
            elif field.default is not NOT_PROVIDED:
                name = f"d_{field.attname}"
                default = field.get_default()
                if isinstance(field, JSONField):
                    params[name] = json.dumps(default)
                    values.append(f"%({name})s::jsonb")
                else:
                    params[name] = default
                    values.append(f"%({name})s")
            elif field.null:
                values.append("NULL")
            else:
                raise BenchError(f"{model.__name__}.{field.attname} is NOT NULL without a default: teach the loader")
        table = model._meta.db_table
        statement = f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(values)} {source}"
        return self.sql(label, statement, params)

    def schema(self) -> tuple[list, list, list]:
        """The big tables' indexes, constraints and triggers as the catalog states them."""
        self.cursor.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s) ORDER BY 1, 2", [list(BIG)]
        )
        indexes = self.cursor.fetchall()
        self.cursor.execute(
            "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid::regclass::text = ANY(%s) ORDER BY 1, 2",
            [list(BIG)],
        )
        constraints = self.cursor.fetchall()
        self.cursor.execute(
            "SELECT tgrelid::regclass::text, tgname, tgenabled, pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE NOT tgisinternal AND tgrelid::regclass::text = ANY(%s) ORDER BY 1, 2",
            [list(BIG)],
        )
        return indexes, constraints, self.cursor.fetchall()

    def triggers(self, enable: bool) -> None:
        """Row triggers off for the load, on after it. The ledger's only refuse UPDATE, DELETE and
        TRUNCATE (a load inserts); the usage rollups' would add each row one by one, which
        ``rebuild_usage_rollups`` does in one pass afterwards — so they are only switched off
        when that command exists."""
        from django.core.management import get_commands

        if "rebuild_usage_rollups" not in get_commands():
            return
        for table in BIG:
            self.cursor.execute(f"ALTER TABLE {table} {'ENABLE' if enable else 'DISABLE'} TRIGGER USER")

    def drop_indexes(self) -> tuple[list, list]:
        indexes, constraints, _ = self.schema()
        kept = {name for _, name, kind, _ in constraints if kind == "p"}
        backing = {name for _, name, kind, _ in constraints if kind in "pu"}
        dropped_constraints = [c for c in constraints if c[2] in "uf"]
        for table, name, _, _ in dropped_constraints:
            self.cursor.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        dropped_indexes = [i for i in indexes if i[1] not in backing and i[1] not in kept]
        for _, name, _ in dropped_indexes:
            self.cursor.execute(f'DROP INDEX "{name}"')
        return dropped_indexes, dropped_constraints

    def restore_indexes(self, dropped: tuple[list, list]) -> None:
        dropped_indexes, dropped_constraints = dropped
        # Unique constraints first (they build indexes), foreign keys last (validated by one join).
        for table, name, _kind, definition in sorted(dropped_constraints, key=lambda c: c[2] != "u"):
            self.sql(f"constraint {name[:35]}", f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        for _, name, definition in dropped_indexes:
            self.sql(f"index {name[:40]}", definition)

    def load(self) -> float:
        from decimal import Decimal

        args = self.args
        from django.contrib.auth import get_user_model
        from django.core.management import call_command, get_commands
        from django.utils import timezone

        from accounts.models import ApiKey
        from payments.models import Payment
        from proxy.models import ModelPrice, UsageRecord
        from proxy.selectors import rates_for
        from wallet.models import Entry, Hold, Wallet

        User = get_user_model()
        R, U, D, M = args.records, args.users, args.days, args.models
        heavy_topups = D  # one a day, besides the first
        heavy_usage = args.heavy_entries - 1 - heavy_topups
        now = timezone.now().replace(microsecond=0)
        start = now - timedelta(days=D)
        # The usage record number n (1..R) is at start + (n - 1) × step: even over the period.
        params = {
            "R": R,
            "U": U,
            "D": D,
            "M": M,
            "HU": heavy_usage,
            "start": start,
            "step": D * 86400.0 / R,
            "now": now,
        }
        load_started = time.perf_counter()
        cur = self.cursor
        cur.execute("SET work_mem = '512MB'")
        cur.execute("SET maintenance_work_mem = '1GB'")
        cur.execute("SET max_parallel_maintenance_workers = 2")
        cur.execute("SET synchronous_commit = off")
        cur.execute("SELECT setseed(%s)", [args.seed])

        # Prices: in Python (200 rows), snapshot as the proxy takes it.
        prices = []
        for m in range(M):
            prompt = [0.05, 0.15, 0.5, 1, 2.5, 3, 5, 10, 15][m % 9]
            prices.append(
                ModelPrice(
                    model=f"vendor{m % 12}/model-{m:03d}",
                    name=f"Bench model {m}",
                    prompt=Decimal(str(prompt)),
                    completion=Decimal(str(prompt * 4)),
                    effective_from=start - timedelta(days=30),
                    source="seed",
                )
            )
        ModelPrice.objects.bulk_create(prices)
        prices = list(ModelPrice.objects.order_by("id"))
        cur.execute(
            "CREATE TEMP TABLE bench_price "
            "(k int, id bigint, model text, prompt numeric, completion numeric, markup numeric, snapshot jsonb)"
        )
        with cur.connection.cursor().copy("COPY bench_price FROM STDIN") as copy:
            for k, price in enumerate(prices):
                rates = rates_for(price)
                copy.write_row(
                    (
                        k,
                        price.id,
                        price.model,
                        price.prompt,
                        price.completion,
                        rates.markup,
                        json.dumps(rates.snapshot()),
                    )
                )
        cur.execute("CREATE UNIQUE INDEX ON bench_price (k)")

        dropped = self.drop_indexes()
        self.triggers(enable=False)
        password = "!bench-unusable"  # set for the two users who sign in, below
        self.insert(
            "users",
            User,
            {
                "id": "g",
                "password": "%(password)s",
                "last_login": "NULL",
                "is_superuser": "false",
                "email": "CASE WHEN g = 1 THEN %(heavy)s ELSE 'user' || g || '@bench.example' END",
                "is_active": "true",
                "is_staff": "false",
                "date_joined": "%(start)s - interval '30 days'",
                "limits": "'{}'::jsonb",
                "own_limits": "'{}'::jsonb",
            },
            "FROM generate_series(1, %(U)s) g",
            {**params, "password": password, "heavy": HEAVY_EMAIL},
        )
        self.insert(
            "wallets",
            Wallet,
            {
                "id": "g",
                "user_id": "g",
                "organization_id": "NULL",
                "balance": "0",
                "held": "0",
                "updated_at": "%(now)s",
            },
            "FROM generate_series(1, %(U)s) g",
            params,
        )
        self.insert(
            "api keys",
            ApiKey,
            {
                "id": "g",
                "user_id": "g",
                "organization_id": "NULL",
                "name": "'bench'",
                "prefix": "'tt_' || lpad(to_hex(g), 9, '0')",
                "key_hash": "md5(g::text) || md5((-g)::text)",
                "created_at": "%(start)s - interval '30 days'",
            },
            "FROM generate_series(1, %(U)s) g",
            params,
        )
        # The usage records' figures, once, unlogged: user (the heavy one's rows evenly spread,
        # the rest skewed towards low ids), model (skewed too), tokens, charge, hold.
        self.sql(
            "staging: usage figures",
            """
            CREATE UNLOGGED TABLE bench_u AS
            SELECT g.n, g.user_id, g.k, g.prompt_tokens, g.completion_tokens, c.cost, g.latency,
                   greatest(1, ceil(c.cost * (1 + p.markup) * 1000000000))::bigint AS charge,
                   %(start)s + make_interval(secs => (g.n - 1) * %(step)s) AS created_at
            FROM (
                SELECT n,
                       CASE WHEN floor(n::numeric * %(HU)s / %(R)s) <> floor((n - 1)::numeric * %(HU)s / %(R)s) THEN 1
                            ELSE 2 + floor((%(U)s - 1) * power(random(), 3))::int END AS user_id,
                       floor(%(M)s * power(random(), 2))::int AS k,
                       (50 + floor(4000 * power(random(), 2)))::int AS prompt_tokens,
                       (5 + floor(1500 * power(random(), 2)))::int AS completion_tokens,
                       (200 + floor(8000 * power(random(), 3)))::int AS latency
                FROM generate_series(1, %(R)s) n
            ) g
            JOIN bench_price p ON p.k = g.k
            CROSS JOIN LATERAL (SELECT (g.prompt_tokens * p.prompt + g.completion_tokens * p.completion) / 1000000
                                AS cost) c
            """,
            params,
        )
        self.insert(
            "usage records",
            UsageRecord,
            {
                "id": "u.n",
                "request_id": "'req_' || md5(u.n::text)",
                "user_id": "u.user_id",
                "api_key_id": "u.user_id",
                "organization_id": "NULL",
                "endpoint": "'chat.completions'",
                "model": "p.model",
                "alias": "''",
                "served_model": "p.model",
                "fallback": "false",
                "upstream_model": "p.model",
                "upstream": "'default'",
                "generation_id": "'gen-' || u.n",
                "stream": "u.n %% 3 = 0",
                "status": "'ok'",
                "http_status": "200",
                "error": "''",
                "finish_reason": "'stop'",
                "prompt_tokens": "u.prompt_tokens",
                "completion_tokens": "u.completion_tokens",
                "reasoning_tokens": "0",
                "cached_tokens": "0",
                "cache_write_tokens": "0",
                "upstream_cost": "u.cost",
                "cost_source": "'price_table'",
                "charge": "u.charge",
                "operator_loss": "0",
                "hold_amount": "u.charge * 3",
                "held_tokens": "u.prompt_tokens + 4096",
                "markup": "p.markup",
                "price_id": "p.id",
                "prices": "p.snapshot",
                "estimated": "false",
                "latency_ms": "u.latency",
                "ttfb_ms": "u.latency / 4",
                "run": "''",
                "agent": "CASE WHEN u.n %% 5 = 0 THEN 'agent-' || (u.n %% 7) ELSE '' END",
                "tool": "''",
                "created_at": "u.created_at",
                "settled_at": "u.created_at + make_interval(secs => u.latency / 1000.0)",
            },
            "FROM bench_u u JOIN bench_price p ON p.k = u.k ORDER BY u.n",
            params,
        )
        self.insert(
            "holds (settled)",
            Hold,
            {
                "id": "u.n",
                "wallet_id": "u.user_id",
                "amount": "u.charge * 3",
                "request_id": "'req_' || md5(u.n::text)",
                "status": "'settled'",
                "description": "''",
                "metadata": "'{}'::jsonb",
                "created_at": "u.created_at",
                "expires_at": "u.created_at + interval '5 minutes'",
                "closed_at": "u.created_at + make_interval(secs => u.latency / 1000.0)",
                "overrun_cap": "NULL",
            },
            "FROM bench_u u ORDER BY u.n",
            params,
        )
        # The ledger: each wallet's first top-up (ids 1..U, before any request) covers what it will
        # spend plus $1–$50; usage debits take ids U + 2n, the heavy user's daily top-ups
        # U + 2n + 1 right after the n-th request. balance_after is the running sum by id.
        self.sql(
            "staging: ledger",
            """
            CREATE UNLOGGED TABLE bench_e AS
            WITH spend AS (SELECT user_id, sum(charge) AS total FROM bench_u GROUP BY user_id),
            daily AS (
                SELECT j, ceil(j * %(R)s::numeric / (%(D)s + 1))::bigint AS after_n FROM generate_series(1, %(D)s) j
            ),
            rows AS (
                SELECT g AS id, g AS wallet_id, 'top_up' AS kind,
                       coalesce(s.total, 0) + 1000000000 * (1 + floor(random() * 50))::bigint AS amount,
                       %(start)s - interval '1 hour' AS created_at, 0::bigint AS n
                FROM generate_series(1, %(U)s) g LEFT JOIN spend s ON s.user_id = g
                UNION ALL
                SELECT %(U)s + 2 * n, user_id, 'usage', -charge, created_at + make_interval(secs => latency / 1000.0), n
                FROM bench_u
                UNION ALL
                SELECT %(U)s + 2 * after_n + 1, 1, 'top_up', 10000000000,
                       %(start)s + make_interval(secs => (after_n - 1) * %(step)s) + interval '1 millisecond', after_n
                FROM daily
            )
            SELECT *, sum(amount) OVER (PARTITION BY wallet_id ORDER BY id) AS balance_after FROM rows
            """,
            params,
        )
        self.insert(
            "ledger entries",
            Entry,
            {
                "id": "e.id",
                "wallet_id": "e.wallet_id",
                "kind": "e.kind",
                "amount": "e.amount",
                "balance_after": "e.balance_after",
                "idempotency_key": "CASE WHEN e.kind = 'usage' THEN 'hold:req_' || md5(e.n::text) "
                "ELSE 'stripe:payment:pi_bench_' || e.id END",
                "reference": "CASE WHEN e.kind = 'usage' THEN 'req_' || md5(e.n::text) ELSE 'pi_bench_' || e.id END",
                "description": "CASE WHEN e.kind = 'usage' THEN p.model || ' (req_' || md5(e.n::text) || ')' "
                "ELSE 'Bench credit pack (Stripe payment pi_bench_' || e.id || ')' END",
                "metadata": "'{}'::jsonb",
                "created_by_id": "NULL",
                "member_id": "NULL",
                "created_at": "e.created_at",
            },
            "FROM bench_e e LEFT JOIN bench_u u ON e.kind = 'usage' AND u.n = e.n "
            "LEFT JOIN bench_price p ON p.k = u.k ORDER BY e.id",
            params,
        )
        self.insert(
            "payments (one per top-up)",
            Payment,
            {
                "id": "row_number() OVER (ORDER BY e.id)",
                "provider": "'stripe'",
                "provider_payment_id": "'pi_bench_' || e.id",
                "payment_intent": "'pi_bench_' || e.id",
                "user_id": "e.wallet_id",
                "pack_id": "NULL",
                "checkout_id": "NULL",
                "wallet_id": "e.wallet_id",
                "subscription_id": "NULL",
                "gross": "e.amount",
                "fee": "0",
                "net": "e.amount",
                "refunded_amount": "0",
                "credit": "e.amount",
                "clawed_back": "0",
                "status": "'paid'",
                "flag_reason": "''",
                "test_mode": "false",
                "created_at": "e.created_at",
            },
            "FROM bench_e e WHERE e.kind = 'top_up' ORDER BY e.id",
            params,
        )
        self.sql(
            "wallet balances",
            "UPDATE wallet_wallet w SET balance = s.total FROM "
            "(SELECT wallet_id, sum(amount) AS total FROM bench_e GROUP BY wallet_id) s WHERE w.id = s.wallet_id",
        )
        self.restore_indexes(dropped)
        self.triggers(enable=True)
        self.sql("drop staging", "DROP TABLE bench_u, bench_e")
        for model in (User, Wallet, ApiKey, UsageRecord, Hold, Entry, Payment):
            table = model._meta.db_table
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        after = self.schema()
        if after != self.before:
            raise BenchError(f"the schema after the load differs from the migrations':\n{self.before}\n{after}")
        # The two users who sign in, through the ORM.
        heavy = User.objects.get(email=HEAVY_EMAIL)
        heavy.set_password(PASSWORD)
        heavy.save(update_fields=["password"])
        User.objects.create_superuser(STAFF_EMAIL, PASSWORD)
        if "rebuild_usage_rollups" in get_commands():
            started = time.perf_counter()
            call_command("rebuild_usage_rollups")
            self.steps.append(("rebuild_usage_rollups", time.perf_counter() - started, -1))
            print(f"  {'rebuild_usage_rollups':<44} {self.steps[-1][1]:8.1f} s", flush=True)
        cur.execute("SET maintenance_work_mem = '1GB'")
        self.sql("VACUUM ANALYZE", "VACUUM ANALYZE")
        return time.perf_counter() - load_started


def prepare(args: argparse.Namespace) -> str:
    import psycopg

    url = f"{args.pg}/{args.db_name}"
    if not args.skip_load:
        try:
            with psycopg.connect(f"{args.pg}/postgres", autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {args.db_name} WITH (FORCE)")
                conn.execute(f"CREATE DATABASE {args.db_name}")
        except psycopg.Error as exc:
            raise BenchError(f"cannot prepare {args.db_name} on {args.pg}: {exc}") from exc
    setup_django(url)
    from django.core.management import call_command

    # Migrated to this checkout either way: --skip-load then times what a previous run loaded
    # with the migrations added since (their backfills included).
    call_command("migrate", verbosity=0)
    if not args.skip_load:
        from django.db import connection

        connection.set_autocommit(True)
        loader = Loader(args)
        print(
            f"loading {args.records:,} usage records, {args.users:,} users, {args.models} models over "
            f"{args.days} days; heavy user {args.heavy_entries:,} ledger entries",
            flush=True,
        )
        spent = loader.load()
        entries = loader.value("SELECT count(*) FROM wallet_entry")
        size = loader.value("SELECT pg_size_pretty(pg_database_size(current_database()))")
        rows = args.records * 2 + entries
        print(
            f"loaded in {spent:.0f} s: {args.records:,} usage records + as many holds + {entries:,} ledger entries "
            f"= {rows / spent:,.0f} rows/s; database {size}",
            flush=True,
        )
    return url


# --- timing -----------------------------------------------------------------------------------------


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float] | None:
    """p50 and max in ms of ``runs`` calls after a warm one; None as soon as one hits the
    statement timeout (the page is then too slow to be worth timing again)."""
    from django.db import OperationalError

    spent = []
    try:
        fn()  # warm
        for _ in range(runs):
            started = time.perf_counter()
            fn()
            spent.append((time.perf_counter() - started) * 1000)
    except OperationalError as exc:
        if "statement timeout" not in str(exc):
            raise
        return None
    return statistics.median(spent), max(spent)


def deep_cursor(pagination_class, path: str, position) -> str:
    """The cursor the paginator hands out for a page starting after ``position`` (its ordering's
    first field), encoded by the paginator itself."""
    from rest_framework.pagination import Cursor

    paginator = pagination_class()
    paginator.base_url = f"http://localhost{path}"
    paginator.page_size = paginator.page_size or 50
    url = paginator.encode_cursor(Cursor(offset=0, reverse=False, position=position))
    return url.split("?", 1)[1]


def time_pages(args: argparse.Namespace) -> list[tuple[str, float, float, str]]:
    from django.contrib.auth import get_user_model
    from django.test import Client

    from proxy.api import UsagePagination
    from proxy.models import UsageRecord
    from wallet.api import EntryCursorPagination
    from wallet.models import Entry

    User = get_user_model()
    heavy = User.objects.get(email=HEAVY_EMAIL)
    staff = User.objects.get(email=STAFF_EMAIL)
    staff_client = Client(SERVER_NAME="localhost")
    staff_client.force_login(staff)
    portal = Client(SERVER_NAME="localhost")
    portal.force_login(heavy)
    api = Client(SERVER_NAME="localhost")
    answer = api.post("/api/auth/token", {"email": HEAVY_EMAIL, "password": PASSWORD}, content_type="application/json")
    if answer.status_code != 200:
        raise BenchError(f"/api/auth/token answered {answer.status_code}: {answer.content[:200]!r}")
    bearer = {"HTTP_AUTHORIZATION": f"Bearer {answer.json()['access']}"}

    # 90 % of the way back through the heavy user's history.
    n_entries = Entry.objects.filter(wallet__user=heavy).count()
    old_entry = (
        Entry.objects.filter(wallet__user=heavy).order_by("-id").values_list("id", flat=True)[int(n_entries * 0.9)]
    )
    n_usage = UsageRecord.objects.filter(user=heavy).count()
    old_usage = (
        UsageRecord.objects.filter(user=heavy)
        .order_by("-created_at", "-id")
        .values_list("created_at", flat=True)[int(n_usage * 0.9)]
    )
    usage_deep = deep_cursor(UsagePagination, "/api/usage", str(old_usage))
    entries_deep = deep_cursor(EntryCursorPagination, "/api/wallet/entries", str(old_entry))

    def get(client, path, **extra):
        def call():
            response = client.get(path, **extra)
            if response.status_code != 200:
                raise BenchError(f"GET {path} answered {response.status_code}: {response.content[:300]!r}")
            if getattr(response, "streaming", False):
                for _ in response.streaming_content:
                    pass

        return call

    pages = [
        ("staff dashboard, 7 days", get(staff_client, "/admin/?period=7"), "< 500 ms"),
        ("staff dashboard, 30 days", get(staff_client, "/admin/?period=30"), "< 500 ms"),
        ("staff dashboard, 90 days", get(staff_client, "/admin/?period=90"), "< 500 ms"),
        ("/api/usage/summary by day", get(api, "/api/usage/summary?group_by=day", **bearer), "< 100 ms"),
        ("/api/usage/summary by model", get(api, "/api/usage/summary?group_by=model", **bearer), "< 100 ms"),
        ("/api/usage first page", get(api, "/api/usage", **bearer), "< 50 ms"),
        ("/api/usage deep page (90 % back)", get(api, f"/api/usage?{usage_deep}", **bearer), "< 50 ms"),
        ("/api/wallet/entries first page", get(api, "/api/wallet/entries", **bearer), "< 50 ms"),
        (
            "/api/wallet/entries deep page (90 % back)",
            get(api, f"/api/wallet/entries?{entries_deep}", **bearer),
            "< 50 ms",
        ),
        ("portal /", get(portal, "/"), "< 50 ms"),
        ("portal /history", get(portal, "/history"), "< 50 ms"),
        ("portal /usage", get(portal, "/usage"), "< 50 ms"),
    ]
    rows = []
    for label, call, target in pages:
        figures = timed(call, args.runs)
        if figures is None:
            shown = f"> {args.timeout} s (statement timeout)"
        else:
            shown = f"{figures[0]:9.1f} ms {figures[1]:9.1f} ms"
        rows.append((label, shown, target))
        print(f"  {label:<44} {shown}  target {target}", flush=True)
    return rows


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def time_csv(url: str) -> tuple[str, float, float, str]:
    """The heavy user's whole history as CSV from a separate uvicorn; its RSS before, at the peak
    while streaming, and after."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "WARNING", "TOKENTILL_DOTENV": "off"}
    env.pop("REDIS_URL", None)
    env.pop("PGOPTIONS", None)
    log = tempfile.NamedTemporaryFile(prefix="tt-bench-scale-", suffix=".log", delete=False)
    command = [".venv/bin/uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--loop", "uvloop", "--http", "httptools", "--lifespan", "off", "--no-access-log"]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                opener.open(f"{base}/healthz", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise BenchError(f"uvicorn did not start: see {log.name}") from None
                time.sleep(0.2)
        body = json.dumps({"email": HEAVY_EMAIL, "password": PASSWORD}).encode()
        request = urllib.request.Request(
            f"{base}/api/auth/token", data=body, headers={"Content-Type": "application/json"}
        )
        token = json.loads(opener.open(request, timeout=30).read())["access"]
        headers = {"Authorization": f"Bearer {token}"}
        # Warm the process (imports, connection) with a first page, then measure.
        opener.open(urllib.request.Request(f"{base}/api/wallet/entries", headers=headers), timeout=60).read()
        before = rss_kb(server.pid)
        peak = [before]
        done = threading.Event()

        def watch():
            while not done.wait(0.05):
                peak[0] = max(peak[0], rss_kb(server.pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        response = opener.open(
            urllib.request.Request(f"{base}/api/wallet/entries?format=csv", headers=headers), timeout=3600
        )
        size = lines = 0
        while chunk := response.read(1 << 16):
            size += len(chunk)
            lines += chunk.count(b"\n")
        spent = time.perf_counter() - started
        done.set()
        watcher.join()
        after = rss_kb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    growth = (peak[0] - before) / 1024
    print(
        f"  CSV export: {lines:,} lines, {size / 1e6:.0f} MB in {spent:.1f} s; server RSS {before / 1024:.0f} MB "
        f"before, peak {peak[0] / 1024:.0f} MB (+{growth:.0f} MB), after {after / 1024:.0f} MB",
        flush=True,
    )
    return (f"CSV export, {lines - 1:,} rows", f"+{growth:.0f} MB RSS in {spent:.1f} s", "< 50 MB growth")


def time_verify(url: str, timeout: int) -> list[tuple[str, str, str]]:
    """``manage.py verify_ledger`` as an operator runs it (its own process), once; and twice with
    ``--incremental`` when the command has it (the first run checkpoints, the second is cron's)."""
    # Named, so that its statement can be cancelled when the process is killed (a killed client's
    # query runs on in its backend).
    app = f"bench-verify-{os.getpid()}"
    env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "WARNING", "TOKENTILL_DOTENV": "off", "PGAPPNAME": app}
    env.pop("PGOPTIONS", None)
    help_text = subprocess.run(
        [sys.executable, "manage.py", "verify_ledger", "--help"], cwd=ROOT, env=env, capture_output=True, text=True
    ).stdout
    variants = [("verify_ledger", [], "< 2 min")]
    if "--incremental" in help_text:
        variants += [
            ("verify_ledger --incremental (first)", ["--incremental"], "seconds"),
            ("verify_ledger --incremental (again)", ["--incremental"], "seconds"),
        ]
    rows = []
    for label, extra, target in variants:
        started = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "manage.py", "verify_ledger", *extra],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            verdict = "clean" if done.returncode == 0 else f"FAILED: {(done.stderr or done.stdout)[-400:]}"
            shown = f"{time.perf_counter() - started:9.1f} s"
        except subprocess.TimeoutExpired:
            verdict, shown = "killed", f"> {timeout} s"
            from django.db import connection

            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = %s", [app])
        print(f"  {label:<44} {shown}  {verdict}", flush=True)
        rows.append((f"{label} ({verdict})", shown, target))
    return rows


# --- partitions -----------------------------------------------------------------------------------


PARTITION_QUERIES = {
    "dashboard: requests and charge by day, 30 days": (
        "SELECT date_trunc('day', created_at) d, count(*), sum(charge) FROM {t} "
        "WHERE created_at >= now() - interval '30 days' GROUP BY 1 ORDER BY 1"
    ),
    "dashboard: by model, 7 days": (
        "SELECT model, count(*), sum(charge) FROM {t} WHERE created_at >= now() - interval '7 days' "
        "GROUP BY 1 ORDER BY 3 DESC LIMIT 10"
    ),
    "heavy user: first page": "SELECT * FROM {t} WHERE user_id = 1 ORDER BY created_at DESC, id DESC LIMIT 50",
    "heavy user: a page 60 days back": (
        "SELECT * FROM {t} WHERE user_id = 1 AND created_at < now() - interval '60 days' "
        "ORDER BY created_at DESC, id DESC LIMIT 50"
    ),
    "heavy user: summary by model, all time": (
        "SELECT model, count(*), sum(charge) FROM {t} WHERE user_id = 1 GROUP BY 1 ORDER BY 3 DESC"
    ),
    "a light user: first page": "SELECT * FROM {t} WHERE user_id = 5000 ORDER BY created_at DESC, id DESC LIMIT 50",
}


def measure_partitions(runs: int) -> None:
    """A plain copy and a monthly-partitioned copy of the usage records, the same indexes (the
    model's: user+created_at, user+model+created_at, status+created_at, created_at), the same
    queries, then pruning the oldest month from each."""
    from django.db import connection

    cur = connection.cursor()
    cur.execute("SET work_mem = '256MB'")
    cur.execute("SET maintenance_work_mem = '1GB'")
    cur.execute("SELECT min(created_at), max(created_at) FROM proxy_usagerecord")
    first, last = cur.fetchone()
    cur.execute("DROP TABLE IF EXISTS bench_usage_plain, bench_usage_part")
    started = time.perf_counter()
    cur.execute("CREATE TABLE bench_usage_plain (LIKE proxy_usagerecord INCLUDING DEFAULTS)")
    cur.execute("INSERT INTO bench_usage_plain SELECT * FROM proxy_usagerecord ORDER BY id")
    cur.execute("ALTER TABLE bench_usage_plain ADD PRIMARY KEY (id)")
    plain_load = time.perf_counter() - started
    cur.execute(
        "CREATE TABLE bench_usage_part (LIKE proxy_usagerecord INCLUDING DEFAULTS) PARTITION BY RANGE (created_at)"
    )
    month = first.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    months = []
    while month <= last:
        following = (month + timedelta(days=32)).replace(day=1)
        name = f"bench_usage_part_{month:%Y%m}"
        cur.execute(
            f"CREATE TABLE {name} PARTITION OF bench_usage_part FOR VALUES FROM (%s) TO (%s)", [month, following]
        )
        months.append((name, month, following))
        month = following
    started = time.perf_counter()
    cur.execute("INSERT INTO bench_usage_part SELECT * FROM proxy_usagerecord ORDER BY id")
    # A partitioned table's primary key must include the partition key.
    cur.execute("ALTER TABLE bench_usage_part ADD PRIMARY KEY (id, created_at)")
    part_load = time.perf_counter() - started
    for table in ("bench_usage_plain", "bench_usage_part"):
        for columns in ("user_id, created_at", "user_id, model, created_at", "status, created_at", "created_at"):
            cur.execute(f"CREATE INDEX ON {table} ({columns})")
        cur.execute(f"ANALYZE {table}")
    print(f"  copies: plain {plain_load:.0f} s, partitioned ({len(months)} months) {part_load:.0f} s (+ indexes)")
    print(f"  {'query':<44} {'plain p50':>11} {'partitioned p50':>16}")
    for label, template in PARTITION_QUERIES.items():
        figures = []
        for table in ("bench_usage_plain", "bench_usage_part"):

            def run(table=table, template=template):
                cur.execute(template.format(t=table))
                cur.fetchall()

            figures.append(timed(run, runs)[0])
        print(f"  {label:<44} {figures[0]:8.1f} ms {figures[1]:13.1f} ms", flush=True)
    oldest, _, end = months[0]
    cur.execute("SELECT count(*) FROM bench_usage_plain WHERE created_at < %s", [end])
    count = cur.fetchone()[0]
    started = time.perf_counter()
    cur.execute("DELETE FROM bench_usage_plain WHERE created_at < %s", [end])
    delete = time.perf_counter() - started
    started = time.perf_counter()
    cur.execute(f"ALTER TABLE bench_usage_part DETACH PARTITION {oldest}")
    cur.execute(f"DROP TABLE {oldest}")
    drop = time.perf_counter() - started
    started = time.perf_counter()
    cur.execute("VACUUM bench_usage_plain")
    vacuum = time.perf_counter() - started
    print(
        f"  prune the oldest month ({count:,} rows): DELETE {delete:.1f} s (+ VACUUM {vacuum:.1f} s) vs "
        f"DETACH + DROP PARTITION {drop * 1000:.0f} ms",
        flush=True,
    )
    cur.execute("DROP TABLE bench_usage_plain, bench_usage_part")


def main() -> int:
    args = parse_args()
    os.environ["TOKENTILL_DOTENV"] = "off"
    try:
        url = prepare(args)
        from django.db import connection

        with connection.cursor() as cur:
            cur.execute(
                "SELECT (SELECT count(*) FROM proxy_usagerecord), (SELECT count(*) FROM wallet_entry), "
                "(SELECT count(*) FROM accounts_user), pg_size_pretty(pg_database_size(current_database()))"
            )
            records, entries, users, size = cur.fetchone()
        load = os.getloadavg()
        print(
            f"\n{records:,} usage records, {entries:,} ledger entries, {users:,} users, database {size}; "
            f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
            flush=True,
        )
        rows = []
        if not args.no_pages:
            # Every statement of the pages under a timeout: a page that would take minutes is
            # reported as such, not waited for.
            os.environ["PGOPTIONS"] = f"-c statement_timeout={args.timeout * 1000}"
            connection.close()
            # A page cancelled by the timeout is a 500 that Django logs with its traceback; the
            # table says it already.
            logging.getLogger("django.request").setLevel(logging.CRITICAL)
            print(f"pages (warm, p50 and max of {args.runs}):", flush=True)
            rows += time_pages(args)
        if not args.no_csv:
            rows.append(time_csv(url))
        if not args.no_verify:
            rows += time_verify(url, args.verify_timeout)
        if args.partitions:
            print("monthly partitions of usage records:", flush=True)
            measure_partitions(args.runs)
    except BenchError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"\n{'what':<56} {'p50':>12} {'max':>12}  target")
    for label, shown, target in rows:
        print(f"{label[:56]:<56} {shown:>25}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
