"""Every balance change in Tokentill goes through this module.

Concurrency policy (read this before changing anything here):

* A service is one transaction. Services open ``atomic(savepoint=False)``: called on their own
  they commit before they return; called inside a caller's transaction (the proxy writes the
  usage record in the same transaction as the settle) they join it instead of adding savepoints.
* Taking a hold is a single conditional UPDATE with a row-count check, never read-then-write,
  so concurrent holds can never together exceed the available balance.
* A busy agent means one hot wallet row, and every request queues on its lock, so the hold
  path keeps that lock as briefly as it can: on PostgreSQL creating, settling and releasing a
  hold are each ONE statement (``wallet.pg``), committed on its own when no caller transaction
  is open; on SQLite (which serializes writers anyway) ``_Orm`` does the same steps in one short
  transaction. ``infra.adb.native()`` is the one switch between the two.
* Results are return values: ``Posted`` (the entry, and whether it was a replay) and ``Closed``
  (whether this call closed the hold, and the settlement's entry).
* Lock order: a hold row before its wallet row (settle/release claim the hold, then touch the
  wallet); credits, charges, refunds and corrections lock only the wallet
  (``select_for_update``) and never an existing hold, so no two services can deadlock.
* ``(wallet, idempotency_key)`` is UNIQUE in the database. Under the wallet lock a replay finds
  the first entry and returns it unchanged; the constraint is the guarantee behind that check.
* Balance events go out with ``transaction.on_commit``: a client is never told about money that
  was rolled back.
* A change that takes the balance across the user's low-balance threshold or ``MIN_BALANCE`` writes
  a ``balance.low``/``balance.depleted`` event into notify's outbox in its own transaction (in the
  settlement statement itself on PostgreSQL): ``wallet.alerts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import partial

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Model
from django.utils import timezone

from infra import adb

from . import alerts, events, pg
from .models import CREDIT_KINDS, Entry, EntryKind, Hold, HoldStatus, Wallet, settlement_charge


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


@dataclass(frozen=True)
class Posted:
    """What a posting service did: the entry, and whether it was posted by this call or is the
    first result of an idempotency key replayed (then nothing moved now)."""

    entry: Entry
    replayed: bool = False


def wallet_get_or_create(*, user) -> Wallet:
    wallet, _ = Wallet.objects.get_or_create(user=user)
    return wallet


def _lock(wallet_id: int) -> Wallet:
    return Wallet.objects.select_for_update().get(pk=wallet_id)


def _prior(wallet_id: int, idempotency_key: str | None) -> Entry | None:
    """The entry already posted under this key, if any. Never raises: see ``_as_replay``."""
    if not idempotency_key:
        return None
    return Entry.objects.filter(wallet_id=wallet_id, idempotency_key=idempotency_key).first()


def _as_replay(prior: Entry, idempotency_key: str | None, *, kind: str, amount: int | None) -> Posted:
    """Answer a replay with the first entry, or refuse a key reused for a different change.

    Called *after* the service's atomic block has closed. An exception leaving an
    ``atomic(savepoint=False)`` block that joined a caller's transaction marks that whole
    transaction for rollback, so a caller who catches the refusal could not commit anything else.
    """
    if prior.kind != kind or (amount is not None and prior.amount != amount):
        raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was already used for a different change")
    return Posted(prior, replayed=True)


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
    member_id: int | None = None,
) -> Entry:
    """Write one entry and move the (already locked) wallet's balance with it."""
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise TypeError("amounts are integer nanodollars")
    if amount == 0:
        raise WalletError("a ledger entry cannot be zero")
    Wallet.objects.filter(pk=wallet.pk).update(balance=F("balance") + amount, updated_at=timezone.now())
    before, wallet.balance = wallet.balance, wallet.balance + amount
    alerts.emit_crossings(
        user_id=wallet.user_id, before=before, after=wallet.balance, wallet_threshold=wallet.low_balance_threshold
    )
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
        member_id=member_id,
    )
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
) -> Posted:
    """Lock the wallet; answer a replayed key with its first entry, else post one entry.

    ``needs_available`` refuses with ``InsufficientFunds`` unless balance − held covers it.
    Replays and refusals are answered after the block, which then wrote nothing: an exception
    inside a joined transaction would poison the caller's transaction.
    """
    with _atomic():
        locked = _lock(wallet.pk)
        prior = _prior(locked.pk, idempotency_key)
        # What a refusal for want of funds would name as needed; None when the wallet covers it.
        short = (
            needs_available
            if prior is None and needs_available is not None and locked.available < needs_available
            else None
        )
        entry = (
            None
            if prior is not None or short is not None
            else _post(locked, kind=kind, amount=amount, idempotency_key=idempotency_key, **fields)
        )
    if prior is not None:
        return _as_replay(prior, idempotency_key, kind=kind, amount=amount)
    if short is not None:
        raise InsufficientFunds(needed=short, available=locked.available, balance=locked.balance)
    assert entry is not None  # neither replayed nor refused: posted above
    wallet.balance, wallet.held = locked.balance, locked.held
    return Posted(entry)


