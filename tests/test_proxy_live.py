"""The proxy behind a real server (the shipped uvicorn command in a subprocess, sharing the test
database), used by the official openai SDK — sync, async and streaming — and hammered
concurrently on PostgreSQL."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import asyncio
import contextlib
import os
import socket
import threading
import time
from decimal import Decimal

import httpx
import openai
import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from accounts.services import api_key_create
from proxy.models import ModelPrice, UsageRecord, UsageStatus
from tests.conftest import make_user
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    MODEL,
    Reply,
    StreamReply,
    completion,
    fake_upstream,
    fake_upstream_server,
    price,
    slow_stream,
    stream_of,
    usage,
)
from tests.live import live_server
from tests.pgbouncer import pgbouncer_url  # noqa: F401  (fixture)
from wallet.models import Entry, Hold, HoldStatus, Wallet

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "Say pong"}]


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, fake_upstream_server):
    with live_server(
        SECRET_KEY=django_settings.SECRET_KEY,
        UPSTREAM_BASE_URL=fake_upstream_server.url,
        UPSTREAM_API_KEY="sk-or-v1-server-secret",
        UPSTREAM_KIND="openrouter",
        PROXY_PRICE_CACHE_SECONDS="0",
        LOG_LEVEL="WARNING",
    ) as url:
        yield url


@pytest.fixture(scope="module")
def pooled_servers(django_db_setup, django_db_blocker, fake_upstream_server, pgbouncer_url):
    """The same server with its database through PgBouncer in transaction mode
    (``DATABASE_POOLER=transaction``): without prepared statements, and — only where PgBouncer
    can keep them (>= 1.21, ``max_prepared_statements``) — with the proxy's prepared."""
    from django.db import connection

    from tests import pgbouncer

    env = dict(
        SECRET_KEY=django_settings.SECRET_KEY,
        UPSTREAM_BASE_URL=fake_upstream_server.url,
        UPSTREAM_API_KEY="sk-or-v1-server-secret",
        UPSTREAM_KIND="openrouter",
        PROXY_PRICE_CACHE_SECONDS="0",
        LOG_LEVEL="WARNING",
        DATABASE_URL=f"{pgbouncer_url}/{connection.settings_dict['NAME']}",
        DATABASE_POOLER="transaction",
    )
    with contextlib.ExitStack() as stack:
        servers = {"pgbouncer": stack.enter_context(live_server(**env))}
        if pgbouncer.version(pgbouncer.binary()) >= pgbouncer.PREPARED_STATEMENTS_SINCE:
            servers["pgbouncer-prepared"] = stack.enter_context(live_server(**env, PROXY_DB_PREPARE="true"))
        yield servers


@pytest.fixture
def sdk_key(alice, price):
    return api_key_create(user=alice, name="sdk")[1]


