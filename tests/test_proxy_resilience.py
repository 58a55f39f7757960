"""The hot path when things go wrong around it: a database that restarts or drops connections,
reconcile_holds racing a live settlement, a cache that fails once money has moved, absurd client
input, and a client that leaves at any moment. Each was a defect found in review of the async hot
path; the last one guards its cancellation design."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import asyncio
import json
import time
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.utils import timezone

from accounts.services import api_key_create
from backoffice.reports import usage_discrepancies
from core.usage import Usage
from infra import adb
from proxy.models import ModelPrice, UsageRecord
from proxy.reconcile import hold_reconcile
from proxy.services import Outcome, RequestMeta, arequest_begin, arequest_settle
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    DONE,
    MODEL,
    Reply,
    StreamReply,
    call,
    chunk,
    close_loop_resources,
    completion,
    fake_upstream,
    fake_upstream_server,
    key,
    price,
    run_async,
    sse,
    usage,
    usage_chunk,
)
from wallet.models import Entry, Hold, HoldStatus, Wallet

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}]}
ANSWER = completion(u=usage(10, 2, cost="0.00001"))


async def _request(body, token, disconnect_after=None):
    """One proxied call on the *current* loop, leaving its pool open (unlike ``proxy_call``)."""
    from config.asgi import application
    from tests.fake_upstream import _proxy_call

    raw = json.dumps(body).encode()
    return await _proxy_call(application, CHAT, raw, [raw], token, None, disconnect_after, 10, "POST")


def _idle_pool_pids() -> list[int]:
    return [conn.info.backend_pid for conn in adb._pools[asyncio.get_running_loop()]._pool]


def _terminate(pids: list[int]) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        for pid in pids:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


def _begin(user, request_id: str):
    meta = RequestMeta(request_id=request_id, user=user, api_key=None, endpoint="chat.completions", model=MODEL)
    return run_async(arequest_begin, meta=meta, prompt_chars=4000, requested_output=100)


def _expire(hold) -> Hold:
    Hold.objects.filter(pk=hold.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    return Hold.objects.get(pk=hold.pk)


# --- the async pool and a database that restarts ---------------------------------------------


@pytest.mark.postgres
def test_a_pooled_connection_the_server_closed_is_not_handed_to_the_next_request(fake_upstream, alice, key):
    fake_upstream.script("chat", Reply(body=ANSWER), Reply(body=ANSWER))

    async def scenario():
        try:
            assert (await _request(HELLO, key)).status == 200
            await asyncio.to_thread(_terminate, _idle_pool_pids())  # a restart, failover, idle timeout
            await asyncio.sleep(0.1)
            return await _request(HELLO, key)
        finally:
            await close_loop_resources()

    assert async_to_sync(scenario)().status == 200


@pytest.mark.postgres
def test_a_connection_that_died_during_the_stream_does_not_leave_the_hold_open(fake_upstream, alice, key):
    items = [sse(chunk("", role="assistant"))]
    for _ in range(8):
        items += [0.05, sse(chunk("word "))]
    items += [sse(chunk(None, finish="stop")), usage_chunk(usage(10, 8, cost="0.00002")), DONE]
    fake_upstream.script("chat", StreamReply(items))

    async def scenario():
        async def kill_idle_connections_once_upstream():
            while not fake_upstream.requests:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(_terminate, _idle_pool_pids())

        killer = asyncio.ensure_future(kill_idle_connections_once_upstream())
        try:
            await _request({**HELLO, "stream": True}, key)
        finally:
            await killer
            await close_loop_resources()

    async_to_sync(scenario)()
    assert Hold.objects.get().status == HoldStatus.SETTLED


@pytest.mark.postgres
def test_the_hot_path_serves_again_as_soon_as_the_database_is_back(fake_upstream, alice, key, settings, monkeypatch):
    settings.PROXY_DB_POOL_TIMEOUT = 0.5
    real_params = adb._connection_params
    port = real_params().get("port") or 5432

    def unreachable():
        return {**real_params(), "port": 1}  # connection refused, like a restarting server

    monkeypatch.setattr(adb, "_connection_params", unreachable)
    fake_upstream.script("chat", *[Reply(body=ANSWER)] * 20)

    async def scenario():
        try:
            start = time.monotonic()
            while time.monotonic() - start < 3.5:  # an outage of 3.5 s: attempts at 0, 1, 3, then 7 s
                await _request(HELLO, key)
            adb._pools[asyncio.get_running_loop()].kwargs["port"] = port  # the database is back
            # No sitting out a reconnect backoff: one of the next few requests (each waits at most
            # PROXY_DB_POOL_TIMEOUT for a connection) is served.
            return [(await _request(HELLO, key)).status for _ in range(3)]
        finally:
            await close_loop_resources()

    assert 200 in async_to_sync(scenario)()


# --- reconcile_holds against a live settlement ---------------------------------------------------


def test_reconcile_that_loses_the_race_to_the_live_settlement_leaves_the_record_alone(fake_upstream, alice, price):
    begun = _begin(alice, "req_race")
    stale = _expire(begun.hold)  # the command picked it, then spent seconds on the lookup
    outcome = Outcome(usage=Usage(prompt_tokens=5000, completion_tokens=5000), upstream_model=MODEL)
    run_async(arequest_settle, begun=begun, outcome=outcome)  # meanwhile the request settled
    generation = {"total_cost": Decimal("0.01"), "native_tokens_prompt": 900, "native_tokens_completion": 80}
    hold_reconcile(hold=stale, generation=generation)
    assert UsageRecord.objects.get().charge == -Entry.objects.get(kind="usage").amount
    assert usage_discrepancies() == []


def test_a_late_settlement_after_reconcile_charged_nothing_tells_the_client_nothing_was_charged(fake_upstream, alice):
    ModelPrice.objects.create(model=MODEL, prompt=Decimal("0"), completion=Decimal("0.60"))
    begun = _begin(alice, "req_late")
    hold_reconcile(hold=_expire(begun.hold), generation=None)  # prompt estimate at $0: no entry
    outcome = Outcome(usage=Usage(prompt_tokens=10, completion_tokens=5000), upstream_model=MODEL)
    told = run_async(arequest_settle, begun=begun, outcome=outcome)
    assert not Entry.objects.filter(kind="usage").exists()
    assert told.charge == UsageRecord.objects.get().charge == 0


# --- guardrail counters around the money ---------------------------------------------------------


def test_a_cache_failure_after_settlement_still_delivers_the_answer_that_was_charged(
    fake_upstream, alice, price, monkeypatch
):
    from django.core.cache.backends.locmem import LocMemCache

    token = api_key_create(user=alice, name="capped", limits={"daily_spend": "5.00"})[1]
    fake_upstream.script("chat", Reply(body=ANSWER))
    real_incr = LocMemCache.incr

    def incr(self, *args, **kwargs):
        if fake_upstream.requests:  # the cache (Redis) goes away once the request is upstream
            raise ConnectionError("redis: connection refused")
        return real_incr(self, *args, **kwargs)

    monkeypatch.setattr(LocMemCache, "incr", incr)
    response = call(CHAT, HELLO, token=token)
    assert Entry.objects.get(kind="usage").amount < 0  # charged either way
    assert response.status == 200


def test_a_hold_that_could_not_be_taken_gives_its_spend_reservation_back(fake_upstream, alice, price, monkeypatch):
    from django.core.cache import cache
    from django.db import OperationalError

    from wallet import services as wallet_services

    row, token = api_key_create(user=alice, name="capped", limits={"daily_spend": "0.003"})
    failures = {"left": 4}
    # The hold's statement goes through the group-commit batcher (wallet.pg.arun).
    real_fetchone, real_create = adb.fetchone_batched, wallet_services.hold_create

    async def fetchone(sql, params=None, **kwargs):
        if "INSERT INTO wallet_hold" in sql.replace('"', "") and failures["left"]:
            failures["left"] -= 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await real_fetchone(sql, params, **kwargs)

    def hold_create(**kwargs):  # the ORM path (SQLite)
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("database is locked")
        return real_create(**kwargs)

    monkeypatch.setattr(adb, "fetchone_batched", fetchone)
    monkeypatch.setattr(wallet_services, "hold_create", hold_create)
    assert [call(CHAT, HELLO, token=token).status for _ in range(4)] == [503] * 4
    assert cache.get(f"tt:spend:{row.pk}:daily:{timezone.now():%Y%m%d}") in (0, None)
    fake_upstream.script("chat", Reply(body=ANSWER))
    assert call(CHAT, HELLO, token=token).status == 200  # not capped for the day by requests that never ran


# --- client input that reaches the database unchecked --------------------------------------------


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens", "n"])
def test_an_absurd_output_cap_or_choice_count_is_a_400(fake_upstream, alice, key, name):
    response = call(CHAT, {**HELLO, name: 10**20}, token=key)
    assert response.status == 400 and response.error["param"] == name
    assert not fake_upstream.requests


# --- the cancellation design holds --------------------------------------------------------------------


@pytest.mark.parametrize("progress_after", [1.0, 0.02])
@pytest.mark.parametrize("stream", [False, True])
def test_a_disconnect_at_any_moment_leaves_ledger_holds_and_records_agreeing(
    fake_upstream, alice, key, stream, progress_after, monkeypatch
):
    """Every statement slowed down, the client leaves at a grid of moments covering admission,
    relay, progress writes and settlement: no hold stays active, nothing stays held, and every
    record's charge is what the ledger debited."""
    from channels.testing import ApplicationCommunicator

    from config.asgi import application
    from proxy.endpoints import request as consumers
    from tests.fake_upstream import scope_for

    def slowed(real):
        async def slow_fetchone(sql, params=None, **kwargs):
            await asyncio.sleep(0.03)
            result = await real(sql, params, **kwargs)
            await asyncio.sleep(0.03)
            return result

        return slow_fetchone

    # Every statement: the hold path's go through the group-commit batcher, the rest alone.
    monkeypatch.setattr(adb, "fetchone", slowed(adb.fetchone))
    monkeypatch.setattr(adb, "fetchone_batched", slowed(adb.fetchone_batched))
    monkeypatch.setattr(consumers, "PROGRESS_AFTER", progress_after)
    raw = json.dumps({**HELLO, "stream": stream}).encode()
    moments = [i * 0.02 for i in range(20)]
    for _ in moments:
        if stream:
            items = [sse(chunk("", role="assistant")), 0.03, sse(chunk("a ")), 0.03, sse(chunk("b "))]
            items += [sse(chunk(None, finish="stop")), usage_chunk(usage(10, 2, cost="0.00001")), DONE]
            fake_upstream.script("chat", StreamReply(items))
        else:
            fake_upstream.script("chat", Reply(body=ANSWER, delay=0.06))

    async def leave_at(moment):
        communicator = ApplicationCommunicator(application, scope_for(CHAT, key, None, raw))
        await communicator.send_input({"type": "http.request", "body": raw, "more_body": False})
        await asyncio.sleep(moment)
        await communicator.send_input({"type": "http.disconnect"})
        await communicator.wait(5)

    async def sweep():
        try:
            for moment in moments:
                await leave_at(moment)
        finally:
            await close_loop_resources()

    async_to_sync(sweep)()
    wallet = Wallet.objects.get(user=alice)
    assert not Hold.objects.filter(status=HoldStatus.ACTIVE).exists() and wallet.held == 0
    assert usage_discrepancies() == []
    assert wallet.balance == 10_000_000_000 - sum(UsageRecord.objects.values_list("charge", flat=True))
