"""Real concurrency on PostgreSQL: many connections racing for one wallet never overspend it.

Each thread has its own database connection (Django's are per thread) and closes it when done.
A barrier releases them together so the holds genuinely contend for the wallet row.
"""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.db.models import Sum

from accounts.models import User
from tests.conftest import race
from wallet.models import Entry, EntryKind, Hold, HoldStatus, Wallet
from wallet.services import InsufficientFunds, hold_create, hold_settle, wallet_credit, wallet_get_or_create

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

THREADS = 32
ATTEMPTS_PER_THREAD = 2
HOLD = 10_000_000  # $0.01 in nanodollars


def test_racing_holds_never_take_more_than_the_wallet_holds():
    funded_for = 40  # fewer than THREADS × ATTEMPTS_PER_THREAD = 64 attempts
    wallet = wallet_get_or_create(user=User.objects.create_user(email="hot@example.com"))
    wallet_credit(wallet=wallet, amount=funded_for * HOLD, kind=EntryKind.TOP_UP, idempotency_key="opening")

    def worker(index: int):
        won = refused = 0
        for attempt in range(ATTEMPTS_PER_THREAD):
            try:
                hold = hold_create(wallet=wallet, amount=HOLD, request_id=f"race-{index}-{attempt}")
            except InsufficientFunds:
                refused += 1
                continue
            hold_settle(hold=hold, amount=HOLD)
            won += 1
        return won, refused

    results = race(worker, THREADS)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert sum(won for won, _ in results) == funded_for
    assert sum(refused for _, refused in results) == THREADS * ATTEMPTS_PER_THREAD - funded_for

    row = Wallet.objects.get(pk=wallet.pk)
    assert (row.balance, row.held) == (0, 0)
    assert Entry.objects.filter(wallet=row, kind=EntryKind.USAGE).count() == funded_for
    assert Entry.objects.filter(wallet=row).aggregate(total=Sum("amount"))["total"] == 0
    assert Hold.objects.filter(status=HoldStatus.SETTLED).count() == funded_for
    assert not Hold.objects.filter(status=HoldStatus.ACTIVE).exists()
    call_command("verify_ledger", stdout=StringIO(), stderr=StringIO())  # raises on any discrepancy


def test_racing_replays_of_one_idempotency_key_post_once():
    wallet = wallet_get_or_create(user=User.objects.create_user(email="replay@example.com"))

    def worker(index: int):
        return wallet_credit(wallet=wallet, amount=HOLD, kind=EntryKind.TOP_UP, idempotency_key="order:1").entry.pk

    results = race(worker, 16)
    assert not [r for r in results if isinstance(r, BaseException)]
    assert len(set(results)) == 1
    assert Wallet.objects.get(pk=wallet.pk).balance == HOLD
    call_command("verify_ledger", stdout=StringIO(), stderr=StringIO())
