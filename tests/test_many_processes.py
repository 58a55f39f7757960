"""One server, two worker processes: the shipped command with ``--workers 2`` (``WEB_CONCURRENCY=2``
in ``scripts/run``) on PostgreSQL and Redis. Requests that land on both processes are held to one
limit, and a balance change made through one process reaches a socket held by the other.

Which process holds a connection is read from /proc (``tests.live.serving_pid``), so each test
places its connections on both workers on purpose instead of hoping the kernel spreads them.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from decimal import Decimal

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from accounts.services import api_key_create, token_pair_issue
from proxy.models import ModelPrice, UsageRecord, UsageStatus
from tests.conftest import make_user
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    Reply,
    completion,
    fake_upstream,
    fake_upstream_server,
    usage,
)
from tests.live import MiniWebSocket, live_servers, serving_pid, worker_pids
from wallet.models import Entry, EntryKind, Wallet

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres, pytest.mark.redis]

WORKERS = 2
PLACE_TIMEOUT = 10  # seconds to get connections accepted on every worker


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, fake_upstream_server):
    redis = {"REDIS_URL": os.environ["TEST_REDIS_URL"], "REDIS_PREFIX": f"tt-test-{uuid.uuid4().hex[:8]}"}
    with live_servers(
        1,
        workers=WORKERS,
        SECRET_KEY=django_settings.SECRET_KEY,
        UPSTREAM_BASE_URL=fake_upstream_server.url,
        UPSTREAM_API_KEY="sk-or-v1-server-secret",
        UPSTREAM_KIND="openrouter",
        PROXY_PRICE_CACHE_SECONDS="0",
        LOG_LEVEL="WARNING",
        **redis,
    ) as (url,):
        deadline = time.monotonic() + PLACE_TIMEOUT
        while len(worker_pids(url)) < WORKERS:  # workers start after the supervisor answers
            assert time.monotonic() < deadline, "uvicorn did not start its worker processes"
            time.sleep(0.05)
        yield url


class Http:
    """One keep-alive HTTP/1.1 connection whose serving process is known."""

    def __init__(self, url: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int):
        self.url, self.reader, self.writer, self.pid = url, reader, writer, pid

    async def request(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
        raw = json.dumps(body).encode() if body is not None else b""
        host = self.url.removeprefix("http://")
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(raw)}"]
        head += ["Content-Type: application/json", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + raw)
        lines = (await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 30)).decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if fields.get("transfer-encoding") == "chunked":
            data = b""
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                data += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")
        else:
            data = await self.reader.readexactly(int(fields.get("content-length", 0)))
        return int(lines[0].split()[1]), json.loads(data) if data else {}

    async def close(self) -> None:
        self.writer.close()


async def accepted_by(url: str, port: int) -> int:
    deadline = time.monotonic() + PLACE_TIMEOUT
    while (pid := serving_pid(url, port)) is None:
        assert time.monotonic() < deadline, "a connection was never accepted"
        await asyncio.sleep(0.01)
    return pid


async def on_every_worker(url: str, per_worker: int, connect) -> dict[int, list]:
    """Open connections with ``connect()`` until each worker holds ``per_worker`` of them; the
    extras are closed. Returns {pid: connections}."""
    placed: dict[int, list] = {pid: [] for pid in worker_pids(url)}
    deadline = time.monotonic() + PLACE_TIMEOUT
    while any(len(each) < per_worker for each in placed.values()):
        assert time.monotonic() < deadline, f"could not place {per_worker} connections on each of {list(placed)}"
        conn = await connect()
        if len(placed[conn.pid]) < per_worker:
            placed[conn.pid].append(conn)
        else:
            await conn.close()
    return placed


def http_to(url: str):
    async def connect() -> Http:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return Http(url, reader, writer, await accepted_by(url, writer.get_extra_info("sockname")[1]))

    return connect


def ws_to(url: str, headers: dict):
    async def connect() -> MiniWebSocket:
        ws = await MiniWebSocket.connect(url, "/ws/events", headers)
        ws.pid = await accepted_by(url, ws.writer.get_extra_info("sockname")[1])
        assert (await ws.receive_json(timeout=5))["reason"] == "snapshot"
        return ws

    return connect


PER_WORKER = 6  # requests sent through each worker, all at once


@pytest.mark.parametrize(
    ("limits", "code"),
    [({"max_parallel": 3}, "max_parallel_reached"), ({"daily_spend": "0.30"}, "spend_cap_reached")],
    ids=["max_parallel", "daily_spend"],
)
def test_requests_spread_over_both_processes_are_held_to_one_limit(server, fake_upstream, limits, code):
    """12 requests at once, 6 through each worker, on a key allowing 3 (in flight, or $0.30 of
    $0.10 requests): exactly 3 reach the upstream, whichever processes they came through."""
    # 256 output tokens at $390.625/M with no markup is exactly $0.10 — hold and charge alike.
    ModelPrice.objects.create(model="scale/model", completion=Decimal("390.625"), markup=Decimal("0"))
    user = make_user("spread@example.com", balance="10.00")
    _, secret = api_key_create(user=user, name="limited", limits=limits)
    total = PER_WORKER * WORKERS
    # Slow enough that every request is in flight while the first are: max_parallel is about that.
    replies = [Reply(body=completion("ok", u=usage(3, 256), model="scale/model"), delay=1.0) for _ in range(total)]
    fake_upstream.script("chat", *replies)
    body = {"model": "scale/model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 256}

    async def crowd():
        placed = await on_every_worker(server, PER_WORKER, http_to(server))
        connections = [conn for each in placed.values() for conn in each]
        try:
            headers = {"Authorization": f"Bearer {secret}"}
            answers = await asyncio.gather(
                *(conn.request("POST", "/v1/chat/completions", body, headers) for conn in connections)
            )
        finally:
            for conn in connections:
                await conn.close()
        return [(conn.pid, status, answer) for conn, (status, answer) in zip(connections, answers, strict=True)]

    outcomes = asyncio.run(crowd())
    assert {pid for pid, _, _ in outcomes} == set(worker_pids(server))
    statuses = sorted(status for _, status, _ in outcomes)
    assert statuses == [200] * 3 + [429] * (total - 3), outcomes
    assert {answer["error"]["code"] for _, status, answer in outcomes if status == 429} == {code}
    assert len(fake_upstream.calls("chat")) == 3
    wallet = Wallet.objects.get(user=user)
    assert (wallet.balance, wallet.held) == (10 * 10**9 - 3 * 10**8, 0)
    assert UsageRecord.objects.filter(user=user, status=UsageStatus.OK).count() == 3
    call_command("verify_ledger", stdout=open(os.devnull, "w"))


def test_a_balance_change_made_through_one_process_reaches_sockets_on_both(server):
    """Alice listens on both workers; a deposit is made through one of them; every socket —
    the other worker's too — hears it within a second (through the Redis channel layer)."""
    alice = make_user("alice@example.com", balance="10.00")
    operator = make_user("operator@example.com")
    _, billing_key = api_key_create(user=operator, name="billing", scopes=["billing"])
    listen = {"Authorization": f"Bearer {token_pair_issue(user=alice).access}"}

    async def deposit_and_listen():
        sockets = await on_every_worker(server, 2, ws_to(server, listen))
        http = await http_to(server)()
        try:
            status, _ = await http.request(
                "POST",
                "/v1/user/balance/deposit",
                {"user": "alice@example.com", "amount": "2.000000001", "kind": "bonus"},
                {"Authorization": f"Bearer {billing_key}", "Idempotency-Key": "two-workers-1"},
            )
            assert status == 201
            heard = {}
            for pid, each in sockets.items():
                for ws in each:
                    event = await ws.receive_json(timeout=1)
                    heard.setdefault(pid, []).append((event["balance"], event["reason"]))
            return http.pid, heard
        finally:
            await http.close()
            for each in sockets.values():
                for ws in each:
                    await ws.close()

    through, heard = asyncio.run(deposit_and_listen())
    other = next(pid for pid in heard if pid != through)
    assert heard[other] == [("12.000000001", "bonus")] * 2
    assert heard[through] == [("12.000000001", "bonus")] * 2
    assert Entry.objects.filter(wallet__user=alice, kind=EntryKind.BONUS).count() == 1
