"""Every balance change in Tokentill goes through this module.

Concurrency policy (read this before changing anything here):

* A service is one transaction. Services open ``atomic(savepoint=False)``: called on their own
  they commit before they return; called inside a caller's transaction (the proxy writes the
  usage record in the same transaction as the settle) they join it instead of adding savepoints.
* Taking a hold is a single conditional UPDATE with a row-count check, never read-then-write,
  so concurrent holds can never together exceed the available balance.
* A busy agent means one hot wallet row, and every request queues on its lock, so the hold
  path keeps that lock as briefly as it can: on PostgreSQL creating, settling and releasing a
  hold are each ONE statement (data-modifying CTEs), committed on its own when no caller
  transaction is open; the ORM path (SQLite, which serializes writers anyway) does the same
  steps in one short transaction.
* Lock order: a hold row before its wallet row (settle/release claim the hold, then touch the
  wallet); credits, charges, refunds and corrections lock only the wallet
  (``select_for_update``) and never an existing hold, so no two services can deadlock.
* ``(wallet, idempotency_key)`` is UNIQUE in the database. Under the wallet lock a replay finds
  the first entry and returns it unchanged; the constraint is the guarantee behind that check.
* Balance events go out with ``transaction.on_commit``: a client is never told about money that
  was rolled back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache, partial

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from infra import adb

from . import events
from .models import CREDIT_KINDS, Entry, EntryKind, Hold, HoldStatus, Wallet


class WalletError(Exception):
    pass


@dataclass
class InsufficientFunds(WalletError):
    needed: int  # nanodollars
    available: int  # nanodollars
    balance: int  # nanodollars

    def __str__(self):
        return "insufficient funds"


class IdempotencyConflict(WalletError):
    """The key was used before for a different change."""


def wallet_get_or_create(*, user) -> Wallet:
    wallet = getattr(user, "_wallet_cache", None)
    if wallet is None:
        wallet, _ = Wallet.objects.get_or_create(user=user)
    return wallet


def _lock(wallet_id: int) -> Wallet:
    return Wallet.objects.select_for_update().get(pk=wallet_id)


def _prior(wallet_id: int, idempotency_key: str | None) -> Entry | None:
    """The entry already posted under this key, if any. Never raises: see ``_as_replay``."""
    if not idempotency_key:
        return None
    return Entry.objects.filter(wallet_id=wallet_id, idempotency_key=idempotency_key).first()


def _as_replay(prior: Entry, idempotency_key: str, *, kind: str, amount: int | None) -> Entry:
    """Answer a replay with the first entry, or refuse a key reused for a different change.

    Called *after* the service's atomic block has closed. An exception leaving an
    ``atomic(savepoint=False)`` block that joined a caller's transaction marks that whole
    transaction for rollback, so a caller who catches the refusal could not commit anything else.
    """
    if prior.kind != kind or (amount is not None and prior.amount != amount):
        raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was already used for a different change")
    prior.replayed = True
    return prior


def _check_amount(amount: object) -> None:
    """Before any block opens: a float (or bool) amount is a caller bug, not a refusal."""
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError(f"amounts are integer nanodollars, not {type(amount).__name__}")


def _post(
    wallet: Wallet,
    *,
    kind: str,
    amount: int,
    idempotency_key: str | None,
    reference: str = "",
    description: str = "",
    metadata: dict | None = None,
    created_by=None,
    reason: str | None = None,
) -> Entry:
    """Write one entry and move the (already locked) wallet's balance with it."""
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError("amounts are integer nanodollars")
    if amount == 0:
        raise WalletError("a ledger entry cannot be zero")
    Wallet.objects.filter(pk=wallet.pk).update(balance=F("balance") + amount, updated_at=timezone.now())
    wallet.balance += amount
    entry = Entry.objects.create(
        wallet=wallet,
        kind=kind,
        amount=amount,
        balance_after=wallet.balance,
        idempotency_key=idempotency_key or None,
        reference=reference,
        description=description[:500],
        metadata=metadata or {},
        created_by=created_by,
    )
    entry.replayed = False
    events.publish_on_commit(wallet, reason or kind)
    return entry