def wallet_credit(
    *,
    wallet: Wallet,
    amount: int,
    kind: str,
    idempotency_key: str | None,
    reference: str = "",
    description: str = "",
    metadata: dict | None = None,
    created_by=None,
) -> Posted:
    """Add money: a paid top-up, a trial, a bonus or a subscription grant. ``created_by``: the
    staff member who granted it, when one did (the operator API)."""
    _check_amount(amount)
    if kind not in CREDIT_KINDS:
        raise WalletError(f"{kind!r} is not a credit kind")
    if amount <= 0:
        raise WalletError("a credit must be positive")
    fields = {"reference": reference, "description": description, "metadata": metadata, "created_by": created_by}
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
    member_id: int | None = None,
) -> Posted:
    """Debit a tool charge now, only if the available balance (balance − held) covers it.
    ``member_id``: on an organization's wallet, the member who charged (kept on the entry)."""
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
        member_id=member_id,
    )


def usage_reconcile(
    *,
    wallet: Wallet,
    request_id: str,
    delta: int,
    description: str = "",
    metadata: dict | None = None,
    hold_amount: int = 0,
    overrun_cap: int | None = None,
    charged: int = 0,
) -> Posted | None:
    """Correct a settled *estimate* once the upstream has said what the request really cost.

    ``delta`` is actual charge − estimated charge. More → a further ``usage`` debit (the output
    was already delivered, so like any overage it may take the balance below zero); less → a
    ``correction`` credit written by the system (no staff user) that gives the difference back.
    Keyed ``reconcile:<request_id>``: a request is reconciled at most once. With the request's
    ``hold_amount`` and ``overrun_cap`` (and ``charged``, what it was debited so far) a further
    debit is bounded as the settlement was (``settlement_charge``): the caller records the rest as
    the operator's loss.
    """
    _check_amount(delta)
    with _atomic():
        if delta > 0 and overrun_cap is not None:
            # The request's hold had an overrun cap: all its debits together stay within hold +
            # cap, and never take the balance below −cap (read under the row lock).
            _check_amount(charged)
            balance = _lock(wallet.pk).balance
            delta = max(0, min(delta, hold_amount + overrun_cap - charged, balance + overrun_cap))
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
) -> Posted:
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
) -> Posted:
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


# --- holds --------------------------------------------------------------------------------------------
#
# A hold operation is decided by the database in one step. On PostgreSQL that step is one
# statement from ``wallet.pg`` (sync callers run it on Django's connection, async ones on the hot
# path's async connections); on SQLite it is ``_Orm``, the same steps in one short transaction.
# ``adb.native()`` is the one switch between them.


@dataclass(frozen=True)
class Closed:
    """What settling or releasing a hold did."""

    # Did this call close the hold? False when someone closed it first (say ``reconcile_holds``):
    # then the first result stands and ``entry`` is the first settlement's entry, if it had one.
    closed_here: bool
    entry: Entry | None  # the debit, or None (released, or settled at zero)
    # Nanodollars: what the settlement debited, and what the request cost beyond that which the
    # hold's overrun cap kept off the wallet (the operator's loss). For a hold closed elsewhere
    # first, what that settlement debited and 0.
    charged: int = 0
    loss: int = 0


def _hold_new(
    wallet, amount, request_id, min_available, ttl_seconds, description, metadata, overrun_cap=None
) -> tuple[Hold, int]:
    """The unsaved hold, and what the available balance must reach for it to be taken."""
    _check_amount(amount)
    _check_amount(min_available)
    if amount <= 0:
        raise WalletError("a hold must be positive")
    if overrun_cap is not None:
        _check_amount(overrun_cap)
        if overrun_cap < 0:
            raise WalletError("an overrun cap cannot be negative")
    now = timezone.now()
    hold = adb.new(  # Hold(...), without Model.__init__'s per-field walk: one per proxied request
        Hold,
        wallet=wallet,
        amount=amount,
        request_id=request_id,
        description=description[:500],
        metadata=metadata or {},
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds if ttl_seconds is not None else settings.HOLD_TTL),
        overrun_cap=overrun_cap,
    )
    return hold, max(amount, min_available)


