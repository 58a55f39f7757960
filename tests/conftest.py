"""Shared fixtures: named personas, authenticated clients, database helpers.

Personas (healthchecks' style): alice has $10.00, bob has nothing, mallory tries to reach other
people's things, staff runs the shop.
"""

from __future__ import annotations

import importlib
import os
import threading
import time

import pytest
from django.core.management.commands import flush as _flush_command
from django.db.backends.postgresql.base import DatabaseOperations as PgOps
from django.db.backends.sqlite3.base import DatabaseOperations as SqliteOps

_triggers = importlib.import_module("wallet.migrations.0002_append_only_triggers")
_audit_triggers = importlib.import_module("backoffice.migrations.0002_audit_log_append_only")

# The live servers and fresh interpreters the tests start must not read a developer's .env either
# (config/settings.py: this process already does not).
os.environ["TOKENTILL_DOTENV"] = "off"


# The ledger refuses DELETE and TRUNCATE by trigger. Between transactional tests Django empties
# every table with a flush; the test database's teardown is the one party allowed to erase the
# ledger (and the operator audit log), so the flush (and only the flush) steps around the triggers.
_pg_flush = PgOps.execute_sql_flush
_sqlite_flush = SqliteOps.execute_sql_flush


def _pg_flush_bypassing_triggers(self, sql_list):
    _pg_flush(self, ["SET session_replication_role = replica", *sql_list, "SET session_replication_role = DEFAULT"])


def _sqlite_flush_bypassing_triggers(self, sql_list):
    reverse = [*_triggers.SQLITE_REVERSE, *_audit_triggers.SQLITE_REVERSE]
    _sqlite_flush(self, [*reverse, *sql_list, *_triggers.SQLITE_FORWARD, *_audit_triggers.SQLITE_FORWARD])


PgOps.execute_sql_flush = _pg_flush_bypassing_triggers
SqliteOps.execute_sql_flush = _sqlite_flush_bypassing_triggers


# That flush was the largest cost of a transactional test (seconds apiece on PostgreSQL under
# load), for two reasons, both dropped here. (1) It emptied the content types and permissions
# too, which migrations made and no test writes, and then re-ran every post_migrate handler
# (create_contenttypes, create_permissions: dozens of queries, hundreds of rows) to make them
# again: they are kept, so nothing needs remaking — and the flush command's post_migrate is
# skipped (it remakes nothing else: no app of ours listens to it). (2) On PostgreSQL, TRUNCATE of
# every table costs a new file per table; DELETE of the few rows a test wrote is far cheaper.
# The rows go in any order: the flush runs with session_replication_role = replica, which skips
# the foreign keys' checks as it skips the ledger's triggers.
_KEPT_BY_FLUSH = frozenset({"django_content_type", "auth_permission"})
_pg_sql_flush = PgOps.sql_flush
_sqlite_sql_flush = SqliteOps.sql_flush


def _pg_sql_flush_deleting(self, style, tables, *, reset_sequences=False, allow_cascade=False):
    tables = [table for table in tables if table not in _KEPT_BY_FLUSH]
    if reset_sequences or allow_cascade:  # not how the tests flush: Django's own statement then
        return _pg_sql_flush(self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)
    return [f"DELETE FROM {self.quote_name(table)};" for table in tables]


def _sqlite_sql_flush_keeping(self, style, tables, *, reset_sequences=False, allow_cascade=False):
    tables = [table for table in tables if table not in _KEPT_BY_FLUSH]
    return _sqlite_sql_flush(self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)


PgOps.sql_flush = _pg_sql_flush_deleting
SqliteOps.sql_flush = _sqlite_sql_flush_keeping
_flush_command.emit_post_migrate_signal = lambda *args, **kwargs: None


# What makes a test slow is starting things: uvicorn processes, a browser. A module that can
# (it imported the means to) is marked ``live``.
_STARTERS = ("live_server", "live_servers", "sync_playwright", "async_playwright")

