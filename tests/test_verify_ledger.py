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

    # (The last of them: the usage records' time span, the hourly rollups against their raw
    # records one statement per day of records, then the rollup hours' span and each coarser
    # level — days, user days, months, the model's hours and days, spenders' months — against
    # the hourly rows, one statement each per month.)
    assert wallets(0, 2) == wallets(2, 15) <= 20  # set-based: none per wallet or per entry


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


def test_a_reconciled_request_is_checked_against_both_of_its_debits(alice):
    """A corrected estimate leaves two entries keyed to one request on its wallet (the settlement
    and the reconciliation: a further debit, or a credit back): the charge is their sum."""
    from core.money import format_usd
    from proxy.models import UsageRecord, UsageStatus
    from wallet.models import Entry
    from wallet.services import usage_reconcile

    records = {}
    # More, less, and a further debit equal to the settlement's (two entries, one amount).
    for request_id, settled, delta in (("req-more", 3_000, 500), ("req-less", 3_000, -700), ("req-same", 9, 9)):
        hold = hold_create(wallet=alice.wallet, amount=5_000, request_id=request_id)
        hold_settle(hold=hold, amount=settled)
        usage_reconcile(wallet=alice.wallet, request_id=request_id, delta=delta)
        records[request_id] = UsageRecord.objects.create(
            request_id=request_id, user=alice, model="m", status=UsageStatus.OK, charge=settled + delta
        )
        assert Entry.objects.filter(reference=request_id).count() == 2
    assert "Ledger verified" in _run()[0]
    for request_id, record in records.items():
        UsageRecord.objects.filter(pk=record.pk).update(charge=record.charge - 1)
        err = StringIO()
        with pytest.raises(CommandError, match="1 problem"):
            call_command("verify_ledger", stdout=StringIO(), stderr=err)
        charged, debited = format_usd(record.charge - 1), format_usd(record.charge)
        assert f"usage record {request_id}: charged {charged} but the ledger debited {debited}" in err.getvalue()
        UsageRecord.objects.filter(pk=record.pk).update(charge=record.charge)
    assert "Ledger verified" in _run()[0]


def test_the_rollups_are_checked_a_day_at_a_time_over_the_same_hours_as_in_one_statement(alice):
    """The full run checks the rollups in days from the hour after the oldest record's; every
    hour of the range is in exactly one of them, the last one open-ended."""
    from datetime import UTC, datetime, timedelta

    from django.db.models import F

    from backoffice.ledger_check import LedgerRun, rollup_check
    from backoffice.reports import rollup_problems
    from proxy import rollups
    from proxy.models import UsageRecord, UsageRollup, UsageStatus

    oldest = datetime(2026, 11, 1, 7, 20, tzinfo=UTC)
    for n, hours in enumerate((0, 1, 16, 17, 24, 25, 49, 73, 74)):
        UsageRecord.objects.create(
            request_id=f"day-{n}",
            user=alice,
            model="m",
            status=UsageStatus.REFUSED,
            created_at=oldest + timedelta(hours=hours),
        )
    first_hour = rollups.floor_hour(oldest)
    assert "Ledger verified" in _run()[0]
    # The first day checked runs from first_hour + 1 h (08:00) to midnight: off by one at its
    # first and last hour, at the next day's first, in the open last day, and a rollup moved
    # days past the newest record (its records missing, a row with none).
    for hours in (1, 16, 17, 73):
        UsageRollup.objects.filter(hour=first_hour + timedelta(hours=hours)).update(requests=F("requests") + 1)
    UsageRollup.objects.filter(hour=first_hour + timedelta(hours=74)).update(hour=first_hour + timedelta(hours=200))
    # The oldest record's hour may be partly pruned: neither way checks it.
    UsageRollup.objects.filter(hour=first_hour).update(requests=F("requests") + 1)

    run = LedgerRun(incremental=False, checked_from=0, all_levels=True)
    by_day = rollup_check(run)
    assert sorted(by_day) == sorted(rollup_problems())
    hourly = [line for line in by_day if line.startswith("rollup ")]
    assert len(hourly) == 6
    assert not any(f"{first_hour:%Y-%m-%d %H}:00" in line for line in hourly)
    # The coarser levels, checked a month at a time against the hourly rows (never pruned, so the
    # oldest hour included), now disagree with every hourly row changed behind the triggers' back.
    assert len(by_day) > len(hourly)
    out = StringIO()
    with pytest.raises(CommandError, match=f"{len(by_day)} problem"):
        call_command("verify_ledger", "--all-levels", stdout=out, stderr=StringIO())
    assert "usage rollups: 4 days checked against their raw records" in out.getvalue()
    # By default only the last week's levels: these are a month old, so only the hours are named.
    out = StringIO()
    with pytest.raises(CommandError, match="6 problem"):
        call_command("verify_ledger", stdout=out, stderr=StringIO())
    assert "--all-levels: every month" in out.getvalue()


