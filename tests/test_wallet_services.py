"""``wallet.services`` at the unit level: every balance change, its replay and its refusals."""

from __future__ import annotations

import pytest
from django.db import transaction
from django.db.models import Sum

from accounts.models import User
from core.money import parse_usd
from wallet.models import Entry, EntryKind, Hold, HoldStatus, Wallet
from wallet.services import (
    Closed,
    IdempotencyConflict,
    InsufficientFunds,
    WalletError,
    hold_create,
    hold_release,
    hold_settle,
    usage_reconcile,
    wallet_charge,
    wallet_correct,
    wallet_credit,
    wallet_get_or_create,
    wallet_refund,
)

pytestmark = pytest.mark.django_db

USD = 10**9


def _wallet(email: str, usd: int = 0) -> Wallet:
    # No password: hashing one per test would dominate this file's runtime.
    wallet = wallet_get_or_create(user=User.objects.create_user(email=email))
    if usd:
        wallet_credit(wallet=wallet, amount=usd * USD, kind=EntryKind.TOP_UP, idempotency_key="opening")
    return wallet


@pytest.fixture
def wallet(db) -> Wallet:
    return _wallet("w@example.com", 10)


@pytest.fixture
def staff_user(db) -> User:
    return User.objects.create_user(email="ops@example.com", is_staff=True)


def _fresh(wallet: Wallet) -> Wallet:
    return Wallet.objects.get(pk=wallet.pk)


def _assert_consistent(wallet: Wallet) -> None:
    row = _fresh(wallet)
    entries = Entry.objects.filter(wallet=row).aggregate(total=Sum("amount"))["total"] or 0
    active = Hold.objects.filter(wallet=row, status=HoldStatus.ACTIVE).aggregate(total=Sum("amount"))["total"] or 0
    assert row.balance == entries
    assert row.held == active
    latest = Entry.objects.filter(wallet=row).order_by("-id").first()
    assert latest is None or latest.balance_after == row.balance


# --- credit -------------------------------------------------------------------------------------


def test_a_credit_adds_money_and_records_the_balance_after(wallet):
    posted = wallet_credit(
        wallet=wallet, amount=parse_usd("2.5"), kind=EntryKind.BONUS, idempotency_key="b1", reference="promo"
    )
    entry = posted.entry
    assert (entry.kind, entry.amount, entry.balance_after, entry.reference) == (
        "bonus",
        2_500_000_000,
        12_500_000_000,
        "promo",
    )
    assert posted.replayed is False
    assert wallet.balance == _fresh(wallet).balance == 12_500_000_000
    _assert_consistent(wallet)


def test_a_replayed_credit_returns_the_first_entry_and_changes_nothing(wallet):
    first = wallet_credit(wallet=wallet, amount=USD, kind=EntryKind.GRANT, idempotency_key="g1")
    again = wallet_credit(wallet=wallet, amount=USD, kind=EntryKind.GRANT, idempotency_key="g1")
    assert again.entry.pk == first.entry.pk
    assert (first.replayed, again.replayed) == (False, True)
    assert _fresh(wallet).balance == 11 * USD
    assert Entry.objects.filter(wallet=wallet).count() == 2


@pytest.mark.parametrize(("amount", "kind"), [(2 * USD, EntryKind.GRANT), (USD, EntryKind.BONUS)])
def test_a_key_reused_for_a_different_credit_is_a_conflict(wallet, amount, kind):
    wallet_credit(wallet=wallet, amount=USD, kind=EntryKind.GRANT, idempotency_key="g1")
    with pytest.raises(IdempotencyConflict):
        wallet_credit(wallet=wallet, amount=amount, kind=kind, idempotency_key="g1")
    assert _fresh(wallet).balance == 11 * USD


def test_a_conflict_leaves_the_callers_transaction_usable(wallet):
    wallet_credit(wallet=wallet, amount=USD, kind=EntryKind.GRANT, idempotency_key="g1")
    with transaction.atomic():
        with pytest.raises(IdempotencyConflict):
            wallet_credit(wallet=wallet, amount=2 * USD, kind=EntryKind.GRANT, idempotency_key="g1")
        with pytest.raises(IdempotencyConflict):
            wallet_charge(wallet=wallet, amount=USD, idempotency_key="g1")
        with pytest.raises(IdempotencyConflict):
            wallet_refund(wallet=wallet, amount=USD, idempotency_key="g1")
        # Before the fix the refusal had doomed this transaction: the next query raised.
        wallet_credit(wallet=wallet, amount=USD, kind=EntryKind.BONUS, idempotency_key="b1")
    assert _fresh(wallet).balance == 12 * USD