class _Orm:
    """The hold operations through the ORM: SQLite's implementation (which serialises writers
    anyway), each one short transaction. The contract tests also run it on PostgreSQL."""

    @staticmethod
    def create(hold: Hold, need: int) -> bool:
        with _atomic():
            # One conditional UPDATE: the database decides atomically whether the money is there.
            # Reading the balance first and writing after would let two requests both see enough.
            reserved = Wallet.objects.filter(pk=hold.wallet_id, balance__gte=F("held") + need).update(
                held=F("held") + hold.amount, updated_at=hold.created_at
            )
            if reserved:
                hold.save(force_insert=True)
        return bool(reserved)

    @staticmethod
    def close(hold: Hold, *, status: str, amount: int, kind: str, description: str, metadata: dict, member_id=None):
        now = timezone.now()
        with _atomic():
            closed = Hold.objects.filter(pk=hold.pk, status=HoldStatus.ACTIVE).update(status=status, closed_at=now)
            if not closed:
                return None
            # Read under the row lock: what the overrun cap lets the settlement take depends on it.
            balance, held, user_id, threshold = (
                Wallet.objects.select_for_update()
                .values_list("balance", "held", "user_id", "low_balance_threshold")
                .get(pk=hold.wallet_id)
            )
            if hold.overrun_cap is not None:
                amount = settlement_charge(
                    amount=amount, hold_amount=hold.amount, overrun_cap=hold.overrun_cap, balance=balance
                )
            Wallet.objects.filter(pk=hold.wallet_id).update(
                balance=F("balance") - amount, held=F("held") - hold.amount, updated_at=now
            )
            state = pg.WalletState(balance - amount, held - hold.amount, user_id, charged=amount)
            alerts.emit_crossings(
                user_id=state.user_id, before=state.balance + amount, after=state.balance, wallet_threshold=threshold
            )
            entry = None
            if amount:
                entry = Entry.objects.create(
                    wallet_id=hold.wallet_id,
                    kind=kind,
                    amount=-amount,
                    balance_after=state.balance,
                    idempotency_key=f"hold:{hold.request_id}",
                    reference=hold.request_id,
                    description=description,
                    metadata=metadata,
                    member_id=member_id,
                    created_at=now,
                )
        return entry, state

    @staticmethod
    def extend(hold: Hold, until) -> bool:
        return bool(Hold.objects.filter(pk=hold.pk, status=HoldStatus.ACTIVE).update(expires_at=until))

    @staticmethod
    def state(wallet_id: int) -> tuple[int, int]:
        return Wallet.objects.filter(pk=wallet_id).values_list("balance", "held").get()


class _Pg:
    """The hold operations as ``wallet.pg``'s statements on Django's connection."""

    @staticmethod
    def create(hold: Hold, need: int) -> bool:
        row = pg.run(pg.hold_create(hold, need))
        if row is not None:
            adb.saved(hold, row[0])
        return row is not None

    @staticmethod
    def close(hold: Hold, *, status: str, amount: int, kind: str, description: str, metadata: dict, member_id=None):
        statement = pg.hold_close(
            hold,
            status=status,
            amount=amount,
            kind=kind,
            description=description,
            metadata=metadata,
            member_id=member_id,
        )
        return pg.hold_closed(hold, statement, pg.run(statement), metadata=metadata)

    @staticmethod
    def extend(hold: Hold, until) -> bool:
        return pg.run(pg.hold_extend(hold, until)) is not None

    @staticmethod
    def state(wallet_id: int) -> tuple[int, int]:
        return pg.row(pg.wallet_state(wallet_id))


def _implementation() -> type[_Orm] | type[_Pg]:
    return _Pg if adb.native() else _Orm


def hold_create(
    *,
    wallet: Wallet,
    amount: int,
    request_id: str,
    min_available: int = 0,
    ttl_seconds: int | None = None,
    description: str = "",
    metadata: dict | None = None,
    overrun_cap: int | None = None,
) -> Hold:
    """Reserve ``amount`` for a request in flight, or raise ``InsufficientFunds``.

    ``min_available`` is a floor the available balance must reach before anything is reserved
    (``MIN_BALANCE``): the request needs ``available ≥ max(amount, min_available)``.
    ``overrun_cap`` bounds what its settlement may take beyond ``amount`` (``settlement_charge``).
    """
    hold, need = _hold_new(wallet, amount, request_id, min_available, ttl_seconds, description, metadata, overrun_cap)
    implementation = _implementation()
    if not implementation.create(hold, need):
        balance, held = implementation.state(wallet.pk)
        raise InsufficientFunds(needed=need, available=balance - held, balance=balance)
    return hold


