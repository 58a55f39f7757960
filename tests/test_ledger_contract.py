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
        # amount, min_available, overrun cap (None: the whole cost is charged)
        st.tuples(st.just("hold"), amounts, st.sampled_from([0, 10**8, 5 * 10**9]), st.sampled_from([None, 0, 10**8])),
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
                wallet=wallet,
                amount=op[1],
                request_id=f"r{len(holds)}-{wallet.pk}",
                min_available=op[2],
                overrun_cap=op[3],
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
        return ("closed", closed.closed_here, _entry_shape(closed.entry), closed.charged, closed.loss)
    return _money_step(op, wallet)


async def _async_step(op, wallet, holds: list) -> tuple:
    name = op[0]
    if name == "hold":
        try:
            hold = await services.ahold_create(
                wallet=wallet,
                amount=op[1],
                request_id=f"r{len(holds)}-{wallet.pk}",
                min_available=op[2],
                overrun_cap=op[3],
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
        return ("closed", closed.closed_here, _entry_shape(closed.entry), closed.charged, closed.loss)
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
    holds = [(h.amount, h.status, h.overrun_cap) for h in Hold.objects.filter(wallet=wallet).order_by("id")]
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
    for answer in first[0]:
        if answer[0] == "closed" and answer[1]:
            _, _, entry, charged, loss = answer
            assert charged == (-entry[1] if entry else 0) and loss >= 0


@pytest.mark.parametrize("implementation", ["orm", "pg"])
def test_an_overrun_cap_bounds_one_settlement_and_the_wallet_floor(implementation):
    if implementation == "pg" and not adb.native():
        pytest.skip("the statements run on PostgreSQL")
    with _implementation(implementation):
        wallet = _fresh_wallet()
        services.wallet_credit(wallet=wallet, amount=1_000, kind=EntryKind.BONUS, idempotency_key=None)
        first = services.hold_create(wallet=wallet, amount=400, request_id=f"a-{wallet.pk}", overrun_cap=100)
        second = services.hold_create(wallet=wallet, amount=600, request_id=f"b-{wallet.pk}", overrun_cap=100)
        # hold + cap: 500 taken of 10,000; the rest is the operator's loss.
        assert (lambda c: (c.charged, c.loss))(services.hold_settle(hold=first, amount=10_000)) == (500, 9_500)
        # The balance is 500: this one may take it down to −100 only, though hold + cap is 700.
        assert (lambda c: (c.charged, c.loss))(services.hold_settle(hold=second, amount=10_000)) == (600, 9_400)
        wallet.refresh_from_db()
        assert (wallet.balance, wallet.held) == (-100, 0)
        services.wallet_credit(wallet=wallet, amount=200, kind=EntryKind.BONUS, idempotency_key=None)
        third = services.hold_create(wallet=wallet, amount=1, request_id=f"c-{wallet.pk}", overrun_cap=100)
        # Below −cap already (a clawback meanwhile): nothing more is taken, all of it is loss.
        services.wallet_refund(wallet=wallet, amount=250, idempotency_key=f"r-{wallet.pk}")
        closed = services.hold_settle(hold=third, amount=1)
        assert (closed.charged, closed.loss, closed.entry) == (0, 1, None)
        wallet.refresh_from_db()
        assert (wallet.balance, wallet.held) == (-150, 0)
    assert ledger_discrepancies() == []
