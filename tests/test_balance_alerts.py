"""``balance.low`` and ``balance.depleted``: written by the balance change that crosses the line,
in its transaction, once per crossing — on every path money moves (postings, settlements through
the ORM, and PostgreSQL's one-statement settlement, sync and async)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from django.db import transaction

from accounts.models import User
from core.money import parse_usd
from infra import adb
from notify.models import Event
from tests.conftest import race
from wallet import alerts, services
from wallet.models import EntryKind, Wallet
from wallet.services import (
    ahold_settle,
    hold_create,
    hold_settle,
    wallet_charge,
    wallet_credit,
    wallet_get_or_create,
    wallet_refund,
)

USD = parse_usd


def balance_events(user=None) -> list[tuple[str, dict]]:
    events = Event.objects.order_by("created_at", "id")
    if user is not None:
        events = events.filter(user=user)
    return [(event.type, event.data) for event in events]


def funded(email: str, amount: str, threshold: str | None = None) -> Wallet:
    wallet = wallet_get_or_create(user=User.objects.create_user(email=email))
    if threshold is not None:
        Wallet.objects.filter(pk=wallet.pk).update(low_balance_threshold=USD(threshold))
    wallet.refresh_from_db()
    wallet_credit(wallet=wallet, amount=USD(amount), kind=EntryKind.TOP_UP, idempotency_key=f"open:{email}")
    return wallet


def charge(wallet: Wallet, amount: str, key: str) -> None:
    wallet_charge(wallet=wallet, amount=USD(amount), idempotency_key=key)


def settle(wallet: Wallet, amount: str, request_id: str) -> None:
    hold = hold_create(wallet=wallet, amount=USD(amount), request_id=request_id)
    hold_settle(hold=hold, amount=USD(amount))


pytestmark = pytest.mark.django_db


def test_falling_below_the_threshold_fires_once_not_per_request(settings):
    settings.LOW_BALANCE_THRESHOLD, settings.MIN_BALANCE = Decimal("1.00"), Decimal("0.05")
    wallet = funded("low@example.com", "1.30")
    for n in range(3):
        settle(wallet, "0.20", f"r{n}")  # 1.30 → 1.10 → 0.90 (crosses) → 0.70
    assert balance_events() == [("balance.low", {"balance": "0.900000000", "threshold": "1.000000000"})]


def test_topping_up_above_the_threshold_rearms_it(settings):
    settings.LOW_BALANCE_THRESHOLD = Decimal("1.00")
    wallet = funded("rearm@example.com", "1.10")
    charge(wallet, "0.20", "a")  # 0.90: low
    charge(wallet, "0.10", "b")  # 0.80: still low, no second event
    wallet_credit(wallet=wallet, amount=USD("0.50"), kind=EntryKind.TOP_UP, idempotency_key="top")  # 1.30
    charge(wallet, "0.40", "c")  # 0.90: low again
    assert [t for t, _ in balance_events()] == ["balance.low", "balance.low"]


def test_landing_exactly_on_the_threshold_is_not_below_it(settings):
    settings.LOW_BALANCE_THRESHOLD = Decimal("1.00")
    wallet = funded("exact@example.com", "1.50")
    charge(wallet, "0.50", "a")
    assert balance_events() == []
    charge(wallet, "0.000000001", "b")
    assert [t for t, _ in balance_events()] == ["balance.low"]


def test_the_users_own_threshold_wins_and_zero_turns_the_alert_off(settings):
    settings.LOW_BALANCE_THRESHOLD = Decimal("1.00")
    own = funded("own@example.com", "10.00", threshold="5")
    off = funded("off@example.com", "10.00", threshold="0")
    charge(own, "5.50", "a")
    charge(off, "9.00", "b")
    assert balance_events(own.user) == [("balance.low", {"balance": "4.500000000", "threshold": "5.000000000"})]
    assert balance_events(off.user) == []


def test_falling_below_min_balance_is_depleted_and_may_cross_both_lines_at_once(settings):
    settings.LOW_BALANCE_THRESHOLD, settings.MIN_BALANCE = Decimal("1.00"), Decimal("0.05")
    wallet = funded("both@example.com", "2.00")
    settle(wallet, "1.98", "big")  # 2.00 → 0.02 in one step
    assert sorted(balance_events()) == [
        ("balance.depleted", {"balance": "0.020000000", "min_balance": "0.050000000"}),
        ("balance.low", {"balance": "0.020000000", "threshold": "1.000000000"}),
    ]


def test_with_no_min_balance_depleted_means_zero_or_less(settings):
    settings.LOW_BALANCE_THRESHOLD, settings.MIN_BALANCE = Decimal("0"), Decimal("0")
    wallet = funded("zero@example.com", "1.00")
    charge(wallet, "0.99", "a")
    assert balance_events() == []
    wallet_refund(wallet=wallet, amount=USD("0.01"), idempotency_key="refund")  # to exactly 0
    assert balance_events() == [("balance.depleted", {"balance": "0.000000000", "min_balance": "0.000000000"})]


def test_credits_never_fire_and_a_release_moves_no_balance(settings):
    settings.LOW_BALANCE_THRESHOLD = Decimal("1.00")
    wallet = funded("credit@example.com", "0.50")  # credited up from 0: no crossing downwards
    hold = hold_create(wallet=wallet, amount=USD("0.40"), request_id="held")
    services.hold_release(hold=hold)
    assert balance_events() == []


def test_the_event_rolls_back_with_its_cause(settings):
    settings.LOW_BALANCE_THRESHOLD = Decimal("1.00")
    wallet = funded("rollback@example.com", "1.50")
    with pytest.raises(RuntimeError), transaction.atomic():
        charge(wallet, "1.00", "a")
        assert len(balance_events()) == 1  # written inside the transaction…
        raise RuntimeError("the caller's transaction fails")
    assert balance_events() == []  # …and gone with it
    assert Wallet.objects.get(pk=wallet.pk).balance == USD("1.50")


def test_a_threshold_is_a_money_string_refused_clearly_otherwise():
    assert alerts.threshold_parse("") is None
    assert alerts.threshold_parse(" 2.50 ") == USD("2.50")
    assert alerts.threshold_parse("0") == 0
    for bad in ("abc", "-1", "1e3", "1.2.3", "1.0000000001", ".", "$5", "1" * 20):
        with pytest.raises(alerts.InvalidThreshold, match="not an amount of money"):
            alerts.threshold_parse(bad)


# --- PostgreSQL: the settlement statement, and races ----------------------------------------------


@pytest.mark.postgres
def test_the_pg_statement_and_the_orm_write_the_same_events(settings):
    """The two implementations of a settlement's crossing check: same types, same payloads."""
    settings.LOW_BALANCE_THRESHOLD, settings.MIN_BALANCE = Decimal("1.00"), Decimal("0.05")
    results = {}
    for name, implementation in (("orm", services._Orm), ("pg", services._Pg)):
        wallet = funded(f"{name}@example.com", "1.20", threshold="1.10")
        hold = hold_create(wallet=wallet, amount=USD("1.18"), request_id=f"{name}-r")
        implementation.close(
            hold, status="settled", amount=USD("1.18"), kind=EntryKind.USAGE, description="", metadata={}
        )
        results[name] = sorted(balance_events(wallet.user))  # one instant: no order between the two
    assert (
        results["pg"]
        == results["orm"]
        == [
            ("balance.depleted", {"balance": "0.020000000", "min_balance": "0.050000000"}),
            ("balance.low", {"balance": "0.020000000", "threshold": "1.100000000"}),
        ]
    )
    pg_event = Event.objects.get(user__email="pg@example.com", type="balance.low")
    assert pg_event.id.startswith("evt_") and len(pg_event.id) == 36 and pg_event.dispatched_at is None