# The fast lane (``scripts/test --fast``, the edit loop): the unit and service tests — the ground
# floor's rules and formats, and the contracts of the services that move money — which go through
# no HTTP surface and start nothing, so the lane takes seconds. Everything else runs in the full
# command; ``-m "not live and not browser"`` is the wider lane without servers and browsers.
_FAST_LANE = {
    "test_money",
    "test_breaker",
    "test_protocols_anthropic",
    "test_protocols_responses",
    "test_upstream_errors",
    "test_wallet_services",
    "test_ledger_contract",
    "test_ledger_db_guarantees",
    "test_verify_ledger",
    "test_proxy_lib",
    "test_client_units",
}


# scripts/test runs the suite twice, on SQLite and on PostgreSQL side by side, and names each run in
# TEST_HALF ("sqlite" or "postgres"). Tests that exercise nothing database-specific run in one of
# the two only: pure units (no database at all), the settings tests (each starts fresh interpreters
# that parse the settings from an environment without DATABASE_URL: SQLite whichever half runs
# them), the HTTPS headers' (settings and middleware, the same on either database), the browser
# tests (the pages' queries are tested on both databases by the non-browser view tests:
# test_portal_views, test_admin_dashboard, test_staff_*), and the client kit's and the AI SDKs'
# end-to-end tests (they test the client packages and the wire protocols against a live server;
# the proxy paths behind them are tested on both databases by test_proxy_* and test_v1_*). Each
# group goes where it evens out the two runs' times: the PostgreSQL half is the longer one.
# Without TEST_HALF (pytest run by hand, or scripts/test with no PostgreSQL) every test runs.
_ONE_HALF = {
    "sqlite": {
        "test_money",
        "test_breaker",
        "test_protocols_anthropic",
        "test_protocols_responses",
        "test_upstream_errors",
        "test_proxy_lib",
        "test_client_units",
        "test_portal_browser",
        "test_dashboard_browser",
        "test_device_browser",
        "test_limits_browser",
        "test_notify_browser",
        "test_orgs_browser",
        "test_security_browser",
        "test_settings",
        "test_security_headers",
        "test_client_device",
        "test_client_events",
        "test_client_topup",
    },
    "postgres": {
        "test_sdk_protocols",
        "test_agent_recipes",
        "test_client_auth",
        "test_client_cli",
        "test_client_openai",
        "test_client_runs",
        "test_desktop_chat",
    },
}


def _starts_processes(item) -> bool:
    module = getattr(item, "module", None)
    return module is not None and any(name in vars(module) for name in _STARTERS)


def pytest_collection_modifyitems(config, items):
    from django.conf import settings

    on_postgres = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
    skip_pg = pytest.mark.skip(reason="needs PostgreSQL: run through scripts/test (DATABASE_URL=postgres://…)")
    skip_redis = pytest.mark.skip(reason="needs Redis: TEST_REDIS_URL is set by scripts/test on the PostgreSQL run")
    live, fast = pytest.mark.live, pytest.mark.fast
    half = os.environ.get("TEST_HALF", "")
    elsewhere = {name for other, names in _ONE_HALF.items() if half in _ONE_HALF and other != half for name in names}
    skip_elsewhere = pytest.mark.skip(reason=f"nothing database-specific: runs in the other half only ({half} run)")
    for item in items:
        if _starts_processes(item):
            item.add_marker(live)
        module = item.module.__name__.rpartition(".")[2]
        if module in _FAST_LANE:
            item.add_marker(fast)
        if module in elsewhere:
            item.add_marker(skip_elsewhere)
        if "postgres" in item.keywords and not on_postgres:
            item.add_marker(skip_pg)
        if "redis" in item.keywords and not os.environ.get("TEST_REDIS_URL"):
            item.add_marker(skip_redis)


@pytest.fixture(scope="session", autouse=True)
def _cheap_password_hashes():
    """Personas' passwords hashed at one PBKDF2 iteration (tests/hashers.py says why live servers
    still accept them); a module that wants MD5 still sets it with the ``settings`` fixture."""
    from django.test import override_settings

    with override_settings(PASSWORD_HASHERS=["tests.hashers.SingleIterationPBKDF2"]):
        yield