def _atomic():
    return transaction.atomic(savepoint=False)


def _post_once(
    wallet: Wallet,
    *,
    kind: str,
    amount: int,
    idempotency_key: str | None,
    needs_available: int | None = None,
    **fields,
) -> Entry:
    """Lock the wallet; answer a replayed key with its first entry, else post one entry.

    ``needs_available`` refuses with ``InsufficientFunds`` unless balance − held covers it.
    Replays and refusals are answered after the block, which then wrote nothing: an exception
    inside a joined transaction would poison the caller's transaction.
    """
    with _atomic():
        locked = _lock(wallet.pk)
        prior = _prior(locked.pk, idempotency_key)
        short = prior is None and needs_available is not None and locked.available < needs_available
        entry = (
            None
            if prior is not None or short
            else _post(locked, kind=kind, amount=amount, idempotency_key=idempotency_key, **fields)
        )
    if prior is not None:
        return _as_replay(prior, idempotency_key, kind=kind, amount=amount)
    if short:
        raise InsufficientFunds(needed=needs_available, available=locked.available, balance=locked.balance)
    wallet.balance, wallet.held = locked.balance, locked.held
    return entry


def wallet_credit(
    *,
    wallet: Wallet,
    amount: int,
    kind: str,
    idempotency_key: str | None,
    reference: str = "",
    description: str = "",
    metadata: dict | None = None,
) -> Entry:
    """Add money: a paid top-up, a trial, a bonus or a subscription grant."""
    _check_amount(amount)
    if kind not in CREDIT_KINDS:
        raise WalletError(f"{kind!r} is not a credit kind")
    if amount <= 0:
        raise WalletError("a credit must be positive")
    fields = {"reference": reference, "description": description, "metadata": metadata}
    try:
        return _post_once(wallet, kind=kind, amount=amount, idempotency_key=idempotency_key, **fields)
    except IntegrityError:
        # Only reachable if a concurrent writer bypassed the wallet lock; the UNIQUE constraint
        # kept the ledger right, so answer as a replay.
        prior = _prior(wallet.pk, idempotency_key)
        if prior is None:
            raise
        return _as_replay(prior, idempotency_key, kind=kind, amount=amount)


def wallet_charge(
    *,
    wallet: Wallet,
    amount: int,
    idempotency_key: str | None,
    description: str = "",
    metadata: dict | None = None,
    reference: str = "",
) -> Entry:
    """Debit a tool charge now, only if the available balance (balance − held) covers it."""
    _check_amount(amount)
    if amount <= 0:
        raise WalletError("a charge must be positive")
    return _post_once(
        wallet,
        kind=EntryKind.CHARGE,
        amount=-amount,
        idempotency_key=idempotency_key,
        needs_available=amount,
        reference=reference,
        description=description,
        metadata=metadata,
    )


def usage_reconcile(
    *,
    wallet: Wallet,
    request_id: str,
    delta: int,
    description: str = "",
    metadata: dict | None = None,
) -> Entry | None:
    """Correct a settled *estimate* once the upstream has said what the request really cost.

    ``delta`` is actual charge − estimated charge. More → a further ``usage`` debit (the output
    was already delivered, so like any overage it may take the balance below zero); less → a
    ``correction`` credit written by the system (no staff user) that gives the difference back.
    Keyed ``reconcile:<request_id>``: a request is reconciled at most once.
    """
    _check_amount(delta)
    if delta == 0:
        return None
    return _post_once(
        wallet,
        kind=EntryKind.USAGE if delta > 0 else EntryKind.CORRECTION,
        amount=-delta,
        idempotency_key=f"reconcile:{request_id}",
        reference=request_id,
        description=description or f"reconciled from the upstream's report ({request_id})",
        metadata={"source": "reconcile_holds", **(metadata or {})},
    )


def wallet_refund(
    *,
    wallet: Wallet,
    amount: int,
    idempotency_key: str,
    reference: str = "",
    description: str = "",
    metadata: dict | None = None,
) -> Entry:
    """Claw back refunded credit. May take the balance below zero: the money already left."""
    _check_amount(amount)
    if amount <= 0:
        raise WalletError("a refund clawback must be positive")
    return _post_once(
        wallet,
        kind=EntryKind.REFUND,
        amount=-amount,
        idempotency_key=idempotency_key,
        reference=reference,
        description=description,
        metadata=metadata,
    )


