"""The floor under ``bench/proxy_overhead.py``'s "added" figures: a proxy with no framework.

A bare ASGI app, served by the same uvicorn command, that does the database and upstream work a
metered request needs and nothing else:

* the bearer key looked up in a dict (as Tokentill's remembered principals are);
* one statement taking the hold — the wallet's conditional ``UPDATE``, the hold's ``INSERT`` and
  the pending usage record's ``INSERT`` — on a pooled, prepared psycopg async connection;
* the upstream call through aiohttp (what Tokentill's httpx transport uses), the body relayed;
* one statement settling — the hold closed, the usage record updated, the wallet debited and the
  ledger entry written — then the response, with the charge and the balance;
* both statements group-committed as Tokentill's are (``infra.adb.fetchone_batched``): alone when
  nothing else is in flight, else with whatever waited meanwhile, in one transaction.

So its "added" latency is what this machine charges for the hops and the writes a ledger-first
proxy cannot skip (two statements on the hot wallet row, each committed alone or with others',
a second hop), with the least Python around them; Tokentill's own figure minus this one is what
its code costs. It writes the same tables as Tokentill (every column of each row, from the
models' metadata), so its requests pass the benchmark's closing ledger check too. None of
Tokentill's rules run here — limits, pricing from the price table, events, refusals,
crash-safety writes — which is the point.

Not a product: no error handling beyond what the benchmark's requests need.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import uuid
from decimal import Decimal

import aiohttp
import django
from psycopg.types.numeric import Int8Dumper
from psycopg_pool import AsyncConnectionPool

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup()  # only for the models' column lists and defaults, read once below

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402

from accounts.models import ApiKey  # noqa: E402
from core.pricing import charge_nanos  # noqa: E402
from proxy.models import UsageRecord  # noqa: E402
from wallet.models import Wallet  # noqa: E402

UTC = datetime.UTC
HOLD = 100_000  # nanodollars held per request: far above any bench request's charge
SETTLED_FIELDS = [
    "status", "upstream_model", "generation_id", "finish_reason", "http_status", "prompt_tokens",
    "completion_tokens", "upstream_cost", "cost_source", "charge", "estimated", "latency_ms", "settled_at",
]  # fmt: skip


def _record_sql() -> tuple[str, list[str], str]:
    """The usage record's INSERT (one row per row of the CTE ``h``) and its settlement UPDATE."""
    fields = [f for f in UsageRecord._meta.concrete_fields if not f.primary_key]
    casts = [f"%s::{f.cast_db_type(connection)}" for f in fields]
    insert = (
        f"INSERT INTO {UsageRecord._meta.db_table} ({', '.join(f.column for f in fields)}) "
        f"SELECT {', '.join(casts)} FROM h RETURNING id"
    )
    by_name = {f.name: f for f in fields}
    sets = ", ".join(f"{by_name[n].column} = %s::{by_name[n].cast_db_type(connection)}" for n in SETTLED_FIELDS)
    update = f"UPDATE {UsageRecord._meta.db_table} SET {sets} WHERE id = %s RETURNING id"
    return insert, [f.attname for f in fields], update


RECORD_INSERT, RECORD_COLUMNS, RECORD_UPDATE = _record_sql()
HOLD_SQL = f"""
WITH w AS (
    UPDATE wallet_wallet SET held = held + %s, updated_at = %s WHERE id = %s AND balance >= held + %s RETURNING id
), h AS (
    INSERT INTO wallet_hold (wallet_id, amount, request_id, status, description, metadata, created_at, expires_at)
    SELECT w.id, %s, %s, 'active', '', '{{}}'::jsonb, %s, %s FROM w RETURNING id
), r AS ({RECORD_INSERT})
SELECT h.id, (SELECT id FROM r) FROM h
"""  # (table and column names from the models; every value is a parameter)
SETTLE_SQL = f"""
WITH h AS (
    UPDATE wallet_hold SET status = 'settled', closed_at = %s WHERE id = %s AND status = 'active'
    RETURNING amount, wallet_id
), r AS ({RECORD_UPDATE}), w AS (
    UPDATE wallet_wallet SET balance = balance - %s, held = held - h.amount, updated_at = %s
    FROM h WHERE wallet_wallet.id = h.wallet_id RETURNING wallet_wallet.id, wallet_wallet.balance
), e AS (
    INSERT INTO wallet_entry (wallet_id, kind, amount, balance_after, idempotency_key, reference, description,
                              metadata, created_at)
    SELECT w.id, 'usage', -%s, w.balance, %s, %s, '', '{{}}'::jsonb, %s FROM w RETURNING id
)
SELECT w.balance, (SELECT id FROM e), (SELECT id FROM r) FROM w
"""


def _defaults() -> dict:
    values = {}
    for field in UsageRecord._meta.concrete_fields:
        if not field.primary_key:
            value = field.get_default()
            values[field.attname] = json.dumps(value) if field.get_internal_type() == "JSONField" else value
    return values