def test_the_openai_sdk_gets_a_completion_and_its_charge(server, fake_upstream, sdk_key):
    fake_upstream.script("chat", Reply(body=completion("Pong.", u=usage(412, 37, cost="0.0000597"))))
    client = openai.OpenAI(base_url=server + "/v1", api_key=sdk_key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    result = raw.parse()
    assert result.choices[0].message.content == "Pong." and result.usage.prompt_tokens == 412
    assert raw.headers["x-tokentill-charge"] == "0.000071640"
    assert raw.headers["x-request-id"] == UsageRecord.objects.get().request_id


def test_the_openai_sdk_streams_and_never_sees_the_usage_chunk_it_did_not_ask_for(server, fake_upstream, sdk_key):
    u = usage(20, 3, cost="0.000012")
    fake_upstream.script("chat", StreamReply(stream_of("Po", "ng", ".", u=u, comments=True)))
    client = openai.OpenAI(base_url=server + "/v1", api_key=sdk_key, max_retries=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Pong."
    assert all(c.choices for c in chunks)
    assert UsageRecord.objects.get().charge == 14_400


def test_the_async_openai_sdk_streams_with_usage_when_asked(server, fake_upstream, sdk_key):
    fake_upstream.script("chat", StreamReply(stream_of("Hi", u=usage(5, 1, cost="0.000001"))))

    async def run():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=sdk_key, max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        await client.close()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 1


def test_the_openai_sdk_sees_402_and_model_not_found_as_api_errors(server, fake_upstream, bob, price):
    client = openai.OpenAI(base_url=server + "/v1", api_key=api_key_create(user=bob, name="k")[1], max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert refused.value.status_code == 402 and refused.value.body["code"] == "insufficient_funds"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="nobody/nothing", messages=MESSAGES)
    assert unknown.value.body["code"] == "model_not_found"
    assert not fake_upstream.requests


@pytest.mark.postgres
@pytest.mark.parametrize("through", ["postgres", "pgbouncer", "pgbouncer-prepared"])
def test_concurrent_requests_never_spend_more_than_the_wallet_holds(request, through, fake_upstream, price):
    """One hot wallet, 20 requests at once for 5 requests' worth: exactly 5 are served — with the
    server connected straight to PostgreSQL, and through PgBouncer in transaction mode."""
    if through == "postgres":
        server = request.getfixturevalue("server")
    else:
        server = request.getfixturevalue("pooled_servers").get(through)
        if server is None:
            pytest.skip(
                "PgBouncer < 1.21 cannot keep prepared statements in transaction mode (max_prepared_statements)"
            )
    k = 5
    # 256 output tokens at $390.625/M with no markup is exactly $0.10 — hold and charge alike.
    ModelPrice.objects.create(model="conc/model", completion=Decimal("390.625"), markup=Decimal("0"))
    user = make_user("crowd@example.com", balance=str(Decimal("0.1") * k))
    token = api_key_create(user=user, name="k")[1]
    reply = completion("ok", u=usage(3, 256), model="conc/model")
    fake_upstream.script("chat", *[Reply(body=reply, delay=0.2) for _ in range(4 * k)])
    body = {"model": "conc/model", "messages": MESSAGES, "max_tokens": 256}

    async def crowd():
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            headers = {"Authorization": f"Bearer {token}"}
            requests = [client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(4 * k)]
            return await asyncio.gather(*requests)

    statuses = sorted(r.status_code for r in asyncio.run(crowd()))
    assert statuses == [200] * k + [402] * (3 * k)
    assert len(fake_upstream.calls("chat")) == k
    wallet = Wallet.objects.get(user=user)
    assert (wallet.balance, wallet.held) == (0, 0)
    assert Entry.objects.filter(wallet=wallet, kind="usage").count() == k
    assert not Hold.objects.filter(status=HoldStatus.ACTIVE).exists()
    assert UsageRecord.objects.filter(status=UsageStatus.REFUSED, http_status=402).count() == 3 * k
    call_command("verify_ledger", stdout=open(os.devnull, "w"))  # raises CommandError on any discrepancy


# --- what the server itself must not get in the way of ------------------------------------


def wait_for(predicate, timeout: float = 5):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            return result
        time.sleep(0.05)
    return result


def test_a_stream_reaches_the_client_chunk_by_chunk_as_the_upstream_sends_it(server, fake_upstream, sdk_key):
    # The upstream sends its first word, then waits — until the client has that word. A proxy that
    # held anything back would leave the client without it, and the gate shut.
    first_word_arrived = threading.Event()
    items = stream_of("Po", "ng", u=usage(5, 2, cost="0.000001"))
    items.insert(2, first_word_arrived)
    fake_upstream.script("chat", StreamReply(items))
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    received = b""
    headers = {"Authorization": f"Bearer {sdk_key}"}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=headers, timeout=10) as response:
        assert response.headers["content-type"] == "text/event-stream"
        for chunk in response.iter_raw():
            received += chunk
            if b'"Po"' in received and not first_word_arrived.is_set():
                assert b'"ng"' not in received and b"[DONE]" not in received
                first_word_arrived.set()
    assert first_word_arrived.is_set(), "the first word was held back until the stream ended"
    assert b'"ng"' in received and b"[DONE]" in received


def test_a_client_that_hangs_up_mid_stream_cancels_the_upstream_and_pays_for_what_it_got(
    server, fake_upstream, alice, sdk_key
):
    fake_upstream.script("chat", StreamReply(slow_stream(seconds=10)))
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    received = b""
    headers = {"Authorization": f"Bearer {sdk_key}"}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=headers, timeout=10) as response:
        for chunk in response.iter_raw():
            received += chunk
            if received.count(b"word ") >= 3:
                break
    # Leaving the block closed the connection mid-body; the upstream's 10 s stream is cut off.
    assert fake_upstream.stream_finished.wait(5), "the upstream kept streaming after the client left"
    assert fake_upstream.stream_cut
    record = wait_for(lambda: UsageRecord.objects.exclude(status=UsageStatus.PENDING).first())
    assert record is not None and record.status == UsageStatus.CANCELLED and record.charge > 0
    assert Wallet.objects.get(user=alice).balance == 10_000_000_000 - record.charge
    assert not Hold.objects.filter(status=HoldStatus.ACTIVE).exists()


