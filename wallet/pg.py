"""The hold operations on PostgreSQL: the one implementation there, for sync and async callers.

On PostgreSQL taking, closing and extending a hold are each ONE statement (data-modifying
CTEs). Outside a caller's transaction that statement is its own transaction, so a hot wallet's
row is locked for the statement and its commit flush only — no Python runs while other requests
queue on the row. A statement may carry a companion part, committed with it or not at all (the
proxy's usage record: inserted with the hold, saved with its close), and a condition the hold is
taken under (the principal it was authenticated as is unchanged).

``wallet.services`` asks this module for a statement and reads its row back the same way whether
it ran on Django's connection (``run``: sync callers) or on the hot path's async connections
(``arun``). On SQLite the services do the same steps through the ORM (``services._Orm``); the
contract tests run both implementations on PostgreSQL and compare them entry by entry.

Balance alerts (``wallet.alerts``) ride in the closing statement as one more part, ``alerts``: an
``INSERT … SELECT`` into notify's outbox whose WHERE compares the new balance (and the old one,
new + amount) with the wallet's threshold and the depleted line. It writes a row only on the rare
settlement that crosses a line, and costs the common one a filter over two constant rows — no
extra statement, no extra round trip, no transaction around the statement. The alternative, a
second statement only when Python sees a crossing, would have had to share a transaction with
the settlement (``BEGIN``/``COMMIT`` around every settlement: two more round trips each time, and
the wallet row locked across them) or run after its commit, where a crash between the two loses
the event. The price of the choice is the payload written twice — here in SQL and in
``wallet.alerts`` in Python — which the contract tests compare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, models
from django.utils import timezone

from infra import adb
from notify.models import Event

from . import alerts as balance_alerts
from .models import Entry, Hold, HoldStatus, Wallet

_CREATE = """
WITH w AS (
    UPDATE {wallet} SET held = held + %(amount)s, updated_at = %(now)s
    WHERE id = %(wallet_id)s AND balance >= held + %(need)s{only_if}
    RETURNING id
), h AS (
    INSERT INTO {hold} (wallet_id, amount, request_id, status, description, metadata, created_at, expires_at,
                        overrun_cap)
    SELECT w.id, %(amount)s, %(request_id)s, %(status)s, %(description)s, %(metadata)s::jsonb, %(now)s, %(expires_at)s,
           %(overrun_cap)s::bigint
    FROM w
    RETURNING id
){also}
SELECT h.id{also_id} FROM h
"""

_CLOSE = """
WITH h AS (
    UPDATE {hold} SET status = %(status)s, closed_at = %(now)s
    WHERE id = %(hold_id)s AND status = %(active)s
    RETURNING amount, wallet_id, overrun_cap
), c AS (
    SELECT {wallet}.id,
           CASE WHEN h.overrun_cap IS NULL THEN %(amount)s::bigint
                ELSE GREATEST(0, LEAST(%(amount)s::bigint, h.amount + h.overrun_cap, {wallet}.balance + h.overrun_cap))
           END AS charged
    FROM {wallet} JOIN h ON {wallet}.id = h.wallet_id
    FOR UPDATE OF {wallet}
){also}, w AS (
    UPDATE {wallet} SET balance = balance - c.charged, held = held - h.amount, updated_at = %(now)s
    FROM h, c WHERE {wallet}.id = c.id
    RETURNING {wallet}.balance, {wallet}.held, {wallet}.user_id, {wallet}.low_balance_threshold, c.charged
), e AS (
    INSERT INTO {entry} (wallet_id, kind, amount, balance_after, idempotency_key, reference, description,
                         metadata, member_id, created_at)
    SELECT %(wallet_id)s, %(kind)s, -w.charged, w.balance, %(key)s, %(reference)s, %(description)s,
           %(metadata)s::jsonb, %(member_id)s::bigint, %(now)s
    FROM w WHERE w.charged > 0
    RETURNING id
), alerts AS (
    INSERT INTO {event} ("id", "type", "user_id", "data", "dedup_key", "created_at", "body", "dispatched_at")
    SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), line.type, w.user_id,
           jsonb_build_object(
               'balance', (w.balance::numeric / 1000000000)::numeric(32, 9)::text,
               line.field, coalesce(line.shown, (line.level::numeric / 1000000000)::numeric(32, 9)::text)
           ),
           NULL, %(now)s, '', NULL
    FROM w CROSS JOIN LATERAL (VALUES
        ('balance.low', 'threshold', coalesce(w.low_balance_threshold, %(low_default)s), NULL::text),
        ('balance.depleted', 'min_balance', %(depleted)s::bigint, %(min_balance)s::text)
    ) AS line(type, field, level, shown)
    WHERE line.level > 0 AND w.balance < line.level AND w.balance + w.charged >= line.level
          AND w.user_id IS NOT NULL
)
SELECT (SELECT id FROM e), w.balance, w.held, w.user_id, w.charged FROM w
"""

_EXTEND = """
WITH h AS (
    UPDATE {hold} SET expires_at = %(until)s WHERE id = %(hold_id)s AND status = %(active)s RETURNING id
){also}
SELECT id FROM h
"""

_STATE = "SELECT balance, held{only_if} FROM {wallet} WHERE id = %(wallet_id)s"

_TABLES = {
    "wallet": Wallet._meta.db_table,
    "hold": Hold._meta.db_table,
    "entry": Entry._meta.db_table,
    "event": Event._meta.db_table,
}
_ENTRY_FIELDS = [field.attname for field in Entry._meta.concrete_fields]


@lru_cache(maxsize=32)
def _composed(template: str, also: str = "", also_id: str = "", only_if: str = "") -> str:
    """A statement with its companion part or condition: the same few texts every time, built
    once (and prepared once per connection)."""
    return template.format(**_TABLES, also=also, also_id=also_id, only_if=only_if)


@dataclass(frozen=True)
class Statement:
    sql: str
    params: dict
    # May it run twice? (A read, or a write conditional on state the first run would change —
    # then a connection found dead can be retried on a fresh one.)
    retry: bool = False
    # Does it close a hold (a settlement or a release)? Then it may wait longer for a connection:
    # see ``arun``.
    closes: bool = False


@dataclass(frozen=True)
class WalletState:
    balance: int  # nanodollars
    held: int  # nanodollars
    user_id: int
    charged: int = 0  # nanodollars the settlement debited (under the hold's overrun cap)


def run(statement: Statement) -> tuple | None:
    """The statement's first row, run on Django's connection (sync callers)."""
    with connection.cursor() as cursor:
        cursor.execute(statement.sql, statement.params)
        return cursor.fetchone()


async def arun(statement: Statement) -> tuple | None:
    """The statement's first row, run on the hot path's async connections, group-committed with
    other requests' hold statements waiting at the same time (``adb.fetchone_batched``: in a
    batch, statements are ordered by wallet, so batches lock wallet rows in one order)."""
    params = statement.params
    order = (params.get("wallet_id") or 0) if isinstance(params, dict) else 0
    # A request refused at admission for want of a connection holds nothing and is told to retry;
    # a settlement that gives up leaves a finished request unbilled until reconcile_holds charges
    # its hold an estimate after HOLD_TTL. So closing a hold may wait longer for a connection
    # (PROXY_DB_SETTLE_TIMEOUT) than taking one does (PROXY_DB_POOL_TIMEOUT): under overload the
    # admissions are shed, and the requests already running are billed.
    wait = settings.PROXY_DB_SETTLE_TIMEOUT if statement.closes else None
    return await adb.fetchone_batched(statement.sql, params, retry=statement.retry, order=order, wait=wait)


def row(statement: Statement) -> tuple:
    """``run`` for a statement that always answers a row (it reads a row that exists)."""
    return _found(run(statement), statement)


async def arow(statement: Statement) -> tuple:
    """``arun`` for a statement that always answers a row."""
    return _found(await arun(statement), statement)


def _found(row: tuple | None, statement: Statement) -> tuple:
    if row is None:
        raise LookupError(f"no row where one must be: {statement.sql[:60]}")
    return row


def _json(value: dict) -> str:
    # An empty dict — a proxied request's hold and settlement metadata — needs no encoder.
    return json.dumps(value, cls=DjangoJSONEncoder) if value else "{}"


# --- taking a hold ----------------------------------------------------------------------------------


def hold_create(hold: Hold, need: int, *, also_insert=None, only_if: tuple[str, dict] | None = None) -> Statement:
    """Insert ``hold`` (unsaved) if the wallet's available balance reaches ``need``; its row is
    ``(hold id[, companion id])``, or none when it does not fit (or ``only_if`` is false).

    ``also_insert`` — an unsaved model instance — is inserted if and only if the hold is taken.
    ``only_if`` — a SQL condition and its parameters — must hold too.
    """
    params = {
        "amount": hold.amount,
        "need": need,
        "now": hold.created_at,
        "wallet_id": hold.wallet_id,
        "request_id": hold.request_id,
        "status": hold.status,
        "description": hold.description,
        "metadata": _json(hold.metadata),
        "expires_at": hold.expires_at,
        "overrun_cap": hold.overrun_cap,
    }
    also = also_id = condition = ""
    if also_insert is not None:
        insert, extra = adb.insert_statement(also_insert, prefix="also_", source="h")
        also, also_id = f", also AS ({insert})", ", (SELECT id FROM also)"
        params.update(extra)
    if only_if is not None:
        condition = f" AND {only_if[0]}"
        params.update(only_if[1])
    return Statement(_composed(_CREATE, also, also_id, condition), params)


def wallet_state(wallet_id: int, only_if: tuple[str, dict] | None = None) -> Statement:
    """``(balance, held[, condition])`` of a wallet: why a hold was not taken."""
    if only_if is None:
        return Statement(_composed(_STATE), {"wallet_id": wallet_id}, retry=True)
    return Statement(_composed(_STATE, only_if=f", {only_if[0]}"), {"wallet_id": wallet_id, **only_if[1]}, retry=True)


# --- closing one --------------------------------------------------------------------------------------


def hold_close(
    hold: Hold,
    *,
    status: str,
    amount: int,
    kind: str,
    description: str,
    metadata: dict,
    also_save: tuple[models.Model, list[str]] | None = None,
    charged_into: tuple[str, str] | None = None,
    member_id: int | None = None,
) -> Statement:
    """Close ``hold`` if it is still active, debit what ``amount`` comes to under the hold's
    overrun cap (``models.settlement_charge``; its entry written when positive) and free the
    hold; ``also_save`` — ``(instance, field names)`` — is saved only if it closed, with
    ``charged_into``'s two fields (of the same instance) set to what was debited and to the rest
    of ``amount`` (the operator's loss) — values only this statement knows.

    Safe to re-run on a dead connection: the close (and the save with it) is conditional on the
    hold still being active, so a second run after a first that committed changes nothing.
    """
    params = {
        "status": status,
        "active": HoldStatus.ACTIVE,
        "now": timezone.now(),
        "hold_id": hold.pk,
        "amount": amount,
        "wallet_id": hold.wallet_id,
        "kind": kind,
        "key": f"hold:{hold.request_id}",
        "reference": hold.request_id,
        "description": description,
        "metadata": _json(metadata),
        "member_id": member_id,
    }
    params["low_default"], params["depleted"], params["min_balance"] = balance_alerts.lines()
    sql = _composed(_CLOSE)
    if also_save is not None:
        sql, params = _with_save(_CLOSE, params, also_save, charged_into)
    return Statement(sql, params, retry=True, closes=True)


def hold_closed(
    hold: Hold, statement: Statement, row: tuple | None, *, metadata: dict
) -> tuple[Entry | None, WalletState] | None:
    """The entry (or None) and the wallet's new state from ``hold_close``'s row; None if the hold
    was not active. (``metadata`` is the dict the statement was built with.)"""
    if row is None:
        return None
    entry_id, balance, held, user_id, charged = row
    entry = None
    if entry_id is not None:
        params = statement.params
        # from_db: the ORM's own fast path for a row it has read (positional, no defaults).
        values = {
            "id": entry_id,
            "wallet_id": hold.wallet_id,
            "kind": params["kind"],
            "amount": -charged,
            "balance_after": balance,
            "idempotency_key": params["key"],
            "reference": hold.request_id,
            "description": params["description"],
            "metadata": metadata,
            "created_by_id": None,
            "member_id": params["member_id"],
            "created_at": params["now"],
        }
        # ("default", not ``connection.alias``: on the event loop that lookup is a context-local's.)
        entry = adb.from_db(Entry, _ENTRY_FIELDS, [values[name] for name in _ENTRY_FIELDS])
    return entry, WalletState(balance, held, user_id, charged)


# --- keeping one alive --------------------------------------------------------------------------------


def hold_extend(hold: Hold, until: datetime, *, also_save: tuple[models.Model, list[str]] | None = None) -> Statement:
    """Push an active hold's expiry to ``until``; its row is the hold's id, none if not active."""
    params = {"until": until, "hold_id": hold.pk, "active": HoldStatus.ACTIVE}
    if also_save is None:
        return Statement(_composed(_EXTEND), params, retry=True)
    sql, params = _with_save(_EXTEND, params, also_save)
    return Statement(sql, params, retry=True)


def _with_save(
    template: str, params: dict, also_save: tuple[models.Model, list[str]], charged_into: tuple[str, str] | None = None
) -> tuple[str, dict]:
    """``template`` with the caller's UPDATE as one more part of its WITH, run only if the
    statement's ``h`` (the hold it acts on) found the hold active; ``charged_into`` (the close
    only) sets two more fields from its ``c`` part: what was charged, and the rest (the loss)."""
    expressions: tuple[tuple[str, str], ...] = ()
    if charged_into is not None:
        charged, loss = charged_into
        expressions = (
            (charged, "(SELECT charged FROM c)"),
            (loss, "%(amount)s::bigint - (SELECT charged FROM c)"),
        )
    update, extra = adb.update_statement(
        *also_save, prefix="also_", condition="EXISTS (SELECT 1 FROM h)", expressions=expressions
    )
    return _composed(template, f", also AS ({update})"), {**params, **extra}