def test_a_refusal_for_funds_leaves_the_callers_transaction_usable(wallet):
    with transaction.atomic():
        with pytest.raises(InsufficientFunds):
            wallet_charge(wallet=wallet, amount=11 * USD, idempotency_key="c1")
        with pytest.raises(InsufficientFunds):
            hold_create(wallet=wallet, amount=11 * USD, request_id="r1")
        wallet_charge(wallet=wallet, amount=USD, idempotency_key="c2")
    assert _fresh(wallet).balance == 9 * USD


@pytest.mark.parametrize("kind", [EntryKind.USAGE, EntryKind.CHARGE, EntryKind.REFUND, EntryKind.CORRECTION])
def test_a_credit_must_be_a_credit_kind(wallet, kind):
    with pytest.raises(WalletError):
        wallet_credit(wallet=wallet, amount=USD, kind=kind, idempotency_key=None)


@pytest.mark.parametrize("amount", [0, -USD])
def test_a_credit_must_be_positive(wallet, amount):
    with pytest.raises(WalletError):
        wallet_credit(wallet=wallet, amount=amount, kind=EntryKind.BONUS, idempotency_key=None)


@pytest.mark.parametrize(
    "call",
    [
        lambda w: wallet_credit(wallet=w, amount=1.5, kind=EntryKind.BONUS, idempotency_key=None),
        lambda w: wallet_charge(wallet=w, amount=0.1, idempotency_key=None),
        lambda w: wallet_refund(wallet=w, amount=1.0, idempotency_key="r"),
        lambda w: hold_create(wallet=w, amount=0.5, request_id="f"),
        lambda w: wallet_credit(wallet=w, amount=True, kind=EntryKind.BONUS, idempotency_key=None),
    ],
)
def test_floats_are_refused_as_amounts(wallet, call):
    with pytest.raises(TypeError):
        call(wallet)
    assert Entry.objects.filter(wallet=wallet).count() == 1
    assert _fresh(wallet).held == 0


# --- charge -------------------------------------------------------------------------------------


def test_a_charge_debits_the_available_balance(wallet):
    entry = wallet_charge(
        wallet=wallet, amount=parse_usd("0.000000001"), idempotency_key="c1", description="tool"
    ).entry
    assert (entry.kind, entry.amount, entry.balance_after) == ("charge", -1, 10 * USD - 1)
    _assert_consistent(wallet)


def test_a_charge_larger_than_available_is_refused_and_writes_nothing(wallet):
    hold_create(wallet=wallet, amount=4 * USD, request_id="r1")
    with pytest.raises(InsufficientFunds) as refused:
        wallet_charge(wallet=wallet, amount=6 * USD + 1, idempotency_key="c1")
    assert (refused.value.needed, refused.value.available, refused.value.balance) == (6 * USD + 1, 6 * USD, 10 * USD)
    assert not Entry.objects.filter(kind=EntryKind.CHARGE).exists()
    wallet_charge(wallet=wallet, amount=6 * USD, idempotency_key="c1")  # exactly available fits
    assert _fresh(wallet).available == 0


def test_a_replayed_charge_answers_even_after_the_money_is_gone(wallet):
    first = wallet_charge(wallet=wallet, amount=10 * USD, idempotency_key="c1")
    again = wallet_charge(wallet=wallet, amount=10 * USD, idempotency_key="c1")
    assert (again.entry.pk, again.replayed) == (first.entry.pk, True)
    assert _fresh(wallet).balance == 0


# --- holds --------------------------------------------------------------------------------------


def test_a_hold_reserves_money_without_moving_the_balance(wallet):
    hold = hold_create(wallet=wallet, amount=3 * USD, request_id="r1", ttl_seconds=60)
    row = _fresh(wallet)
    assert (row.balance, row.held, row.available) == (10 * USD, 3 * USD, 7 * USD)
    assert hold.status == HoldStatus.ACTIVE
    assert 59 <= (hold.expires_at - hold.created_at).total_seconds() <= 60
    _assert_consistent(wallet)


def test_it_refuses_a_hold_larger_than_available(wallet):
    hold_create(wallet=wallet, amount=7 * USD, request_id="r1")
    with pytest.raises(InsufficientFunds) as refused:
        hold_create(wallet=wallet, amount=3 * USD + 1, request_id="r2")
    assert (refused.value.needed, refused.value.available) == (3 * USD + 1, 3 * USD)
    assert not Hold.objects.filter(request_id="r2").exists()
    assert _fresh(wallet).held == 7 * USD


