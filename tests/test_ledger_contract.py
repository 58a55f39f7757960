"""Contract tests: every implementation of the hold rules that ships does the same thing, entry by
entry.

The hold operations (take, settle, release, extend) have one implementation per database: the
ORM (``wallet.services._Orm``, SQLite's) and ``wallet.pg``'s statements (PostgreSQL's), which sync
callers run on Django's connection and the event loop runs on the hot path's async connections.
One scenario — a Hypothesis-drawn sequence of operations — is played on a fresh wallet through
each implementation available on this database, and the resulting ledgers must be identical:
every entry's kind, amount, running balance, idempotency key and reference; the wallet's balance
and held amount; every hold's amount and status; and each call's answer (taken or refused with
the same figures; closed here or not; the settlement's entry).

On SQLite: the ORM, called sync and through the async API (which runs it in a worker thread).
On PostgreSQL: those two, plus the statements sync and on the event loop.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import pytest
from asgiref.sync import async_to_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import User
from backoffice.reports import ledger_discrepancies
from infra import adb
from tests.fake_upstream import close_loop_resources
from wallet import services
from wallet.models import Entry, EntryKind, Hold
from wallet.services import InsufficientFunds

pytestmark = pytest.mark.django_db(transaction=True)

amounts = st.integers(min_value=1, max_value=3 * 10**9)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("credit"), amounts),
        st.tuples(st.just("hold"), amounts, st.sampled_from([0, 10**8, 5 * 10**9])),  # amount, min_available
        st.tuples(st.just("settle"), st.integers(0, 5), st.integers(0, 4 * 10**9)),
        st.tuples(st.just("release"), st.integers(0, 5)),
        st.tuples(st.just("extend"), st.integers(0, 5)),
        st.tuples(st.just("charge"), amounts),
    ),
    min_size=1,
    max_size=14,
)

_wallets = itertools.count()


@contextmanager
def _implementation(name: str):
    """Force the sync services onto one implementation (the production switch is the database)."""
    original = services._implementation
    forced = {"orm": services._Orm, "pg": services._Pg}[name]
    services._implementation = lambda: forced
    try:
        yield
    finally:
        services._implementation = original


def _fresh_wallet():
    user = User.objects.create_user(email=f"contract-{next(_wallets)}@example.com")
    return services.wallet_get_or_create(user=user)


def _sync_step(op, wallet, holds: list) -> tuple:
    name = op[0]
    if name == "hold":
        try:
            hold = services.hold_create(
                wallet=wallet, amount=op[1], request_id=f"r{len(holds)}-{wallet.pk}", min_available=op[2]
            )
        except InsufficientFunds as short:
            return ("refused", short.needed, short.available, short.balance)
        holds.append(hold)
        return ("held", hold.amount)
    if name in ("settle", "release", "extend"):
        if not holds:
            return ("no hold",)
        hold = holds[op[1] % len(holds)]
        if name == "extend":
            return ("extended", services.hold_extend(hold=hold, seconds=600))
        closed = services.hold_settle(hold=hold, amount=op[2]) if name == "settle" else services.hold_release(hold=hold)
        return ("closed", closed.closed_here, _entry_shape(closed.entry))
    return _money_step(op, wallet)


async def _async_step(op, wallet, holds: list) -> tuple:
    name = op[0]
    if name == "hold":
        try:
            hold = await services.ahold_create(
                wallet=wallet, amount=op[1], request_id=f"r{len(holds)}-{wallet.pk}", min_available=op[2]
            )
        except InsufficientFunds as short:
            return ("refused", short.needed, short.available, short.balance)
        holds.append(hold)
        return ("held", hold.amount)
    if name in ("settle", "release", "extend"):
        if not holds:
            return ("no hold",)
        hold = holds[op[1] % len(holds)]
        if name == "extend":
            return ("extended", await services.ahold_extend(hold=hold, seconds=600))
        if name == "settle":
            closed = await services.ahold_settle(hold=hold, amount=op[2])
        else:
            closed = await services.ahold_release(hold=hold)
        return ("closed", closed.closed_here, _entry_shape(closed.entry))
    return await adb.in_thread(_money_step)(op, wallet)


def _money_step(op, wallet) -> tuple:
    """Credits and charges: one implementation everywhere (the ORM, under the wallet's row lock)."""
    if op[0] == "credit":
        return (
            "posted",
            _entry_shape(
                services.wallet_credit(wallet=wallet, amount=op[1], kind=EntryKind.BONUS, idempotency_key=None).entry
            ),
        )
    try:
        return ("posted", _entry_shape(services.wallet_charge(wallet=wallet, amount=op[1], idempotency_key=None).entry))
    except InsufficientFunds as short:
        return ("refused", short.needed, short.available, short.balance)


def _entry_shape(entry: Entry | None):
    if entry is None:
        return None
    # Request ids embed the wallet's id (unique per run); compare them as positions instead.
    key = entry.idempotency_key.rsplit("-", 1)[0] if entry.idempotency_key else None
    return (entry.kind, entry.amount, entry.balance_after, key)


def _ledger(wallet) -> tuple:
    wallet.refresh_from_db()
    entries = [
        (e.kind, e.amount, e.balance_after, (e.idempotency_key or "").rsplit("-", 1)[0], e.reference.rsplit("-", 1)[0])
        for e in Entry.objects.filter(wallet=wallet).order_by("id")
    ]
    holds = [(h.amount, h.status) for h in Hold.objects.filter(wallet=wallet).order_by("id")]
    return (wallet.balance, wallet.held, entries, holds)


def _play_sync(ops) -> tuple:
    wallet = _fresh_wallet()
    holds: list = []
    answers = [_sync_step(op, wallet, holds) for op in ops]
    return answers, _ledger(wallet)


def _play_async(ops) -> tuple:
    wallet = _fresh_wallet()

    async def play():
        holds: list = []
        try:
            return [await _async_step(op, wallet, holds) for op in ops]
        finally:
            await close_loop_resources()

    answers = async_to_sync(play)()
    return answers, _ledger(wallet)


def _implementations() -> dict:
    """Every way the hold rules run on this database, each a function playing a scenario."""

    def orm_sync(ops):
        with _implementation("orm"):
            return _play_sync(ops)

    plays = {"orm, sync": orm_sync}
    if adb.native():

        def pg_sync(ops):
            with _implementation("pg"):
                return _play_sync(ops)

        plays["statements, sync"] = pg_sync
        plays["statements, event loop"] = _play_async
    else:
        plays["orm, through the async API"] = _play_async
    return plays


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_every_implementation_of_the_hold_rules_writes_the_same_ledger(ops):
    opening = [("credit", 5 * 10**9)]
    results = {name: play(opening + ops) for name, play in _implementations().items()}
    (first_name, first), *others = results.items()
    for name, result in others:
        assert result == first, f"{name} differs from {first_name}"
    assert ledger_discrepancies() == []