@pytest.mark.postgres
def test_a_settlement_that_crosses_nothing_writes_nothing_in_the_statement(settings):
    settings.LOW_BALANCE_THRESHOLD = Decimal("1.00")
    wallet = funded("quiet@example.com", "5.00")
    hold = hold_create(wallet=wallet, amount=USD("0.10"), request_id="q")
    services._Pg.close(hold, status="settled", amount=USD("0.10"), kind=EntryKind.USAGE, description="", metadata={})
    assert balance_events() == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_racing_settlements_cross_the_threshold_exactly_once(settings):
    settings.LOW_BALANCE_THRESHOLD, settings.MIN_BALANCE = Decimal("1.00"), Decimal("0")
    threads = 16
    # 16 settlements of 0.11 (each a little over its 0.10 hold): 1.75 → −0.01, crossing 1.00 and 0.
    wallet = funded("race@example.com", "1.75")
    holds = [hold_create(wallet=wallet, amount=USD("0.10"), request_id=f"race-{n}") for n in range(threads)]

    results = race(lambda index: hold_settle(hold=holds[index], amount=USD("0.11")), threads)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert Wallet.objects.get(pk=wallet.pk).balance == USD("-0.01")
    assert sorted(t for t, _ in balance_events()) == ["balance.depleted", "balance.low"]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_racing_async_settlements_on_the_hot_path_cross_exactly_once(settings):
    settings.LOW_BALANCE_THRESHOLD, settings.MIN_BALANCE = Decimal("1.00"), Decimal("0.05")
    wallet = funded("hot@example.com", "1.40")  # 12 × 0.10 → 0.20: crosses 1.00 once, never 0.05
    holds = [hold_create(wallet=wallet, amount=USD("0.10"), request_id=f"hot-{n}") for n in range(12)]

    async def settle_all():
        try:
            await asyncio.gather(*(ahold_settle(hold=hold, amount=USD("0.10")) for hold in holds))
        finally:
            await adb.close()

    asyncio.run(settle_all())
    assert Wallet.objects.get(pk=wallet.pk).balance == USD("0.20")
    events = balance_events()
    assert [t for t, _ in events] == ["balance.low"]
    assert events[0][1]["threshold"] == "1.000000000"
    assert Decimal(events[0][1]["balance"]) < 1
