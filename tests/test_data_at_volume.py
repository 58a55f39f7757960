"""Lists, exports, retention and ledger verification built for millions of rows, through their
public surface: cursor pages that neither skip nor repeat while rows arrive, CSV exports read in
bounded keyset chunks, ``prune_usage`` and ``verify_ledger --incremental``."""

from __future__ import annotations

import itertools
import re
import threading
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from backoffice.models import LedgerCheckpoint
from proxy.models import UsageRecord, UsageStatus
from wallet import selectors as wallet_selectors
from wallet.models import Entry, EntryKind
from wallet.services import hold_create, hold_settle, wallet_credit

pytestmark = pytest.mark.django_db

_ids = itertools.count(1)


def record(user, *, created_at=None, status=UsageStatus.OK, **fields) -> UsageRecord:
    values = {"request_id": f"req_vol_{next(_ids)}", "model": "openai/gpt-4o-mini", **fields}
    return UsageRecord.objects.create(user=user, status=status, created_at=created_at or timezone.now(), **values)


def walk(client, url: str, between=None) -> list[int]:
    """Every id that following ``next`` from ``url`` shows, calling ``between()`` between pages."""
    seen = []
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.content
        seen += [row["id"] for row in response.json()["results"]]
        url = response.json()["next"]
        if between is not None:
            between()
    return seen


# --- cursor pages ----------------------------------------------------------------------------------