def _closed(hold: Hold, status: str, entry: Entry | None, state: pg.WalletState) -> dict:
    """Bring the caller's objects up to date after a close; the balance event's fields."""
    if Hold.wallet.is_cached(hold):  # keep the caller's wallet object truthful without a query
        hold.wallet.balance, hold.wallet.held = state.balance, state.held
    hold.status = status
    reason = entry.kind if entry is not None else "hold_released"
    return {"balance": state.balance, "held": state.held, "reason": reason}


def _close(
    hold: Hold,
    *,
    status: str,
    amount: int = 0,
    kind: str = EntryKind.USAGE,
    description="",
    metadata=None,
    member_id: int | None = None,
) -> Closed | None:
    """Close the hold if it is still active (None if it was not)."""
    description = (description or hold.description)[:500]
    result = _implementation().close(
        hold,
        status=status,
        amount=amount,
        kind=kind,
        description=description,
        metadata=metadata or {},
        member_id=member_id,
    )
    if result is None:
        return None
    entry, state = result
    # After commit (immediately when no caller transaction is open): the client never hears of
    # money that was rolled back.
    events.publish_balance_on_commit(state.user_id, **_closed(hold, status, entry, state))
    return Closed(True, entry, state.charged, amount - state.charged)


def _check_settlement(amount: int) -> None:
    _check_amount(amount)
    if amount < 0:
        raise WalletError("a settlement cannot be negative")


def hold_settle(
    *,
    hold: Hold,
    amount: int,
    description: str = "",
    metadata: dict | None = None,
    kind: str = EntryKind.USAGE,
    member_id: int | None = None,
) -> Closed:
    """Charge the actual cost of a held request and free the hold. ``member_id``: on an
    organization's wallet, the member whose request it was (kept on the entry).

    The actual amount is charged even when it is more than the hold (the estimate was low) — up
    to the hold's overrun cap, when it has one (``settlement_charge``; ``Closed.loss`` is the
    rest): the balance may then go negative, which blocks the wallet until it is topped up. An
    amount of zero frees the hold and writes no entry. Settling a hold already closed changes
    nothing and answers with the first result (``closed_here`` False).
    """
    _check_settlement(amount)
    closed = _close(
        hold,
        status=HoldStatus.SETTLED,
        amount=amount,
        kind=kind,
        description=description,
        metadata=metadata,
        member_id=member_id,
    )
    return closed if closed is not None else _first_result(hold)


def _first_result(hold: Hold) -> Closed:
    """A hold someone else closed first: its state now, and the entry its settlement wrote."""
    hold.refresh_from_db(fields=["status", "closed_at"])
    entry = _first_settlement_entry(hold)
    return Closed(False, entry, -entry.amount if entry is not None else 0)


def _first_settlement_entry(hold: Hold) -> Entry | None:
    return Entry.objects.filter(wallet_id=hold.wallet_id, idempotency_key=f"hold:{hold.request_id}").first()


def hold_release(*, hold: Hold) -> Closed:
    """Free a hold without charging anything (the request never reached the upstream)."""
    closed = _close(hold, status=HoldStatus.RELEASED)
    return closed if closed is not None else _first_result(hold)


def hold_extend(*, hold: Hold, seconds: int) -> bool:
    """Push an active hold's expiry ``seconds`` from now: its request is still running, so
    ``reconcile_holds`` must leave it alone. False if the hold is no longer active."""
    until = timezone.now() + timedelta(seconds=seconds)
    extended = _implementation().extend(hold, until)
    if extended:
        hold.expires_at = until
    return extended