@pytest.fixture(autouse=True)
def _empty_cache():
    """Each test starts with no rate-limit counters: the local-memory cache lives as long as the
    test process, and user ids repeat between tests (SQLite reuses rolled-back ids), so one test's
    checkouts or failed logins would otherwise count against the next one's personas."""
    from django.core.cache import cache

    from proxy.selectors import price_cache_clear

    cache.clear()
    price_cache_clear()  # the routes and aliases a previous test's requests cached in this process


@pytest.fixture(autouse=True)
def _closed_breakers():
    """Each test starts with every upstream's circuit breaker closed: they live as long as the
    process, and one test's failing upstream would otherwise be skipped in the next."""
    from proxy import routing

    routing.reset()
    yield
    routing.reset()


@pytest.fixture
def one_minute():
    """Requests per minute and tokens per minute count in calendar-minute windows
    (``proxy.limits``): a test that spends a limit and expects the next request refused must not
    straddle a minute's end, where the counter starts again (one CI run in many met one). Near
    the end of a minute, wait for the next one."""
    left = 60 - time.time() % 60
    if left < 12:
        time.sleep(left + 0.05)


def make_user(email: str, *, balance: str = "0", password: str = "correct horse battery staple", **extra):
    from accounts.services import user_signup
    from core.money import parse_usd
    from wallet.models import EntryKind
    from wallet.services import wallet_credit

    user = user_signup(email=email, password=password)
    if extra:
        for field, value in extra.items():
            setattr(user, field, value)
        user.save()
    amount = parse_usd(balance)
    if amount:
        wallet_credit(
            wallet=user.wallet,
            amount=amount,
            kind=EntryKind.TOP_UP,
            idempotency_key=f"test:opening:{email}",
            description="opening balance",
        )
        user.wallet.refresh_from_db()
    return user


@pytest.fixture
def alice(db):
    return make_user("alice@example.com", balance="10.00")


@pytest.fixture
def bob(db):
    return make_user("bob@example.com")


@pytest.fixture
def mallory(db):
    return make_user("mallory@example.com", balance="1.00")


@pytest.fixture
def staff(db):
    return make_user("staff@example.com", is_staff=True, is_superuser=True)


def bearer_client(user, **key_kwargs):
    """A DRF APIClient that authenticates with a fresh desktop access token for ``user``."""
    from rest_framework.test import APIClient

    from accounts.services import token_pair_issue

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_pair_issue(user=user).access}")
    return client


@pytest.fixture
def alice_client(alice):
    return bearer_client(alice)


@pytest.fixture
def bob_client(bob):
    return bearer_client(bob)


@pytest.fixture
def mallory_client(mallory):
    return bearer_client(mallory)


@pytest.fixture
def alice_key(alice):
    """(ApiKey row, secret) with the default proxy scope."""
    from accounts.services import api_key_create

    return api_key_create(user=alice, name="alice laptop")


RACE_TIMEOUT = 60  # seconds a racing thread may wait at the barrier or take to finish


def race(worker, threads: int) -> list:
    """Run ``worker(index)`` in ``threads`` threads released together by a barrier, so that they
    genuinely contend (each has its own database connection, closed when it is done). Returns
    their results in finishing order; an exception a worker raised is returned as its result,
    never lost."""
    from django.db import connections

    barrier = threading.Barrier(threads, timeout=RACE_TIMEOUT)
    results: list = []
    lock = threading.Lock()

    def run(index: int):
        try:
            barrier.wait()
            outcome = worker(index)
        except BaseException as exc:  # reported to the main thread, never lost
            outcome = exc
        finally:
            connections.close_all()
        with lock:
            results.append(outcome)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(RACE_TIMEOUT)
    assert not any(thread.is_alive() for thread in pool), "a worker hung"
    return results


@pytest.fixture
def redis_cache(settings):
    """Django's cache on the test Redis (``TEST_REDIS_URL``), under a prefix of this process's own,
    emptied: counters then live where every server process would see them."""
    from django.core.cache import cache

    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ["TEST_REDIS_URL"],
            "KEY_PREFIX": f"tt-test-{os.getpid()}",
        }
    }
    cache.clear()
    yield cache
    cache.clear()