def test_usage_pages_neither_skip_nor_repeat_while_requests_arrive(alice, alice_client):
    moment = timezone.now() - timedelta(hours=1)
    # Ties on created_at: the cursor must order and resume by (created_at, id).
    old = [record(alice, created_at=moment + timedelta(seconds=n // 3)).pk for n in range(23)]
    shown = walk(alice_client, "/api/usage?limit=5", between=lambda: record(alice))
    assert len(shown) == len(set(shown))
    assert [pk for pk in shown if pk in old] == sorted(old, reverse=True)


def test_entry_pages_neither_skip_nor_repeat_while_entries_arrive(alice, alice_client):
    for n in range(17):
        wallet_credit(wallet=alice.wallet, amount=1 + n, kind=EntryKind.BONUS, idempotency_key=f"b{n}")
    old = list(Entry.objects.filter(wallet__user=alice).values_list("pk", flat=True))
    fresh = itertools.count()

    def arrive():
        wallet_credit(wallet=alice.wallet, amount=7, kind=EntryKind.BONUS, idempotency_key=f"new{next(fresh)}")

    shown = walk(alice_client, "/api/wallet/entries?limit=4", between=arrive)
    assert [pk for pk in shown if pk in old] == sorted(old, reverse=True)
    assert len(shown) == len(set(shown))


# --- CSV exports -------------------------------------------------------------------------------------


def _selects_of(queries, table: str) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].startswith("SELECT") and f'FROM "{table}"' in q["sql"]]


def test_the_entries_csv_streams_in_bounded_keyset_chunks(alice, alice_client, monkeypatch):
    monkeypatch.setattr(wallet_selectors, "CSV_CHUNK_ROWS", 4)
    for n in range(13):
        wallet_credit(wallet=alice.wallet, amount=1 + n, kind=EntryKind.BONUS, idempotency_key=f"c{n}")
    expected = list(Entry.objects.filter(wallet__user=alice).order_by("-id").values_list("pk", flat=True))
    with CaptureQueriesContext(connection) as queries:
        response = alice_client.get("/api/wallet/entries?format=csv")
        assert response.streaming
        body = b"".join(response.streaming_content).decode()
    ids = [int(line.split(",")[0]) for line in body.splitlines()[1:]]
    assert ids == expected  # 14 entries (the opening top-up too), newest first, each once
    reads = _selects_of(queries, "wallet_entry")
    assert len(reads) == 4  # ⌈14 / 4⌉ chunks, each its own bounded query
    assert all(sql.endswith("LIMIT 4") for sql in reads)
    assert all('"wallet_entry"."id" <' in sql for sql in reads[1:])  # each seeks below the last


def test_usage_exports_as_csv_from_the_api_and_the_portal(alice, mallory, alice_client, client, monkeypatch):
    from proxy import usage_selectors

    monkeypatch.setattr(usage_selectors, "CSV_CHUNK_ROWS", 2)
    moment = timezone.now() - timedelta(minutes=5)
    mine = [record(alice, created_at=moment, charge=1_500, agent="=cmd|'/C calc'!A0").pk for _ in range(5)]
    record(mallory)
    response = alice_client.get("/api/usage?format=csv")
    assert response["Content-Type"].startswith("text/csv")
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert lines[0].startswith("id,created_at,request_id,model")
    assert [int(line.split(",")[0]) for line in lines[1:]] == sorted(mine, reverse=True)
    assert ",0.000001500," in lines[1] and ",'=cmd|" in lines[1]  # exact money; no formula runs
    assert alice_client.get("/api/usage?format=csv&since=nonsense").json()["detail"].startswith("since:")
    client.force_login(alice)
    portal = client.get("/usage.csv")
    assert portal["Content-Disposition"] == 'attachment; filename="tokentill-usage.csv"'
    assert len(b"".join(portal.streaming_content).decode().splitlines()) == 6


# --- prune_usage -------------------------------------------------------------------------------------


def test_prune_usage_deletes_old_settled_records_in_batches_and_keeps_the_rest(alice, alice_client):
    old = timezone.now() - timedelta(days=200)
    settled = []
    for n in range(5):
        hold = hold_create(wallet=alice.wallet, amount=2_000, request_id=f"req_old_{n}")
        hold_settle(hold=hold, amount=1_000 + n)
        settled.append(record(alice, created_at=old, charge=1_000 + n, request_id=f"req_old_{n}").pk)
    pending = record(alice, created_at=old, status=UsageStatus.PENDING).pk
    recent = record(alice, created_at=timezone.now() - timedelta(days=10)).pk
    entries = Entry.objects.count()

    dry = StringIO()
    call_command("prune_usage", "--older-than", "180d", "--dry-run", stdout=dry)
    assert "Would delete 5 usage records" in dry.getvalue()
    assert UsageRecord.objects.count() == 7

    out = StringIO()
    call_command("prune_usage", "--older-than", "180d", "--batch-size", "2", stdout=out)
    assert "… batch 3: 5 deleted" in out.getvalue() and "in 3 batch(es)" in out.getvalue()
    assert set(UsageRecord.objects.values_list("pk", flat=True)) == {pending, recent}
    assert Entry.objects.count() == entries  # the ledger is never pruned

    gone = alice_client.get(f"/api/usage/{settled[0]}")
    assert gone.status_code == 404 and "/api/wallet/entries" in gone.json()["detail"]
    receipt = Entry.objects.get(wallet__user=alice, reference="req_old_0")
    answered = alice_client.get(f"/api/wallet/entries/{receipt.pk}").json()
    assert answered["reference"] == "req_old_0" and answered["amount"] == "-0.000001000"
    call_command("verify_ledger", stdout=StringIO(), stderr=StringIO())  # still consistent


@pytest.mark.parametrize("window", ["180", "180x", "12h", ""])
def test_prune_usage_refuses_a_window_it_cannot_read_or_under_a_day(window):
    if window == "180":  # a bare number is days: accepted
        call_command("prune_usage", "--older-than", window, "--dry-run", stdout=StringIO())
        return
    with pytest.raises(CommandError):
        call_command("prune_usage", "--older-than", window, stdout=StringIO())


# --- verify_ledger --incremental -------------------------------------------------------------------


def _verify(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("verify_ledger", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_incremental_runs_check_only_new_entries_and_catch_a_tampered_balance(alice, bob):
    wallet_credit(wallet=bob.wallet, amount=5_000, kind=EntryKind.TRIAL, idempotency_key="t")
    out, _ = _verify()
    assert "… entries 1–" in out and "Ledger verified (every entry)" in out
    checkpoint = LedgerCheckpoint.objects.get()
    newest = Entry.objects.order_by("-id").first().pk
    assert checkpoint.verified_through == newest or connection.vendor == "postgresql"

    _verify("--incremental")  # on PostgreSQL the second run promotes the first one's candidate
    checkpoint.refresh_from_db()
    assert checkpoint.verified_through == newest
    wallet_credit(wallet=alice.wallet, amount=3, kind=EntryKind.BONUS, idempotency_key="late")
    out, _ = _verify("--incremental")
    assert f"entries after id {newest:,}" in out
    assert f"entries {newest + 1:,}–{newest + 1:,} of {newest + 1:,}" in out  # only the new one read
    totals = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith("  ")}
    assert totals["Bonus"] == "0.000000003" and totals["Trial"] == "0.000005000"

    with connection.cursor() as cursor:
        cursor.execute("UPDATE wallet_wallet SET balance = balance + 1 WHERE id = %s", [bob.wallet.pk])
    err = StringIO()
    with pytest.raises(CommandError):
        call_command("verify_ledger", "--incremental", stdout=StringIO(), stderr=err)
    assert f"wallet {bob.wallet.pk} (bob@example.com): latest entry's balance_after" in err.getvalue()
    assert "accounting identity broken" in err.getvalue()


def test_incremental_catches_an_entry_forged_behind_the_services(alice):
    _verify()
    _verify("--incremental")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO wallet_entry (wallet_id, kind, amount, balance_after, reference, description,"
            " metadata, created_at) VALUES (%s, 'bonus', 7, 7, '', '', '{}', CURRENT_TIMESTAMP)",
            [alice.wallet.pk],
        )
        cursor.execute("UPDATE wallet_wallet SET balance = 7 WHERE id = %s", [alice.wallet.pk])
    err = StringIO()
    with pytest.raises(CommandError):
        call_command("verify_ledger", "--incremental", stdout=StringIO(), stderr=err)
    assert re.search(r"entry \d+: balance_after 0\.000000007 ≠ running sum 10\.000000007", err.getvalue())


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_entry_that_commits_late_with_a_smaller_id_is_not_skipped(alice, bob):
    """A transaction draws an entry id, then commits after a later id was seen and verified: a
    checkpoint at the highest id seen would never read it. The checkpoint waits for it."""
    from django.db import connections

    started, finish, done = threading.Event(), threading.Event(), threading.Event()

    def slow_credit():
        # As wallet.services does: lock the wallet, draw the entry id, commit later.
        other = connections.create_connection("default")
        with other.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("UPDATE wallet_wallet SET balance = balance + 11 WHERE id = %s", [bob.wallet.pk])
            cursor.execute(
                "INSERT INTO wallet_entry (wallet_id, kind, amount, balance_after, idempotency_key, reference,"
                " description, metadata, created_at) VALUES (%s, 'bonus', 11, 11, 'slow', '', '', '{}', now())",
                [bob.wallet.pk],
            )
            started.set()
            finish.wait(10)
            cursor.execute("COMMIT")
        other.close()
        done.set()

    thread = threading.Thread(target=slow_credit)
    thread.start()
    try:
        assert started.wait(10)
        wallet_credit(wallet=alice.wallet, amount=5, kind=EntryKind.BONUS, idempotency_key="fast")
        fast = Entry.objects.get(idempotency_key="fast").pk
        _verify("--incremental")
        _verify("--incremental")  # the slow transaction is still open: its id is not passed
        assert LedgerCheckpoint.objects.get().verified_through < fast - 1
    finally:
        finish.set()
        thread.join(10)
    assert done.is_set()
    out, _ = _verify("--incremental")  # reads the late entry now, and its 11 nanodollars count
    assert re.search(r"Bonus\s+0\.000000016", out)
    _verify("--incremental")
    assert LedgerCheckpoint.objects.get().verified_through >= fast


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_run_with_nothing_else_running_checkpoints_everything_it_read(alice, bob):
    """When no transaction was running at a run's snapshot, every id up to the highest it read is
    final: the checkpoint goes there at once, and the next incremental run reads only what is new.
    With one running (it may hold a smaller id), the checkpoint waits as before."""
    from django.db import connections

    newest = Entry.objects.order_by("-id").first().pk
    out, _ = _verify()
    assert LedgerCheckpoint.objects.get().verified_through == newest
    out, _ = _verify("--incremental")
    assert f"entries after id {newest:,}" in out and "… entries " not in out  # nothing left to read

    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("BEGIN")  # an open transaction with an xid, as a service's mid-request
            cursor.execute("UPDATE wallet_wallet SET balance = balance WHERE id = %s", [bob.wallet.pk])
            wallet_credit(wallet=alice.wallet, amount=5, kind=EntryKind.BONUS, idempotency_key="meanwhile")
            _verify()
            assert LedgerCheckpoint.objects.get().verified_through == newest  # not the new entry's id
            cursor.execute("ROLLBACK")
    finally:
        other.close()
    _verify("--incremental")
    assert LedgerCheckpoint.objects.get().verified_through == Entry.objects.order_by("-id").first().pk
