"""The database itself refuses to corrupt the ledger, whatever code (or person) goes around the ORM.

Each refusal runs in its own ``transaction.atomic()`` so the failed statement rolls back to a
savepoint instead of breaking the test's transaction; then the row is checked unchanged.
"""

from __future__ import annotations

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction

from accounts.models import User
from wallet.models import AppendOnlyError, Entry, EntryKind, Hold, Wallet
from wallet.services import wallet_credit, wallet_get_or_create

pytestmark = pytest.mark.django_db

USD = 10**9


@pytest.fixture
def entry(db) -> Entry:
    wallet = wallet_get_or_create(user=User.objects.create_user(email="w@example.com"))
    return wallet_credit(wallet=wallet, amount=10 * USD, kind=EntryKind.TOP_UP, idempotency_key="opening").entry


def _refused(sql: str, params=(), error=DatabaseError) -> None:
    with pytest.raises(error):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, params)


def _unchanged(entry: Entry) -> None:
    row = Entry.objects.get(pk=entry.pk)
    assert (row.amount, row.balance_after, row.kind) == (entry.amount, entry.balance_after, entry.kind)


def test_raw_sql_cannot_update_an_entry(entry):
    _refused("UPDATE wallet_entry SET amount = amount * 2 WHERE id = %s", [entry.pk])
    _refused("UPDATE wallet_entry SET description = 'edited'")
    _unchanged(entry)
    assert Entry.objects.get(pk=entry.pk).description == ""


def test_raw_sql_cannot_delete_an_entry(entry):
    _refused("DELETE FROM wallet_entry WHERE id = %s", [entry.pk])
    _refused("DELETE FROM wallet_entry")
    _unchanged(entry)


def test_bulk_orm_updates_and_deletes_hit_the_same_wall(entry):
    with pytest.raises(DatabaseError), transaction.atomic():
        Entry.objects.filter(pk=entry.pk).update(amount=1)
    with pytest.raises(DatabaseError), transaction.atomic():
        Entry.objects.filter(pk=entry.pk).delete()
    _unchanged(entry)


def test_the_model_refuses_save_after_create_and_delete(entry):
    entry.amount = 1
    with pytest.raises(AppendOnlyError):
        entry.save()
    with pytest.raises(AppendOnlyError):
        entry.delete()
    _unchanged(Entry.objects.get(pk=entry.pk))


@pytest.mark.postgres
def test_truncate_is_refused_on_postgres(entry):
    _refused("TRUNCATE wallet_entry CASCADE")
    _unchanged(entry)


def _bypassing_insert(entry: Entry, **fields) -> None:
    values = {
        "wallet_id": entry.wallet_id,
        "kind": EntryKind.BONUS,
        "amount": 1,
        "balance_after": entry.balance_after + 1,
        **fields,
    }
    with pytest.raises(IntegrityError), transaction.atomic():
        Entry.objects.bulk_create([Entry(**values)])


def test_a_zero_entry_is_refused_by_a_check_constraint(entry):
    _bypassing_insert(entry, amount=0, kind=EntryKind.CORRECTION)
    _refused(
        "INSERT INTO wallet_entry (wallet_id, kind, amount, balance_after, reference, description, metadata,"
        " created_at) VALUES (%s, 'correction', 0, 0, '', '', '{}', CURRENT_TIMESTAMP)",
        [entry.wallet_id],
        IntegrityError,
    )
    assert Entry.objects.count() == 1


def test_a_reused_idempotency_key_is_refused_by_a_unique_constraint(entry):
    _bypassing_insert(entry, idempotency_key="opening")
    _refused(
        "INSERT INTO wallet_entry (wallet_id, kind, amount, balance_after, idempotency_key, reference,"
        " description, metadata, created_at)"
        " VALUES (%s, 'bonus', 5, 5, 'opening', '', '', '{}', CURRENT_TIMESTAMP)",
        [entry.wallet_id],
        IntegrityError,
    )
    assert Entry.objects.count() == 1


@pytest.mark.parametrize(("kind", "amount"), [(EntryKind.TOP_UP, -1), (EntryKind.USAGE, 1), (EntryKind.REFUND, 5)])
def test_an_entry_whose_sign_contradicts_its_kind_is_refused(entry, kind, amount):
    _bypassing_insert(entry, kind=kind, amount=amount)
    assert Entry.objects.count() == 1


def test_a_negative_held_amount_is_refused(entry):
    _refused("UPDATE wallet_wallet SET held = -1 WHERE id = %s", [entry.wallet_id], IntegrityError)
    assert Wallet.objects.get(pk=entry.wallet_id).held == 0


def test_a_hold_must_be_positive_in_the_database(entry):
    from django.utils import timezone

    with pytest.raises(IntegrityError), transaction.atomic():
        Hold.objects.bulk_create(
            [Hold(wallet_id=entry.wallet_id, amount=0, request_id="r0", expires_at=timezone.now())]
        )
    assert not Hold.objects.exists()