def test_a_hold_needs_the_minimum_available_balance_too(wallet):
    with pytest.raises(InsufficientFunds) as refused:
        hold_create(wallet=wallet, amount=USD, request_id="r1", min_available=10 * USD + 1)
    assert refused.value.needed == 10 * USD + 1
    hold = hold_create(wallet=wallet, amount=USD, request_id="r1", min_available=10 * USD)
    assert hold.amount == USD  # the floor gates the hold; only the amount is reserved
    assert _fresh(wallet).held == USD


def test_settling_below_the_hold_charges_the_actual_and_frees_the_rest(wallet):
    hold = hold_create(wallet=wallet, amount=2 * USD, request_id="r1")
    closed = hold_settle(hold=hold, amount=parse_usd("0.3"), metadata={"model": "m"})
    entry = closed.entry
    assert closed.closed_here
    assert (entry.kind, entry.amount, entry.reference, entry.idempotency_key) == (
        "usage",
        -parse_usd("0.3"),
        "r1",
        "hold:r1",
    )
    row = _fresh(wallet)
    assert (row.balance, row.held) == (parse_usd("9.7"), 0)
    assert Hold.objects.get(pk=hold.pk).status == HoldStatus.SETTLED
    _assert_consistent(wallet)


def test_settling_above_the_hold_charges_in_full_and_may_go_negative(wallet):
    hold = hold_create(wallet=wallet, amount=10 * USD, request_id="r1")
    entry = hold_settle(hold=hold, amount=10 * USD + parse_usd("0.25")).entry
    assert entry.amount == -(10 * USD + parse_usd("0.25"))
    row = _fresh(wallet)
    assert (row.balance, row.held) == (-parse_usd("0.25"), 0)
    with pytest.raises(InsufficientFunds):
        hold_create(wallet=wallet, amount=1, request_id="r2")  # blocked until topped up
    _assert_consistent(wallet)


def test_settling_zero_frees_the_hold_and_writes_no_entry(wallet):
    hold = hold_create(wallet=wallet, amount=USD, request_id="r1")
    assert hold_settle(hold=hold, amount=0) == Closed(closed_here=True, entry=None)
    assert (_fresh(wallet).balance, _fresh(wallet).held) == (10 * USD, 0)
    assert Entry.objects.filter(wallet=wallet).count() == 1