# --- the hold path on the event loop --------------------------------------------------------------
#
# The proxy takes and settles holds from async code. On PostgreSQL the statements above run on the
# hot path's async connections, with no worker thread in between; on SQLite the ORM
# implementation runs in a worker thread, its companion write in the same transaction.


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
    overrun_cap: int | None = None,
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
            overrun_cap=overrun_cap,
        )
        return await _in_thread_with(create, hold=None, insert=also_insert)
    hold, need = _hold_new(wallet, amount, request_id, min_available, ttl_seconds, description, metadata, overrun_cap)
    row = await pg.arun(pg.hold_create(hold, need, also_insert=also_insert, only_if=only_if))
    if row is None:
        state = await pg.arow(pg.wallet_state(wallet.pk, only_if))
        if only_if is not None and not state[2]:
            raise adb.ConditionFailed("the hold's condition was false")
        balance, held = state[:2]
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
    also_save: tuple[Model, list[str]] | None = None,
    charged_into: tuple[str, str] | None = None,
    member_id: int | None = None,
) -> Closed:
    """``hold_settle`` for async callers. ``also_save`` — ``(instance, field names)`` — is saved
    in the same transaction if this call closes the hold (the proxy's usage record: a charge never
    commits without the record that explains it, and a hold someone else closed first — say
    ``reconcile_holds`` — keeps the record that explains *that* charge). ``charged_into`` names
    two more fields of that instance, saved with it: what was debited, and the loss."""
    _check_settlement(amount)
    if not adb.native():
        settle = partial(
            hold_settle,
            hold=hold,
            amount=amount,
            description=description,
            metadata=metadata,
            kind=kind,
            member_id=member_id,
        )
        return await _in_thread_with(settle, hold=hold, save=also_save, charged_into=charged_into)
    return await _aclose(
        hold,
        also_save,
        status=HoldStatus.SETTLED,
        amount=amount,
        kind=kind,
        description=description,
        metadata=metadata,
        charged_into=charged_into,
        member_id=member_id,
    )


async def ahold_release(*, hold: Hold, also_save: tuple[Model, list[str]] | None = None) -> Closed:
    """``hold_release`` for async callers; ``also_save`` as for ``ahold_settle``."""
    if not adb.native():
        return await _in_thread_with(partial(hold_release, hold=hold), hold=hold, save=also_save)
    return await _aclose(hold, also_save, status=HoldStatus.RELEASED)


async def ahold_extend(*, hold: Hold, seconds: int, also_save: tuple[Model, list[str]] | None = None) -> bool:
    """``hold_extend`` for async callers; ``also_save`` is saved with it if the hold is active."""
    if not adb.native():
        return await _in_thread_with(partial(hold_extend, hold=hold, seconds=seconds), hold=hold, save=also_save)
    until = timezone.now() + timedelta(seconds=seconds)
    extended = await pg.arun(pg.hold_extend(hold, until, also_save=also_save)) is not None
    if extended:
        hold.expires_at = until
    return extended


async def _aclose(
    hold: Hold,
    also_save,
    *,
    status: str,
    amount: int = 0,
    kind: str = EntryKind.USAGE,
    description="",
    metadata=None,
    charged_into: tuple[str, str] | None = None,
    member_id: int | None = None,
) -> Closed:
    metadata = metadata or {}
    description = (description or hold.description)[:500]
    statement = pg.hold_close(
        hold,
        status=status,
        amount=amount,
        kind=kind,
        description=description,
        metadata=metadata,
        also_save=also_save,
        charged_into=charged_into,
        member_id=member_id,
    )
    result = pg.hold_closed(hold, statement, await pg.arun(statement), metadata=metadata)
    if result is None:
        return await adb.in_thread(_first_result)(hold)
    entry, state = result
    await events.apublish_balance(state.user_id, **_closed(hold, status, entry, state))  # committed by now
    if charged_into is not None:  # the statement saved them; keep the caller's instance truthful
        setattr(also_save[0], charged_into[0], state.charged)
        setattr(also_save[0], charged_into[1], amount - state.charged)
    return Closed(True, entry, state.charged, amount - state.charged)


def _locked_active(hold: Hold) -> bool:
    return Hold.objects.select_for_update().filter(pk=hold.pk, status=HoldStatus.ACTIVE).exists()


async def _in_thread_with(service, *, hold: Hold | None, insert=None, save=None, charged_into=None):
    """``service()`` with the companion write in one transaction, in a worker thread (the ORM
    path): ``insert`` only if the service did not refuse, ``save`` only if the hold was active
    (locked first: a hold row before its wallet row, as everywhere), with ``charged_into``'s
    fields set from the settlement. The balance event it committed is sent from the event loop,
    not bounced back from the thread."""

    def run():
        with events.collected() as committed, _atomic():
            active = save is None or (hold is not None and _locked_active(hold))
            result = service()
            if save is not None and active:
                instance, fields = save
                if charged_into is not None:
                    setattr(instance, charged_into[0], result.charged)
                    setattr(instance, charged_into[1], result.loss)
                    fields = [*fields, *charged_into]
                instance.save(update_fields=fields)
            if insert is not None:
                insert.save(force_insert=True)
            return result, committed

    result, committed = await adb.in_thread(run)()
    await events.send_collected(committed)
    return result