def wallet_correct(
    *,
    wallet: Wallet,
    amount: int,
    reason: str,
    staff_user,
    idempotency_key: str | None = None,
) -> Entry:
    """A staff correction, positive or negative, always with a reason and who made it."""
    _check_amount(amount)
    if amount == 0:
        raise WalletError("a correction cannot be zero")
    if not reason or not reason.strip():
        raise WalletError("a correction needs a reason")
    if staff_user is None or not staff_user.is_staff:
        raise WalletError("only staff can correct a wallet")
    return _post_once(
        wallet,
        kind=EntryKind.CORRECTION,
        amount=amount,
        idempotency_key=idempotency_key,
        description=reason.strip(),
        metadata={"staff": staff_user.email},
        created_by=staff_user,
    )


def _hold_new(wallet, amount, request_id, min_available, ttl_seconds, description, metadata) -> tuple[Hold, int]:
    """The unsaved hold, and what the available balance must reach for it to be taken."""
    _check_amount(amount)
    _check_amount(min_available)
    if amount <= 0:
        raise WalletError("a hold must be positive")
    now = timezone.now()
    hold = Hold(
        wallet=wallet,
        amount=amount,
        request_id=request_id,
        description=description[:500],
        metadata=metadata or {},
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds if ttl_seconds is not None else settings.HOLD_TTL),
    )
    return hold, max(amount, min_available)


def hold_create(
    *,
    wallet: Wallet,
    amount: int,
    request_id: str,
    min_available: int = 0,
    ttl_seconds: int | None = None,
    description: str = "",
    metadata: dict | None = None,
) -> Hold:
    """Reserve ``amount`` for a request in flight, or raise ``InsufficientFunds``.

    ``min_available`` is a floor the available balance must reach before anything is reserved
    (``MIN_BALANCE``): the request needs ``available ≥ max(amount, min_available)``.
    """
    hold, need = _hold_new(wallet, amount, request_id, min_available, ttl_seconds, description, metadata)
    now = hold.created_at
    if connection.vendor == "postgresql":
        reserved = _pg_hold_create(hold, need=need)
    else:
        with _atomic():
            # One conditional UPDATE: the database decides atomically whether the money is
            # there. Reading the balance first and writing after would let two requests both
            # see enough.
            reserved = Wallet.objects.filter(pk=wallet.pk, balance__gte=F("held") + need).update(
                held=F("held") + amount, updated_at=now
            )
            if reserved:
                hold.save(force_insert=True)
    if not reserved:
        current = Wallet.objects.get(pk=wallet.pk)
        raise InsufficientFunds(needed=need, available=current.available, balance=current.balance)
    return hold


# On PostgreSQL each hold operation is ONE statement (data-modifying CTEs). Outside a caller's
# transaction that statement is its own transaction, so the hot wallet's row lock is held for
# the statement and its commit flush only — no Python runs while other requests queue on the
# row. The SQL does exactly what the ORM branch beside it does; the tests run both.
_PG_HOLD_CREATE = """
WITH w AS (
    UPDATE {wallet} SET held = held + %(amount)s, updated_at = %(now)s
    WHERE id = %(wallet_id)s AND balance >= held + %(need)s{only_if}
    RETURNING id
), h AS (
    INSERT INTO {hold} (wallet_id, amount, request_id, status, description, metadata, created_at, expires_at)
    SELECT w.id, %(amount)s, %(request_id)s, %(status)s, %(description)s, %(metadata)s::jsonb, %(now)s, %(expires_at)s
    FROM w
    RETURNING id
){also}
SELECT h.id{also_id} FROM h
"""