def test_the_work_mem_of_the_run_is_set_for_its_transaction_and_a_bad_one_refused(alice):
    out = StringIO()
    call_command("verify_ledger", "--work-mem", "64MB", stdout=out)
    assert "Ledger verified" in out.getvalue()
    if connection.vendor == "postgresql":
        assert "work_mem 64MB for this run" in out.getvalue()
        with connection.cursor() as cursor:  # the test's transaction is the run's: still set
            cursor.execute("SHOW work_mem")
            assert cursor.fetchone()[0] == "64MB"
            cursor.execute("SHOW jit")
            assert cursor.fetchone()[0] == "off"
    for bad in ("64", "lots", "64MB; RESET ALL", "0MB"):
        with pytest.raises(CommandError, match="work_mem must look like"):
            call_command("verify_ledger", "--work-mem", bad, stdout=StringIO())


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_full_run_checks_the_rollups_alongside_in_the_same_snapshot(alice):
    """On PostgreSQL a full run checks the usage rollups on a second connection while it walks
    the ledger, inside the run's own snapshot: what commits after the run began is invisible to
    both halves (here a record whose rollup is off), and a rollup off before it is found."""
    import threading
    from datetime import UTC, datetime, timedelta

    from django.db import connections
    from django.db.models import F
    from django.utils import timezone

    from backoffice.ledger_check import verify_ledger_run
    from proxy.models import UsageRecord, UsageRollup, UsageStatus

    now = timezone.now()
    for n, created_at in enumerate((now - timedelta(hours=2), now)):  # the oldest record's hour is never checked
        UsageRecord.objects.create(
            request_id=f"early-{n}", user=alice, model="m", status=UsageStatus.REFUSED, created_at=created_at
        )

    def commit_a_record_with_its_rollup_off():
        # Another connection, after the run's snapshot and before the second half imports it.
        other = connections.create_connection("default")
        with other.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(
                "INSERT INTO proxy_usagerecord (request_id, user_id, model, status, created_at, endpoint, alias,"
                " served_model, fallback, upstream_model, upstream, generation_id, stream, error, finish_reason,"
                " prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens, cache_write_tokens,"
                " cost_source, charge, operator_loss, hold_amount, held_tokens, prices, estimated, run, agent, tool)"
                " VALUES ('late', %s, 'm', 'refused', %s, 'chat.completions', '', '', false, '', '', '', false, '',"
                " '', 0, 0, 0, 0, 0, 'none', 0, 0, 0, 0, '{}', false, '', '', '')",
                [alice.pk, datetime(2030, 1, 1, tzinfo=UTC)],
            )
            cursor.execute("UPDATE proxy_usagerollup SET requests = requests + 1 WHERE hour >= %s", ["2030-01-01"])
            cursor.execute("COMMIT")
        other.close()

    def progress(line: str) -> None:
        if line.startswith("work_mem"):  # said once the snapshot is taken, before the second half starts
            thread = threading.Thread(target=commit_a_record_with_its_rollup_off)
            thread.start()
            thread.join(10)

    lines: list[str] = []
    run = verify_ledger_run(progress=lambda line: (progress(line), lines.append(line)))
    assert run.problems == []
    assert any("checking alongside" in line for line in lines)
    assert UsageRecord.objects.filter(request_id="late").exists()

    # Committed now, and off: the next run sees it; and one off before a run began is found too.
    # (Each hourly row changed behind the triggers' back also leaves the coarser levels off it.)
    def hourly(problems: list[str]) -> list[str]:
        return [problem for problem in problems if problem.startswith("rollup ")]

    assert len(hourly(verify_ledger_run().problems)) == 1
    UsageRollup.objects.filter(hour__gt=now - timedelta(hours=1), hour__lt=datetime(2030, 1, 1, tzinfo=UTC)).update(
        requests=F("requests") + 1
    )
    problems = verify_ledger_run().problems
    assert len(hourly(problems)) == 2 and len(problems) > 2


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_check_that_fails_alongside_fails_the_run_and_moves_nothing(alice, monkeypatch):
    from backoffice import ledger_check

    def broken(run):
        raise RuntimeError("the rollup check broke")

    monkeypatch.setattr(ledger_check, "EXTRA_CHECKS", [broken])
    with pytest.raises(RuntimeError, match="the rollup check broke"):
        ledger_check.verify_ledger_run()
    assert not LedgerCheckpoint.objects.exists()  # the run's transaction rolled back


def test_a_charge_debited_from_another_wallet_is_named(alice, bob):
    from proxy.models import UsageRecord, UsageStatus

    wallet_credit(wallet=bob.wallet, amount=10_000, kind=EntryKind.BONUS, idempotency_key="b")
    hold = hold_create(wallet=bob.wallet, amount=5_000, request_id="req-elsewhere")  # not alice's wallet
    hold_settle(hold=hold, amount=4_000)
    UsageRecord.objects.create(request_id="req-elsewhere", user=alice, model="m", status=UsageStatus.OK, charge=4_000)
    err = StringIO()
    with pytest.raises(CommandError, match="1 problem"):
        call_command("verify_ledger", stdout=StringIO(), stderr=err)
    assert "usage record req-elsewhere: charged 0.000004000 but the ledger debited 0.000000000" in err.getvalue()