def test_settling_twice_returns_the_first_entry_and_charges_once(wallet):
    hold = hold_create(wallet=wallet, amount=USD, request_id="r1")
    first = hold_settle(hold=hold, amount=USD // 2)
    again = hold_settle(hold=Hold.objects.get(pk=hold.pk), amount=USD)
    assert (first.closed_here, again.closed_here) == (True, False)
    assert again.entry.pk == first.entry.pk
    assert _fresh(wallet).balance == 10 * USD - USD // 2
    _assert_consistent(wallet)


def test_a_release_frees_the_hold_without_charging(wallet):
    hold = hold_create(wallet=wallet, amount=USD, request_id="r1")
    assert hold_release(hold=hold) == Closed(closed_here=True, entry=None)
    assert hold.status == HoldStatus.RELEASED
    assert (_fresh(wallet).balance, _fresh(wallet).held) == (10 * USD, 0)
    # a released hold cannot be charged later
    assert hold_settle(hold=hold, amount=USD) == Closed(closed_here=False, entry=None)
    assert not hold_release(hold=hold).closed_here  # and releasing twice changes nothing
    assert (_fresh(wallet).balance, _fresh(wallet).held) == (10 * USD, 0)


def test_releasing_a_settled_hold_changes_nothing(wallet):
    hold = hold_create(wallet=wallet, amount=USD, request_id="r1")
    hold_settle(hold=hold, amount=USD)
    assert not hold_release(hold=hold).closed_here
    assert hold.status == HoldStatus.SETTLED
    assert (_fresh(wallet).balance, _fresh(wallet).held) == (9 * USD, 0)


@pytest.mark.parametrize(("amount", "error"), [(0, WalletError), (-1, WalletError)])
def test_holds_must_be_positive(wallet, amount, error):
    with pytest.raises(error):
        hold_create(wallet=wallet, amount=amount, request_id="r1")


def test_a_settlement_cannot_be_negative(wallet):
    hold = hold_create(wallet=wallet, amount=USD, request_id="r1")
    with pytest.raises(WalletError):
        hold_settle(hold=hold, amount=-1)
    assert _fresh(wallet).held == USD


# --- refunds and corrections --------------------------------------------------------------------


def test_a_refund_claws_back_credit_even_below_zero(wallet):
    wallet_charge(wallet=wallet, amount=9 * USD, idempotency_key="c1")
    entry = wallet_refund(wallet=wallet, amount=10 * USD, idempotency_key="refund:1", reference="order-1").entry
    assert (entry.kind, entry.amount, entry.balance_after) == ("refund", -10 * USD, -9 * USD)
    again = wallet_refund(wallet=wallet, amount=10 * USD, idempotency_key="refund:1")
    assert (again.entry.pk, again.replayed) == (entry.pk, True)
    assert _fresh(wallet).balance == -9 * USD
    _assert_consistent(wallet)


def test_a_correction_records_who_and_why(wallet, staff_user):
    up = wallet_correct(wallet=wallet, amount=USD, reason="  goodwill  ", staff_user=staff_user).entry
    down = wallet_correct(wallet=wallet, amount=-3 * USD, reason="duplicate grant", staff_user=staff_user).entry
    assert (up.kind, up.amount, up.description, up.created_by) == ("correction", USD, "goodwill", staff_user)
    assert (down.amount, down.balance_after) == (-3 * USD, 8 * USD)
    assert up.metadata == {"staff": "ops@example.com"}
    _assert_consistent(wallet)


def test_a_correction_needs_staff_a_reason_and_an_amount(wallet, staff_user):
    customer = User.objects.create_user(email="c@example.com")
    with pytest.raises(WalletError):
        wallet_correct(wallet=wallet, amount=USD, reason="because", staff_user=customer)
    with pytest.raises(WalletError):
        wallet_correct(wallet=wallet, amount=USD, reason="   ", staff_user=staff_user)
    with pytest.raises(WalletError):
        wallet_correct(wallet=wallet, amount=0, reason="nothing", staff_user=staff_user)
    assert Entry.objects.filter(wallet=wallet).count() == 1


def test_a_replayed_correction_posts_once(wallet, staff_user):
    first = wallet_correct(wallet=wallet, amount=USD, reason="x", staff_user=staff_user, idempotency_key="k")
    again = wallet_correct(wallet=wallet, amount=USD, reason="x", staff_user=staff_user, idempotency_key="k")
    assert (again.entry.pk, again.replayed) == (first.entry.pk, True)
    with pytest.raises(IdempotencyConflict):
        wallet_correct(wallet=wallet, amount=-USD, reason="x", staff_user=staff_user, idempotency_key="k")
    assert _fresh(wallet).balance == 11 * USD


def test_idempotency_keys_are_per_wallet(wallet):
    other = _wallet("other@example.com")
    wallet_credit(wallet=wallet, amount=USD, kind=EntryKind.BONUS, idempotency_key="same")
    wallet_credit(wallet=other, amount=2 * USD, kind=EntryKind.BONUS, idempotency_key="same")
    assert (_fresh(wallet).balance, _fresh(other).balance) == (11 * USD, 2 * USD)


# --- reconciling a settled estimate -----------------------------------------------------------


def test_reconcile_debits_what_the_estimate_missed_and_only_once():
    wallet = _wallet("estimate-low@example.com", usd=1)
    first = usage_reconcile(wallet=wallet, request_id="req_low", delta=30_000)
    again = usage_reconcile(wallet=wallet, request_id="req_low", delta=30_000)
    wallet.refresh_from_db()
    assert (first.entry.kind, first.entry.amount) == (EntryKind.USAGE, -30_000)
    assert again.entry.pk == first.entry.pk and again.replayed
    assert wallet.balance == USD - 30_000


def test_reconcile_gives_back_an_overestimate_as_a_system_correction():
    wallet = _wallet("estimate-high@example.com", usd=1)
    entry = usage_reconcile(wallet=wallet, request_id="req_high", delta=-12_345).entry
    wallet.refresh_from_db()
    assert (entry.kind, entry.amount, entry.created_by) == (EntryKind.CORRECTION, 12_345, None)
    assert entry.metadata["source"] == "reconcile_holds"
    assert wallet.balance == USD + 12_345


def test_reconcile_of_an_exact_estimate_writes_nothing():
    wallet = _wallet("estimate-exact@example.com", usd=1)
    assert usage_reconcile(wallet=wallet, request_id="req_exact", delta=0) is None
    assert Entry.objects.filter(wallet=wallet).count() == 1