_PG_HOLD_CLOSE = """
WITH h AS (
    UPDATE {hold} SET status = %(status)s, closed_at = %(now)s
    WHERE id = %(hold_id)s AND status = %(active)s
    RETURNING amount, wallet_id
){also}, w AS (
    UPDATE {wallet} SET balance = balance - %(amount)s, held = held - h.amount, updated_at = %(now)s
    FROM h WHERE {wallet}.id = h.wallet_id
    RETURNING {wallet}.balance, {wallet}.held, {wallet}.user_id
), e AS (
    INSERT INTO {entry} (wallet_id, kind, amount, balance_after, idempotency_key, reference, description,
                         metadata, created_at)
    SELECT %(wallet_id)s, %(kind)s, -%(amount)s, w.balance, %(key)s, %(reference)s, %(description)s,
           %(metadata)s::jsonb, %(now)s
    FROM w WHERE %(amount)s > 0
    RETURNING id
)
SELECT (SELECT id FROM e), w.balance, w.held, w.user_id FROM w
"""


_PG_HOLD_EXTEND = """
WITH h AS (
    UPDATE {hold} SET expires_at = %(until)s WHERE id = %(hold_id)s AND status = %(active)s RETURNING id
){also}
SELECT id FROM h
"""

_PG_WALLET_STATE = "SELECT balance, held FROM {wallet} WHERE id = %s"
_PG_WALLET_STATE_IF = "SELECT balance, held, {only_if} FROM {wallet} WHERE id = %(wallet_id)s"

_TABLES = {"wallet": Wallet._meta.db_table, "hold": Hold._meta.db_table, "entry": Entry._meta.db_table}
_PG_HOLD_CREATE_SQL = _PG_HOLD_CREATE.format(**_TABLES, also="", also_id="", only_if="")
_PG_HOLD_CLOSE_SQL = _PG_HOLD_CLOSE.format(**_TABLES, also="", also_id="")
_PG_HOLD_EXTEND_SQL = _PG_HOLD_EXTEND.format(**_TABLES, also="", also_id="")
_PG_WALLET_STATE_SQL = _PG_WALLET_STATE.format(**_TABLES)


def _json(value: dict) -> str:
    return json.dumps(value, cls=DjangoJSONEncoder)


def _pg_hold_create_params(hold: Hold, need: int) -> dict:
    return {
        "amount": hold.amount,
        "need": need,
        "now": hold.created_at,
        "wallet_id": hold.wallet_id,
        "request_id": hold.request_id,
        "status": hold.status,
        "description": hold.description,
        "metadata": _json(hold.metadata),
        "expires_at": hold.expires_at,
    }


