"""``manage.py verify_ledger`` passes a clean ledger and names every wallet that is off."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from accounts.models import User
from backoffice.models import LedgerCheckpoint
from backoffice.reports import ledger_discrepancies, ledger_totals
from core.money import parse_usd
from wallet.models import EntryKind
from wallet.services import (
    hold_create,
    hold_settle,
    wallet_correct,
    wallet_credit,
    wallet_get_or_create,
    wallet_refund,
)

pytestmark = pytest.mark.django_db


def _run() -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("verify_ledger", stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def busy_ledger(alice, bob, mallory, staff):
    wallet_credit(wallet=bob.wallet, amount=parse_usd("3"), kind=EntryKind.TRIAL, idempotency_key="t")
    wallet_credit(wallet=bob.wallet, amount=parse_usd("0.5"), kind=EntryKind.BONUS, idempotency_key="b")
    wallet_credit(wallet=mallory.wallet, amount=parse_usd("2"), kind=EntryKind.GRANT, idempotency_key="g")
    hold = hold_create(wallet=alice.wallet, amount=parse_usd("1"), request_id="req-vl-1")
    hold_settle(hold=hold, amount=parse_usd("1.25"))  # overage beyond the hold
    hold_create(wallet=alice.wallet, amount=parse_usd("2"), request_id="req-vl-2")  # stays active
    wallet_refund(wallet=mallory.wallet, amount=parse_usd("0.75"), idempotency_key="r")
    wallet_correct(wallet=bob.wallet, amount=-parse_usd("0.1"), reason="duplicate trial", staff_user=staff)


def test_a_clean_ledger_verifies_and_prints_totals_per_kind(busy_ledger):
    out, err = _run()
    assert err == ""
    assert "Ledger verified" in out
    assert "Top-up" in out and "11.000000000" in out  # alice $10 + mallory $1 opening top-ups
    assert "-1.250000000" in out  # usage
    assert "-0.750000000" in out  # refund
    totals = ledger_totals()
    assert totals.by_kind[EntryKind.TRIAL] == parse_usd("3")
    assert totals.by_kind[EntryKind.CORRECTION] == -parse_usd("0.1")
    assert totals.entries_total == totals.balances_total == parse_usd("14.4")
    assert totals.held_total == totals.active_holds_total == parse_usd("2")
    assert totals.balanced


def test_an_empty_ledger_verifies(db):
    out, _ = _run()
    assert "Ledger verified" in out


def test_it_catches_a_tampered_balance_and_names_the_wallet(busy_ledger, alice, bob):
    with connection.cursor() as cursor:
        cursor.execute("UPDATE wallet_wallet SET balance = balance + 1 WHERE id = %s", [alice.wallet.pk])
    with pytest.raises(CommandError, match="ledger verification failed"):
        _run()
    err = StringIO()
    with pytest.raises(CommandError):
        call_command("verify_ledger", stdout=StringIO(), stderr=err)
    report = err.getvalue()
    assert f"wallet {alice.wallet.pk} (alice@example.com): balance 8.750000001" in report
    assert "latest entry's balance_after 8.750000000" in report
    assert "accounting identity broken" in report
    assert f"wallet {bob.wallet.pk}" not in report


def test_it_catches_a_tampered_held_amount(busy_ledger, mallory):
    with connection.cursor() as cursor:
        cursor.execute("UPDATE wallet_wallet SET held = held + 5 WHERE id = %s", [mallory.wallet.pk])
    problems = ledger_discrepancies()
    assert [(p.wallet_id, p.problem) for p in problems] == [
        (mallory.wallet.pk, "held 0.000000005 ≠ Σ active holds 0.000000000")
    ]
    with pytest.raises(CommandError):
        _run()


def test_it_catches_a_forged_entry_inserted_behind_the_services(busy_ledger, bob):
    # An INSERT that moved both the entry sum and the wallet, but wrote a wrong balance_after.
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO wallet_entry (wallet_id, kind, amount, balance_after, reference, description,"
            " metadata, created_at) VALUES (%s, 'bonus', 7, 7, '', '', '{}', CURRENT_TIMESTAMP)",
            [bob.wallet.pk],
        )
        cursor.execute("UPDATE wallet_wallet SET balance = balance + 7 WHERE id = %s", [bob.wallet.pk])
    problems = [p.problem for p in ledger_discrepancies()]
    assert any(p.startswith("latest entry's balance_after 0.000000007") for p in problems)
    assert any("running sum 3.400000007" in p for p in problems)


def test_the_command_exits_non_zero_from_the_shell(busy_ledger, alice):
    from django.core.management import ManagementUtility

    with connection.cursor() as cursor:
        cursor.execute("UPDATE wallet_wallet SET balance = balance + 1 WHERE id = %s", [alice.wallet.pk])
    with pytest.raises(SystemExit) as exited:
        ManagementUtility(["manage.py", "verify_ledger"]).execute()
    assert exited.value.code != 0


def test_many_wallets_verify_in_a_fixed_number_of_queries(db):
    from django.db import connection as conn
    from django.test.utils import CaptureQueriesContext

    def wallets(first: int, count: int) -> int:
        for i in range(first, first + count):
            # No password: hashing them would dominate the test's runtime.
            user = User.objects.create_user(email=f"user{i}@example.com")
            wallet = wallet_get_or_create(user=user)
            wallet_credit(wallet=wallet, amount=i + 1, kind=EntryKind.TOP_UP, idempotency_key="o")
        LedgerCheckpoint.objects.all().delete()  # the same start each time: no checkpoint yet
        with CaptureQueriesContext(conn) as queries:
            _run()
        return len(queries)

    # (The last of them: the hourly usage rollups against their raw records, then each coarser
    # level — days, user days, months, the model's hours and days, spenders' months — against the hourly rows:
    # one statement each.)
    assert wallets(0, 2) == wallets(2, 15) <= 19  # set-based: none per wallet or per entry


def test_a_usage_record_that_disagrees_with_the_ledger_is_named(alice):
    from proxy.models import UsageRecord, UsageStatus

    hold = hold_create(wallet=alice.wallet, amount=5_000, request_id="req-rec-1")
    hold_settle(hold=hold, amount=4_000)
    record = UsageRecord.objects.create(
        request_id="req-rec-1", user=alice, model="m", status=UsageStatus.OK, charge=4_000, settled_at=hold.closed_at
    )
    UsageRecord.objects.create(request_id="req-rec-2", user=alice, model="m", status=UsageStatus.REFUSED)
    assert "Ledger verified" in _run()[0]
    UsageRecord.objects.filter(pk=record.pk).update(charge=4_001)  # the record says one nanodollar more
    with pytest.raises(CommandError):
        _run()
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError):
        call_command("verify_ledger", stdout=out, stderr=err)
    assert "usage record req-rec-1: charged 0.000004001 but the ledger debited 0.000004000" in err.getvalue()