class Floor:
    def __init__(self) -> None:
        self.pool: AsyncConnectionPool | None = None
        self.session: aiohttp.ClientSession | None = None
        self.principals: dict[str, tuple[int, int, int]] = {}  # sha256(key) → (key id, user id, wallet id)
        self.defaults = _defaults()
        self.upstream = f"{settings.UPSTREAM_BASE_URL}/chat/completions"
        self.headers = {"Authorization": f"Bearer {settings.UPSTREAM_API_KEY}", "Content-Type": "application/json"}
        self.queue: list[tuple[int, str, list, asyncio.Future]] = []  # statements waiting for the next flight
        self.flying = False
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        async def configure(conn) -> None:
            conn.adapters.register_dumper(int, Int8Dumper)  # as infra.adb: one prepared plan per statement

        url = os.environ["DATABASE_URL"]
        self.pool = AsyncConnectionPool(
            url, kwargs={"autocommit": True, "prepare_threshold": 0}, configure=configure, max_size=20, open=False
        )
        await self.pool.open()
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        async with self.pool.connection() as conn:
            rows = await conn.execute(
                f"SELECT k.key_hash, k.id, k.user_id, w.id FROM {ApiKey._meta.db_table} k "
                f"JOIN {Wallet._meta.db_table} w ON w.user_id = k.user_id"
            )
            self.principals = {row[0]: row[1:] for row in await rows.fetchall()}

    async def fetchone(self, sql: str, params: list, wallet_id: int):
        """Group commit as Tokentill's (``infra.adb.fetchone_batched``), without its error
        handling: a statement finding no flight in progress runs alone, in autocommit; those
        arriving meanwhile go as the next flight, one transaction in one round trip, by wallet."""
        if not self.flying and not self.queue:
            self.flying = True
            try:
                async with self.pool.connection() as conn:
                    return await (await conn.execute(sql, params)).fetchone()
            finally:
                self.flying = False
                self.fly()
        future = asyncio.get_running_loop().create_future()
        self.queue.append((wallet_id, sql, params, future))
        return await future

    def fly(self) -> None:
        if self.queue and not self.flying:
            batch, self.queue = sorted(self.queue[:64], key=lambda item: item[0]), self.queue[64:]
            self.flying = True
            task = asyncio.get_running_loop().create_task(self.flight(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def flight(self, batch: list) -> None:
        try:
            async with self.pool.connection() as conn:
                async with conn.pipeline(), conn.transaction():
                    cursors = [await conn.cursor().execute(sql, params) for _, sql, params, _ in batch]
                for (*_, future), cursor in zip(batch, cursors, strict=True):
                    future.set_result(await cursor.fetchone())
        except Exception as error:  # the bench's requests do not fail; if they do, the run says so
            for *_, future in batch:
                if not future.done():
                    future.set_exception(error)
        finally:
            self.flying = False
            self.fly()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if self.pool is None:
            await self.start()
        if scope["method"] == "GET":  # readiness
            await send({"type": "http.response.start", "status": 200, "headers": []})
            return await send({"type": "http.response.body", "body": b"ok"})
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        token = dict(scope["headers"])[b"authorization"].decode()[len("Bearer ") :]
        key_id, user_id, wallet_id = self.principals[hashlib.sha256(token.encode()).hexdigest()]
        payload = json.loads(body)
        stream = payload.get("stream") is True
        request_id, now = f"req_{uuid.uuid4().hex}", datetime.datetime.now(UTC)

        values = {
            **self.defaults,
            "request_id": request_id, "user_id": user_id, "api_key_id": key_id, "model": payload["model"],
            "stream": stream, "status": "pending", "hold_amount": HOLD, "estimated": True, "created_at": now,
        }  # fmt: skip
        params = [HOLD, now, wallet_id, HOLD, HOLD, request_id, now, now + datetime.timedelta(minutes=15)]
        hold_id, record_id = await self.fetchone(HOLD_SQL, params + [values[c] for c in RECORD_COLUMNS], wallet_id)

        payload["usage"] = {"include": True}
        async with self.session.post(self.upstream, data=json.dumps(payload), headers=self.headers) as response:
            if not stream:
                raw = await response.read()
                answer = json.loads(raw, parse_float=Decimal)
                usage = answer["usage"]
            else:
                usage, relayed = None, False
                await send(
                    {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
                )
                async for chunk in response.content.iter_any():
                    if b'"usage"' in chunk:  # the bench's upstream sends the usage chunk whole
                        for event in chunk.split(b"\n\n"):
                            if b'"usage"' in event:
                                usage = json.loads(event[len(b"data: ") :], parse_float=Decimal)["usage"]
                    out = chunk.replace(b"data: [DONE]\n\n", b"")
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                        relayed = True
                assert relayed and usage is not None

        cost = Decimal(usage["cost"])
        charge = charge_nanos(cost, markup=settings.MARKUP)  # the one charge rule, half-up
        settled = datetime.datetime.now(UTC)
        record = [
            "ok", payload["model"], "gen-bench", "stop", 200, usage["prompt_tokens"], usage["completion_tokens"],
            cost, "upstream", charge, False, 1, settled, record_id,
        ]  # fmt: skip
        params = [settled, hold_id, *record, charge, settled, charge, f"hold:{request_id}", request_id, settled]
        balance, _, _ = await self.fetchone(SETTLE_SQL, params, wallet_id)

        tail = json.dumps({"request_id": request_id, "charge": str(charge), "balance": str(balance)})
        if stream:
            body = f": tokentill {tail}\n\ndata: [DONE]\n\n".encode()
            return await send({"type": "http.response.body", "body": body})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            (b"x-tokentill-charge", str(charge).encode()),
            (b"x-tokentill-balance", str(balance).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": raw})


application = Floor()