def test_a_body_over_the_limit_is_refused_before_the_rest_is_sent(server, fake_upstream, sdk_key):
    declared = 8 * django_settings.PROXY_MAX_BODY_BYTES
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {sdk_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"model": "' + b"x" * 65536)
        # Nothing more is sent: the answer must come from what arrived, not from reading it all.
        answer = b""
        while b"request_too_large" not in answer and (part := sock.recv(65536)):
            answer += part
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"request_too_large" in answer
    assert UsageRecord.objects.get().http_status == 413 and not fake_upstream.requests


def test_a_request_whose_server_dies_mid_stream_is_charged_what_openrouter_reports(
    fake_upstream, fake_upstream_server, alice, price, settings
):
    """SIGKILL mid-stream: the hold and the pending record outlive the process, and
    reconcile_holds charges what OpenRouter's generation lookup reports — which it can do only
    because the running request wrote down its generation id (and its output so far)."""
    import io
    from datetime import timedelta

    from django.utils import timezone

    from proxy.models import CostSource
    from tests.live import crash

    token = api_key_create(user=alice, name="k")[1]
    fake_upstream.script("chat", StreamReply(slow_stream(seconds=20), headers={"X-Generation-Id": "gen-crash-42"}))
    env = {"UPSTREAM_BASE_URL": fake_upstream_server.url, "UPSTREAM_API_KEY": "sk-or-v1-server-secret"}
    with live_server(SECRET_KEY=django_settings.SECRET_KEY, UPSTREAM_KIND="openrouter", **env) as url:
        body = {"model": MODEL, "messages": MESSAGES, "stream": True}
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10
        ) as response:
            deadline = time.monotonic() + 8
            for _ in response.iter_raw():
                written = UsageRecord.objects.filter(generation_id="gen-crash-42", completion_tokens__gt=0)
                if written.exists() or time.monotonic() > deadline:
                    break
            crash(url)
    record = UsageRecord.objects.get()
    assert (record.status, record.generation_id) == (UsageStatus.PENDING, "gen-crash-42")
    assert record.completion_tokens > 0  # the output relayed before the crash, as an estimate
    assert Hold.objects.get().status == HoldStatus.ACTIVE

    Hold.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    found = {"id": "gen-crash-42", "total_cost": 0.0005, "native_tokens_prompt": 10, "native_tokens_completion": 200}
    fake_upstream.script("generation", Reply(body={"data": {**found, "cancelled": True}}))
    settings.UPSTREAM_KIND, settings.UPSTREAM_API_KEY = "openrouter", env["UPSTREAM_API_KEY"]
    settings.UPSTREAM_BASE_URL = env["UPSTREAM_BASE_URL"]
    output = io.StringIO()
    call_command("reconcile_holds", "--backoff", "0.01", stdout=output)
    assert "settled from the upstream's generation lookup" in output.getvalue()
    record.refresh_from_db()
    assert (record.cost_source, record.charge, record.completion_tokens) == (CostSource.RECONCILED, 600_000, 200)
    assert Wallet.objects.get(user=alice).balance == 10_000_000_000 - 600_000
    assert Hold.objects.get().status == HoldStatus.SETTLED