def _pg_hold_create(hold: Hold, *, need: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(_PG_HOLD_CREATE_SQL, _pg_hold_create_params(hold, need))
        row = cursor.fetchone()
    if row is None:
        return False
    hold.pk = row[0]
    hold._state.adding, hold._state.db = False, connection.alias
    return True


def _pg_hold_close_params(hold: Hold, *, status: str, amount: int, kind: str, description: str, metadata: dict):
    return {
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
    }


def _pg_hold_closed(hold: Hold, params: dict, row: tuple | None, metadata: dict):
    """The entry (or None) and the wallet's new state from ``_PG_HOLD_CLOSE``'s row; None if the
    hold was not active."""
    if row is None:
        return None
    entry_id, balance, held, user_id = row
    entry = None
    if entry_id is not None:
        # from_db: the ORM's own fast path for a row it has read (positional, no defaults).
        values = {
            "id": entry_id,
            "wallet_id": hold.wallet_id,
            "kind": params["kind"],
            "amount": -params["amount"],
            "balance_after": balance,
            "idempotency_key": params["key"],
            "reference": hold.request_id,
            "description": params["description"],
            "metadata": metadata,
            "created_by_id": None,
            "created_at": params["now"],
        }
        entry = Entry.from_db(connection.alias, _ENTRY_FIELDS, [values[name] for name in _ENTRY_FIELDS])
        entry.replayed = False
    return entry, (balance, held, user_id)


_ENTRY_FIELDS = [field.attname for field in Entry._meta.concrete_fields]


def _pg_hold_close(hold: Hold, *, status: str, amount: int, kind: str, description: str, metadata: dict):
    """Close an active hold, debit ``amount`` and write its entry; None if it was not active."""
    params = _pg_hold_close_params(
        hold, status=status, amount=amount, kind=kind, description=description, metadata=metadata
    )
    with connection.cursor() as cursor:
        cursor.execute(_PG_HOLD_CLOSE_SQL, params)
        row = cursor.fetchone()
    return _pg_hold_closed(hold, params, row, metadata)


def _orm_hold_close(hold: Hold, *, status: str, amount: int, kind: str, description: str, metadata: dict):
    """The same as ``_pg_hold_close`` through the ORM, in one transaction."""
    now = timezone.now()
    with _atomic():
        closed = Hold.objects.filter(pk=hold.pk, status=HoldStatus.ACTIVE).update(status=status, closed_at=now)
        if not closed:
            return None
        Wallet.objects.filter(pk=hold.wallet_id).update(
            balance=F("balance") - amount, held=F("held") - hold.amount, updated_at=now
        )
        state = Wallet.objects.filter(pk=hold.wallet_id).values_list("balance", "held", "user_id").get()
        entry = None
        if amount:
            entry = Entry.objects.create(
                wallet_id=hold.wallet_id,
                kind=kind,
                amount=-amount,
                balance_after=state[0],
                idempotency_key=f"hold:{hold.request_id}",
                reference=hold.request_id,
                description=description,
                metadata=metadata,
                created_at=now,
            )
            entry.replayed = False
    return entry, state


def _hold_close(
    hold: Hold, *, status: str, amount: int = 0, kind: str = EntryKind.USAGE, description="", metadata=None
):
    close = _pg_hold_close if connection.vendor == "postgresql" else _orm_hold_close
    description = (description or hold.description)[:500]
    result = close(hold, status=status, amount=amount, kind=kind, description=description, metadata=metadata or {})
    if result is None:
        return None
    entry, state = result
    # After commit (immediately when no caller transaction is open): the client never hears of
    # money that was rolled back.
    events.publish_balance_on_commit(state[2], **_closed(hold, status, entry, state))
    return (entry,)


def _closed(hold: Hold, status: str, entry: Entry | None, state: tuple) -> dict:
    """Bring the caller's objects up to date after a close; the balance event's fields."""
    balance, held, _ = state
    if Hold.wallet.is_cached(hold):  # keep the caller's wallet object truthful without a query
        hold.wallet.balance, hold.wallet.held = balance, held
    hold.status = status
    hold.closed_here = True
    return {"balance": balance, "held": held, "reason": entry.kind if entry is not None else "hold_released"}


def hold_settle(
    *,
    hold: Hold,
    amount: int,
    description: str = "",
    metadata: dict | None = None,
    kind: str = EntryKind.USAGE,
) -> Entry | None:
    """Charge the actual cost of a held request and free the hold.

    The actual amount is charged even when it is more than the hold (the estimate was low): the
    balance may then go slightly negative, which blocks the wallet until it is topped up. An
    amount of zero frees the hold and writes no entry. Settling twice returns the first result;
    afterwards ``hold.closed_here`` says whether this call was the one that closed the hold.
    """
    _check_amount(amount)
    if amount < 0:
        raise WalletError("a settlement cannot be negative")
    closed = _hold_close(
        hold, status=HoldStatus.SETTLED, amount=amount, kind=kind, description=description, metadata=metadata
    )
    if closed is None:  # already settled or released: answer with what happened the first time
        return _first_settlement(hold)
    return closed[0]


def _first_settlement(hold: Hold) -> Entry | None:
    hold.closed_here = False
    hold.refresh_from_db(fields=["status", "closed_at"])
    prior = Entry.objects.filter(wallet_id=hold.wallet_id, idempotency_key=f"hold:{hold.request_id}").first()
    if prior is not None:
        prior.replayed = True
    return prior


def hold_release(*, hold: Hold) -> Hold:
    """Free a hold without charging anything (the request never reached the upstream)."""
    if _hold_close(hold, status=HoldStatus.RELEASED) is None:
        hold.closed_here = False
        hold.refresh_from_db(fields=["status", "closed_at"])
    return hold


# --- the hold path on the event loop ----------------------------------------------------------
#
# The proxy takes and settles holds from async code. On PostgreSQL (``adb.native()``) the very
# statements above run on the hot path's async connections, with no worker thread in between;
# elsewhere the sync service runs in a worker thread. Same rules, same SQL, one implementation.


async def ahold_create(
    *,
    wallet: Wallet,
    amount: int,
    request_id: str,
    min_available: int = 0,
    ttl_seconds: int | None = None,
    description: str = "",
    metadata: dict | None = None,
    also_insert=None,
    only_if: tuple[str, dict] | None = None,
) -> Hold:
    """``hold_create`` for async callers. ``also_insert`` — an unsaved model instance — is
    inserted in the same transaction if and only if the hold is taken (the proxy's usage record:
    no hold without the record that explains it, and no record of money never reserved).

    ``only_if`` — a SQL condition and its parameters, PostgreSQL only — must also hold for the
    hold to be taken; when it does not, nothing is written and ``adb.ConditionFailed`` is raised
    (the proxy's check that its cached principal is still current: ``accounts.auth``).
    """
    if not adb.native():
        if only_if is not None:
            raise ValueError("only_if is checked on PostgreSQL's statements only")
        create = partial(
            hold_create,
            wallet=wallet,
            amount=amount,
            request_id=request_id,
            min_available=min_available,
            ttl_seconds=ttl_seconds,
            description=description,
            metadata=metadata,
        )
        return await _in_thread_with(create, hold=None, insert=also_insert)
    hold, need = _hold_new(wallet, amount, request_id, min_available, ttl_seconds, description, metadata)
    params = _pg_hold_create_params(hold, need)
    also = also_id = condition = ""
    if also_insert is not None:
        insert, extra = adb.insert_statement(also_insert, prefix="also_", source="h")
        also, also_id = f", also AS ({insert})", ", (SELECT id FROM also)"
        params.update(extra)
    if only_if is not None:
        condition = f" AND {only_if[0]}"
        params.update(only_if[1])
    sql = _composed(_PG_HOLD_CREATE, also, also_id, condition)
    row = await adb.fetchone(sql, params)
    if row is None:
        if only_if is None:
            balance, held = await adb.fetchone(_PG_WALLET_STATE_SQL, [wallet.pk], retry=True)
        else:
            state = _composed(_PG_WALLET_STATE_IF, "", only_if=only_if[0])
            balance, held, unchanged = await adb.fetchone(state, {"wallet_id": wallet.pk, **only_if[1]}, retry=True)
            if not unchanged:
                raise adb.ConditionFailed("the hold's condition was false")
        raise InsufficientFunds(needed=need, available=balance - held, balance=balance)
    adb.saved(hold, row[0])
    if also_insert is not None:
        adb.saved(also_insert, row[1])
    return hold


async def ahold_settle(
    *,
    hold: Hold,
    amount: int,
    description: str = "",
    metadata: dict | None = None,
    kind: str = EntryKind.USAGE,
    also_save: tuple[object, list[str]] | None = None,
) -> Entry | None:
    """``hold_settle`` for async callers. ``also_save`` — ``(instance, field names)`` — is saved
    in the same transaction if this call closes the hold (the proxy's usage record: a charge never
    commits without the record that explains it, and a hold someone else closed first — say
    ``reconcile_holds`` — keeps the record that explains *that* charge)."""
    _check_amount(amount)
    if amount < 0:
        raise WalletError("a settlement cannot be negative")
    if not adb.native():
        settle = partial(hold_settle, hold=hold, amount=amount, description=description, metadata=metadata, kind=kind)
        return await _in_thread_with(settle, hold=hold, save=also_save)
    closed = await _ahold_close(
        hold, also_save, status=HoldStatus.SETTLED, amount=amount, kind=kind, description=description, metadata=metadata
    )
    if closed is None:
        return await adb.in_thread(_first_settlement)(hold)
    return closed[0]


async def ahold_release(*, hold: Hold, also_save: tuple[object, list[str]] | None = None) -> Hold:
    """``hold_release`` for async callers; ``also_save`` as for ``ahold_settle``."""
    if not adb.native():
        return await _in_thread_with(partial(hold_release, hold=hold), hold=hold, save=also_save)
    if await _ahold_close(hold, also_save, status=HoldStatus.RELEASED) is None:
        hold.closed_here = False
        await adb.in_thread(hold.refresh_from_db)(fields=["status", "closed_at"])
    return hold


def hold_extend(*, hold: Hold, seconds: int) -> bool:
    """Push an active hold's expiry ``seconds`` from now: its request is still running, so
    ``reconcile_holds`` must leave it alone. False if the hold is no longer active."""
    until = timezone.now() + timedelta(seconds=seconds)
    extended = Hold.objects.filter(pk=hold.pk, status=HoldStatus.ACTIVE).update(expires_at=until)
    if extended:
        hold.expires_at = until
    return bool(extended)


async def ahold_extend(*, hold: Hold, seconds: int, also_save: tuple[object, list[str]] | None = None) -> bool:
    """``hold_extend`` for async callers; ``also_save`` is saved with it if the hold is active."""
    if not adb.native():
        return await _in_thread_with(partial(hold_extend, hold=hold, seconds=seconds), hold=hold, save=also_save)
    until = timezone.now() + timedelta(seconds=seconds)
    params = {"until": until, "hold_id": hold.pk, "active": HoldStatus.ACTIVE}
    sql = _PG_HOLD_EXTEND_SQL
    if also_save is not None:
        sql, params = _with_save(_PG_HOLD_EXTEND, params, also_save)
    extended = await adb.fetchone(sql, params, retry=True) is not None  # conditional: safe to re-run
    if extended:
        hold.expires_at = until
    return extended


def _with_save(template: str, params: dict, also_save: tuple[object, list[str]]) -> tuple[str, dict]:
    """``template`` with the caller's UPDATE as one more part of its WITH, run only if the
    statement's ``h`` (the hold it acts on) found the hold active."""
    update, extra = adb.update_statement(*also_save, prefix="also_", condition="EXISTS (SELECT 1 FROM h)")
    return _composed(template, f", also AS ({update})"), {**params, **extra}


@lru_cache(maxsize=32)
def _composed(template: str, also: str, also_id: str = "", only_if: str = "") -> str:
    """A hold statement with a companion part or a condition: the same few texts every time,
    built once."""
    return template.format(**_TABLES, also=also, also_id=also_id, only_if=only_if)


def _locked_active(hold: Hold) -> bool:
    return Hold.objects.select_for_update().filter(pk=hold.pk, status=HoldStatus.ACTIVE).exists()


async def _in_thread_with(service, *, hold: Hold | None, insert=None, save=None):
    """``service()`` with the companion write in one transaction, in a worker thread (the ORM
    path): ``insert`` only if the service did not refuse, ``save`` only if the hold was active
    (locked first: a hold row before its wallet row, as everywhere). The balance event it
    committed is sent from the event loop, not bounced back from the thread."""

    def run():
        with events.collected() as committed, _atomic():
            active = save is None or _locked_active(hold)
            result = service()
            if save is not None and active:
                instance, fields = save
                instance.save(update_fields=fields)
            if insert is not None:
                insert.save(force_insert=True)
            return result, committed

    result, committed = await adb.in_thread(run)()
    await events.send_collected(committed)
    return result


async def _ahold_close(
    hold: Hold, also_save, *, status: str, amount: int = 0, kind: str = EntryKind.USAGE, description="", metadata=None
):
    metadata = metadata or {}
    description = (description or hold.description)[:500]
    params = _pg_hold_close_params(
        hold, status=status, amount=amount, kind=kind, description=description, metadata=metadata
    )
    sql = _PG_HOLD_CLOSE_SQL
    if also_save is not None:
        sql, params = _with_save(_PG_HOLD_CLOSE, params, also_save)
    # Safe to re-run on a dead connection: the close (and the save with it) is conditional on the
    # hold still being active, so a second run after a first that committed changes nothing.
    result = _pg_hold_closed(hold, params, await adb.fetchone(sql, params, retry=True), metadata)
    if result is None:
        return None
    entry, state = result
    await events.apublish_balance(state[2], **_closed(hold, status, entry, state))  # committed by now
    return (entry,)
