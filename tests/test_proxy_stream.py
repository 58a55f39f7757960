"""Disconnects, the demo model, embeddings and the hot path's query budget."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import asyncio
import json
from contextlib import contextmanager
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db.backends.signals import connection_created
from django.utils import timezone

from accounts.models import ApiKey
from accounts.services import api_key_create
from infra import adb
from proxy import demo, limits, services
from proxy.models import CostSource, ModelPrice, UsageRecord, UsageStatus
from proxy.selectors import price_cache_clear, price_current
from proxy.services import RequestMeta
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    MODEL,
    Reply,
    StreamReply,
    call,
    close_loop_resources,
    completion,
    fake_upstream,
    fake_upstream_server,
    key,
    price,
    run_async,
    slow_stream,
    usage,
)
from wallet.models import Hold, HoldStatus, Wallet

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}]}


def test_a_client_that_disconnects_cancels_the_upstream_within_a_second_and_pays_an_estimate(fake_upstream, alice, key):
    fake_upstream.script("chat", StreamReply(slow_stream(seconds=10)))
    response = call(CHAT, {**HELLO, "stream": True}, token=key, disconnect_after=6)
    # The upstream's 10 s stream is cut off: the proxy closed it when the client left.
    assert fake_upstream.stream_finished.wait(5), "the upstream kept streaming after the client left"
    assert fake_upstream.stream_cut
    record = UsageRecord.objects.get()
    assert (record.status, record.estimated, record.cost_source) == (UsageStatus.CANCELLED, True, CostSource.ESTIMATE)
    words = response.body.count(b"word ")
    assert words >= 4 and record.completion_tokens >= (5 * words) // 4  # output that reached the client is billed
    assert record.charge > 0
    assert Wallet.objects.get(user=alice).balance == 10_000_000_000 - record.charge
    assert Hold.objects.get().status == HoldStatus.SETTLED


def test_the_demo_model_streams_and_bills_offline(fake_upstream, settings, monkeypatch):
    from tests.conftest import make_user

    monkeypatch.setattr(demo, "WORD_DELAY", 0.001)
    settings.UPSTREAM_API_KEY = ""
    settings.SIGNUP_TRIAL_CREDIT = Decimal("1.00")
    call_command("seed", stdout=open("/dev/null", "w"))
    call_command("seed", stdout=open("/dev/null", "w"))  # idempotent
    assert ModelPrice.objects.filter(model="tokentill/demo").count() == 1
    carol = make_user("carol@example.com")  # trial credit only
    token = api_key_create(user=carol, name="k")[1]
    body = {"model": "tokentill/demo", "messages": [{"role": "user", "content": "hello there"}], "stream": True}
    response = call(CHAT, body, token=token)
    chunks = [json.loads(e) for e in response.data_events()[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert response.status == 200 and "Tokentill demo model" in text and "hello there" in text
    assert response.data_events()[-1] == "[DONE]" and all('"usage"' not in e for e in response.data_events())
    record = UsageRecord.objects.get()
    assert record.cost_source == CostSource.PRICE_TABLE and record.charge > 0
    assert response.tokentill()["balance"] == f"{Decimal(1_000_000_000 - record.charge) / 10**9:.9f}"
    whole = call(CHAT, {**body, "stream": False}, token=token)
    assert "Tokentill demo model" in whole.json()["choices"][0]["message"]["content"]
    assert not fake_upstream.requests


def test_the_demo_model_is_hidden_once_an_upstream_is_configured(fake_upstream, alice):
    call_command("seed", stdout=open("/dev/null", "w"))
    token = api_key_create(user=alice, name="k")[1]
    body = {"model": "tokentill/demo", "messages": [{"role": "user", "content": "hi"}]}
    assert call(CHAT, body, token=token).error["code"] == "model_not_found"


def test_embeddings_are_billed_from_openrouter_cost_or_prompt_tokens(fake_upstream, alice, key, settings):
    reply = b'{"object":"list","model":"openai/gpt-4o-mini","data":[{"object":"embedding","index":0,'
    reply += b'"embedding":[0.1,0.2]}],"usage":{"prompt_tokens":7,"total_tokens":7,"cost":0.00000105}}'
    fake_upstream.script("embeddings", Reply(body=reply))
    response = call("/v1/embeddings", {"model": MODEL, "input": "hello"}, token=key)
    assert response.status == 200 and response.headers["x-tokentill-charge"] == "0.000001260"
    assert response.body == reply.replace(b'"cost":0.00000105', b'"cost":0.000001260')  # the charge, not our cost
    settings.UPSTREAM_KIND = "openai"
    fake_upstream.script("embeddings", Reply(body={"data": [], "model": MODEL, "usage": {"prompt_tokens": 10000}}))
    response = call("/v1/embeddings", {"model": MODEL, "input": ["a", "b"]}, token=key)
    assert response.headers["x-tokentill-charge"] == "0.001800000"  # 10k × $0.15/M × 1.2
    records = UsageRecord.objects.filter(endpoint="embeddings").order_by("id")
    assert [r.charge for r in records] == [1_260, 1_800_000]
    (first, second) = fake_upstream.calls("embeddings")
    assert first.json["user"] == second.json["user"] != str(alice.pk)  # the pseudonym, not the id
    assert second.json["input"] == ["a", "b"] and "stream_options" not in second.json


def test_embeddings_refuse_missing_input_and_streaming(fake_upstream, alice, key):
    assert call("/v1/embeddings", {"model": MODEL}, token=key).status == 400
    assert call("/v1/embeddings", {"model": MODEL, "input": "x", "stream": True}, token=key).status == 400
    assert not fake_upstream.requests


@contextmanager
def orm_queries_in_any_thread():
    """Every ORM query run while the block is open, in any thread (the proxy's ORM work runs in
    worker threads, whose connections ``django_assert_num_queries`` cannot see). Tests run with
    ``CONN_MAX_AGE = 0``, so each worker call opens the connection this hooks into."""
    queries: list[str] = []
    hooked = []

    def record(execute, sql, params, many, context):
        queries.append(sql)
        return execute(sql, params, many, context)

    def hook(sender, connection, **kwargs):
        if record not in connection.execute_wrappers:  # a thread's wrapper object reconnects
            connection.execute_wrappers.append(record)
            hooked.append(connection)

    connection_created.connect(hook)
    try:
        yield queries
    finally:
        connection_created.disconnect(hook)
        for connection in hooked:
            connection.execute_wrappers.remove(record)


def test_the_hot_path_runs_a_pinned_number_of_statements(fake_upstream, alice, key, settings):
    settings.PROXY_PRICE_CACHE_SECONDS = 60
    price_cache_clear()
    price_current(MODEL)
    fake_upstream.script("chat", *[Reply(body=completion(u=usage(100, 20))) for _ in range(3)])
    assert call(CHAT, HELLO, token=key).status == 200  # the key's first use stamps last_used_at; the next does not
    assert call(CHAT, HELLO, token=key).status == 200  # (on PostgreSQL: read again, and remembered)
    sent: list[str] = []
    with orm_queries_in_any_thread() as orm, adb.observe(sent.append):
        response = call(CHAT, HELLO, token=key)
    assert response.status == 200
    if adb.native():
        # On PostgreSQL all of it runs on the event loop's async connections, none in the ORM,
        # and each step is one statement: the hold with its pending usage record (and the check
        # that the remembered key and user are unchanged — tests/test_proxy_auth_cache.py); the
        # settlement with the record's update.
        assert orm == []
        begin, settle = sent
        assert "wallet_hold" in begin and 'INSERT INTO "proxy_usagerecord"' in begin and "accounts_apikey" in begin
        assert "wallet_entry" in settle and 'UPDATE "proxy_usagerecord"' in settle
    else:
        # Through the ORM (SQLite): the key with its user and wallet; the hold's conditional
        # UPDATE + INSERT; the record INSERT; then in one transaction the hold checked (locked)
        # active, closed, the wallet debited and read back, the ledger entry, the record UPDATE.
        assert sent == []
        writes = [sql for sql in orm if not sql.startswith(("BEGIN", "SAVEPOINT", "RELEASE"))]
        assert len(writes) == 1 + 2 + 1 + 6, "\n".join(sql[:90] for sql in orm)
    price_cache_clear()


def test_stale_price_caches_are_read_once_for_every_request_that_finds_them_stale(
    fake_upstream, alice, price, settings
):
    # Requests that find the tiers and a model's routes stale at the same moment (under load: all
    # of those in flight when the cache expires) wait for one read of the tables, not one each.
    settings.PROXY_PRICE_CACHE_SECONDS = 60
    price_cache_clear()
    now = timezone.now()
    metas = [
        RequestMeta(request_id=f"req_{i}", user=alice, api_key=None, endpoint="chat.completions", model=MODEL)
        for i in range(8)
    ]
    plan = {"prompt_chars": 400, "requested_output": 100, "now": now}

    async def plan_all():
        return await asyncio.gather(*(services._aplan(meta, **plan) for meta in metas))

    with orm_queries_in_any_thread() as orm:
        plans = run_async(plan_all)
    tables = ["proxy_modelalias", "proxy_modelfallback", "proxy_agentroute", "proxy_modelprice"]
    reads = {table: sum(f'FROM "{table}"' in sql for sql in orm) for table in tables}
    assert reads == dict.fromkeys(tables, 1), "\n".join(sql[:90] for sql in orm)
    # And each is the plan the tables give.
    alone = services.request_plan(meta=metas[0], **plan)
    assert {(each.served.price.pk, each.served.amount) for each in plans} == {
        (alone.served.price.pk, alone.served.amount)
    }
    price_cache_clear()


def test_a_request_no_counter_applies_to_is_planned_as_the_counters_would_plan_it(fake_upstream, alice, key):
    # _aplan skips the counter checks when none applies (limits.uses_counters): the plan, and the
    # reservation settlement gives back, must be what running every check would have made.
    meta = RequestMeta(
        request_id="req_plain",
        user=alice,
        api_key=ApiKey.objects.get(user=alice),
        endpoint="chat.completions",
        model=MODEL,
        run="run-1",
    )
    assert not limits.uses_counters(api_key=meta.api_key, run=meta.run, user=alice)
    plan = {"meta": meta, "prompt_chars": 400, "requested_output": 100, "choices": 2, "now": timezone.now()}
    checked, skipped = services.request_plan(**plan), services.request_plan(**plan, counters=False)
    assert skipped.reservation == checked.reservation
    assert skipped.reservation.amount == checked.served.amount > 0
    assert (skipped.served, skipped.fallback, skipped.choice) == (checked.served, checked.fallback, checked.choice)


def test_a_client_that_leaves_before_forwarding_is_not_charged_and_the_upstream_never_hears(fake_upstream, alice, key):
    from asgiref.sync import async_to_sync
    from channels.testing import ApplicationCommunicator

    from config.asgi import application
    from tests.fake_upstream import scope_for

    raw = json.dumps(HELLO).encode()

    async def leave_at_once():
        communicator = ApplicationCommunicator(application, scope_for(CHAT, key, None, raw))
        await communicator.send_input({"type": "http.request", "body": raw, "more_body": False})
        await communicator.send_input({"type": "http.disconnect"})
        await communicator.wait(5)
        await close_loop_resources()

    async_to_sync(leave_at_once)()
    record = UsageRecord.objects.get()
    assert (record.status, record.charge) == (UsageStatus.CANCELLED, 0)
    assert Hold.objects.get().status == HoldStatus.RELEASED
    assert Wallet.objects.get(user=alice).balance == 10_000_000_000
    assert not fake_upstream.requests


async def test_a_settled_charge_reaches_the_users_balance_socket_from_the_proxy(fake_upstream, alice, key):
    """The settlement's balance event is sent from the consumer's loop once it has committed."""
    from channels.db import database_sync_to_async
    from channels.testing import WebsocketCommunicator

    from config.asgi import application
    from tests.fake_upstream import completion, proxy_call, usage

    fake_upstream.script("chat", Reply(body=completion(u=usage(100, 20))))
    ws = WebsocketCommunicator(application, "/ws/events", headers=[(b"authorization", f"Bearer {key}".encode())])
    assert (await ws.connect())[0]
    snapshot = await ws.receive_json_from(1)
    response = await proxy_call(CHAT, HELLO, token=key)
    assert response.status == 200
    event = await ws.receive_json_from(1)
    wallet = await database_sync_to_async(Wallet.objects.get)(user=alice)
    assert snapshot["reason"] == "snapshot" and event["reason"] == "usage"
    assert event["balance"] == response.headers["x-tokentill-balance"] == f"{wallet.balance / 10**9:.9f}"
    assert event["held"] == "0.000000000"
    await ws.disconnect()


@pytest.mark.postgres
def test_a_database_too_busy_for_the_request_is_a_503_and_nothing_moves(fake_upstream, alice, key, settings):
    from asgiref.sync import async_to_sync

    from tests.fake_upstream import proxy_call

    settings.PROXY_DB_POOL_SIZE, settings.PROXY_DB_POOL_TIMEOUT = 1, 0.2

    async def with_the_only_connection_taken():
        async with adb.connection():
            return await proxy_call(CHAT, HELLO, token=key)

    response = async_to_sync(with_the_only_connection_taken)()
    assert response.status == 503 and response.headers["retry-after"] == "1"
    assert response.error["code"] == "service_unavailable" and "Nothing was charged" in response.error["message"]
    assert response.headers["content-type"] == "application/json" and response.headers["x-request-id"]
    assert not fake_upstream.requests
    assert not Hold.objects.exists() and Wallet.objects.get(user=alice).balance == 10_000_000_000


@pytest.mark.postgres
def test_a_busy_database_refuses_new_requests_while_a_running_one_still_settles(fake_upstream, alice, key, settings):
    """Under overload admissions are shed — a 503, nothing held — and the requests already running
    are billed all the same: a settlement waits PROXY_DB_SETTLE_TIMEOUT for a connection where an
    admission waits PROXY_DB_POOL_TIMEOUT (a settlement that gave up would end its stream without
    its last event and leave its hold to reconcile_holds, HOLD_TTL later)."""
    import asyncio
    import threading

    from asgiref.sync import async_to_sync

    from config.asgi import application
    from tests.fake_upstream import _proxy_call, stream_of

    settings.PROXY_DB_POOL_SIZE, settings.PROXY_DB_POOL_TIMEOUT, settings.PROXY_DB_SETTLE_TIMEOUT = 1, 0.2, 10
    gate = threading.Event()
    words = stream_of("Po", "ng", u=usage(10, 2, cost="0.00001"))
    fake_upstream.script("chat", StreamReply([*words[:2], gate, *words[2:]]))
    streamed, plain = json.dumps({**HELLO, "stream": True}).encode(), json.dumps(HELLO).encode()

    def send(raw: bytes):
        return _proxy_call(application, CHAT, raw, [raw], key, None, None, 10, "POST")

    async def scenario():
        try:
            running = asyncio.ensure_future(send(streamed))
            while not fake_upstream.requests:  # admitted: its hold taken, the upstream called
                await asyncio.sleep(0.01)
            async with adb.connection():  # the pool's only connection, busy for a while
                refused = await send(plain)
                gate.set()  # the running stream ends, and its settlement waits for the connection
                await asyncio.sleep(1.0)  # five times as long as an admission may
            return refused, await running
        finally:
            gate.set()
            await close_loop_resources()

    refused, served = async_to_sync(scenario)()
    assert refused.status == 503 and "Nothing was charged" in refused.error["message"]
    assert served.status == 200 and served.data_events()[-1] == "[DONE]"
    assert len(fake_upstream.requests) == 1
    hold, record = Hold.objects.get(), UsageRecord.objects.get()
    assert hold.status == HoldStatus.SETTLED and record.status == UsageStatus.OK and record.charge > 0
    assert Wallet.objects.get(user=alice).balance == 10_000_000_000 - record.charge


def test_a_request_that_runs_a_while_keeps_its_hold_from_expiring(fake_upstream, alice, key, settings, monkeypatch):
    """Progress writes push the hold's expiry out, so reconcile_holds never takes a live stream
    for an abandoned one — however much longer than HOLD_TTL it runs."""
    from proxy.endpoints import request as consumers

    monkeypatch.setattr(consumers, "PROGRESS_AFTER", 0.1)
    monkeypatch.setattr(consumers, "PROGRESS_EVERY", 0.2)  # made a second: the least allowed
    settings.HOLD_TTL = 30
    from itertools import chain

    from tests.fake_upstream import DONE, chunk, sse

    items = chain(slow_stream(seconds=1.5), [sse(chunk(None, finish="stop")), DONE])
    fake_upstream.script("chat", StreamReply(items, headers={"X-Generation-Id": "gen-long"}))
    response = call(CHAT, {**HELLO, "stream": True}, token=key)
    assert response.status == 200 and response.data_events()[-1] == "[DONE]"
    hold, record = Hold.objects.get(), UsageRecord.objects.get()
    assert hold.status == HoldStatus.SETTLED
    assert (hold.expires_at - hold.created_at).total_seconds() >= 30 + 1.0  # extended twice while it ran
    assert record.generation_id == "gen-long" and record.status == UsageStatus.OK


def test_a_large_embeddings_answer_is_relayed_as_it_came_but_for_its_cost(fake_upstream, alice, key):
    """Megabytes of vectors are parsed off the event loop and never re-serialised: only the
    usage object is rewritten (cost restated as the charge), every other byte is the upstream's."""
    vector = ",".join(["0.0123456789"] * 1536)
    data = ",".join(f'{{"object":"embedding","index":{i},"embedding":[{vector}]}}' for i in range(30))
    reply = f'{{"object":"list","model":"{MODEL}","data":[{data}],'.encode()
    reply += b'"usage":{"prompt_tokens":700,"total_tokens":700,"cost":0.00001}}'
    assert len(reply) > 256 * 1024
    fake_upstream.script("embeddings", Reply(body=reply))
    response = call("/v1/embeddings", {"model": MODEL, "input": ["x"] * 30}, token=key)
    assert response.status == 200 and response.headers["x-tokentill-charge"] == "0.000012000"
    assert response.body == reply.replace(b'"cost":0.00001}', b'"cost":0.000012000}')
