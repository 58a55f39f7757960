"""Property-based: any sequence of ledger operations keeps every invariant.

Hypothesis drives random credits (with reused idempotency keys), charges, holds, settlements
(below, at and above the hold, and repeated), releases, refunds and corrections against one
wallet, while a plain Python model predicts what must happen. After every step the wallet row
must match the model and the ledger; at the end ``verify_ledger`` must pass.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import transaction
from django.db.models import Sum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import User
from backoffice.reports import ledger_discrepancies, ledger_totals
from wallet.models import Entry, EntryKind, Hold, HoldStatus, Wallet
from wallet.services import (
    IdempotencyConflict,
    InsufficientFunds,
    hold_create,
    hold_release,
    hold_settle,
    wallet_charge,
    wallet_correct,
    wallet_credit,
    wallet_get_or_create,
    wallet_refund,
)

pytestmark = pytest.mark.django_db

amounts = st.integers(min_value=1, max_value=3 * 10**9)
keys = st.sampled_from([None, "k1", "k2", "k3"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("credit"), amounts, keys, st.sampled_from([EntryKind.TOP_UP, EntryKind.BONUS])),
        st.tuples(st.just("charge"), amounts),
        st.tuples(st.just("hold"), amounts),
        # The actual cost may be zero, below, at or well above the hold.
        st.tuples(st.just("settle"), st.integers(0, 7), st.integers(0, 4 * 10**9)),
        st.tuples(st.just("release"), st.integers(0, 7)),
        st.tuples(st.just("refund"), amounts),
        st.tuples(st.just("correct"), st.integers(-(10**9), 10**9).filter(bool)),
    ),
    max_size=18,
)


@dataclass
class Model:
    balance: int = 0
    held: int = 0
    holds: list = field(default_factory=list)  # [Hold, amount, status]
    keyed: dict = field(default_factory=dict)  # idempotency key -> (kind, amount)


def _check(wallet: Wallet, model: Model) -> None:
    row = Wallet.objects.get(pk=wallet.pk)
    entries = Entry.objects.filter(wallet=row).aggregate(total=Sum("amount"))["total"] or 0
    active = Hold.objects.filter(wallet=row, status=HoldStatus.ACTIVE).aggregate(total=Sum("amount"))["total"] or 0
    assert (row.balance, row.held) == (model.balance, model.held)
    assert row.balance == entries
    assert row.held == active
    assert row.held >= 0


def _apply(op: tuple, wallet: Wallet, staff: User, model: Model) -> None:
    name = op[0]
    available = model.balance - model.held
    if name == "credit":
        _, amount, key, kind = op
        before = model.keyed.get(key) if key else None
        try:
            posted = wallet_credit(wallet=wallet, amount=amount, kind=kind, idempotency_key=key)
        except IdempotencyConflict:
            assert before is not None and before != (kind, amount)
            return
        if before is not None:
            assert before == (kind, amount) and posted.replayed
        else:
            assert not posted.replayed
            model.balance += amount
            if key:
                model.keyed[key] = (kind, amount)
    elif name == "charge":
        amount = op[1]
        try:
            wallet_charge(wallet=wallet, amount=amount, idempotency_key=f"charge:{uuid.uuid4()}")
        except InsufficientFunds:
            assert amount > available
            return
        assert amount <= available
        model.balance -= amount
    elif name == "hold":
        amount = op[1]
        try:
            hold = hold_create(wallet=wallet, amount=amount, request_id=str(uuid.uuid4()))
        except InsufficientFunds:
            assert amount > available
            return
        # No hold is ever created beyond what was available.
        assert amount <= available
        model.held += amount
        model.holds.append([hold, amount, HoldStatus.ACTIVE])
    elif name in ("settle", "release"):
        if not model.holds:
            return
        tracked = model.holds[op[1] % len(model.holds)]
        hold, amount, status = tracked
        if name == "settle":
            closed = hold_settle(hold=hold, amount=op[2])
            assert closed.closed_here == (status == HoldStatus.ACTIVE)
            entry = closed.entry
            if status == HoldStatus.ACTIVE:
                model.held -= amount
                model.balance -= op[2]  # in full, even above the hold
                tracked[2] = HoldStatus.SETTLED
                assert (entry is None) == (op[2] == 0)
        else:
            hold_release(hold=hold)
            if status == HoldStatus.ACTIVE:
                model.held -= amount
                tracked[2] = HoldStatus.RELEASED
    elif name == "refund":
        wallet_refund(wallet=wallet, amount=op[1], idempotency_key=f"refund:{uuid.uuid4()}")
        model.balance -= op[1]
    elif name == "correct":
        wallet_correct(wallet=wallet, amount=op[1], reason="property test", staff_user=staff)
        model.balance += op[1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_any_sequence_of_ledger_operations_keeps_every_invariant(db, ops):
    # Each example runs in a savepoint rolled back at the end, so examples never see each other.
    savepoint = transaction.savepoint()
    try:
        staff = User.objects.create_user(email="ops@example.com", is_staff=True)
        wallet = wallet_get_or_create(user=User.objects.create_user(email="w@example.com"))
        model = Model()
        for op in ops:
            _apply(op, wallet, staff, model)
            _check(wallet, model)
        assert ledger_discrepancies() == []
        assert ledger_totals().balanced
        call_command("verify_ledger", stdout=StringIO(), stderr=StringIO())
    finally:
        transaction.savepoint_rollback(savepoint)
