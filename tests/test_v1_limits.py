"""An API key's limits on the /v1 endpoints other than the proxy's: its rpm counts every /v1
request it makes, and its tool charges count against its daily and monthly spend caps — on the
same counters as the proxy's (proxy.limits), so one budget covers model use and tool use."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from django.core.cache import cache
from django.test import Client

from accounts.services import api_key_create, token_pair_issue
from core.money import parse_usd
from proxy.models import UsageRecord, UsageStatus
from tests.conftest import race
from wallet.models import Entry, EntryKind
from wallet.services import wallet_credit

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_counters():
    # The counters live in the process's cache, keyed by key id and window; ids repeat between
    # tests (SQLite reuses them after a rollback), so each test starts from an empty cache.
    cache.clear()
    yield
    cache.clear()


def _client(secret: str) -> Client:
    return Client(headers={"Authorization": f"Bearer {secret}"})


def _key(user, **limits) -> tuple:
    row, secret = api_key_create(user=user, name="agent", limits=limits)
    return row, _client(secret)


def _charge(client, amount: str, key: str, **body):
    return client.post(
        "/v1/user/charge",
        {"amount": amount, "description": "tool", **body},
        content_type="application/json",
        headers={"Idempotency-Key": key},
    )


def _balance(user) -> int:
    user.wallet.refresh_from_db()
    return user.wallet.balance


def _charges() -> int:
    return Entry.objects.filter(kind=EntryKind.CHARGE).count()


def _seconds_to(end: datetime) -> float:
    return (end - datetime.now(UTC)).total_seconds()


def _assert_429(response, code: str, retry_after: float | None = None):
    assert response.status_code == 429, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("rate_limit_error", code)
    assert int(response["Retry-After"]) >= 1
    if retry_after is not None:
        assert abs(int(response["Retry-After"]) - retry_after) <= 2


# --- rpm: every /v1 request made with the key ----------------------------------------------------


@pytest.mark.usefixtures("one_minute")
def test_the_keys_rpm_counts_every_v1_request_balance_models_and_charges_alike(alice):
    _, client = _key(alice, rpm=3)
    assert client.get("/v1/user/balance").status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert _charge(client, "0.01", "c1").status_code == 200
    for refused in (client.get("/v1/user/balance"), client.get("/v1/models"), _charge(client, "0.01", "c2")):
        _assert_429(refused, "rate_limit_exceeded", retry_after=60 - datetime.now(UTC).second)
    assert "3 requests per minute" in refused.json()["error"]["message"]
    assert _charges() == 1
    assert _balance(alice) == parse_usd("9.99")


@pytest.mark.usefixtures("one_minute")
def test_the_reviewers_case_a_key_with_rpm_1_and_a_cent_a_day_cannot_charge_three_times(alice):
    _, client = _key(alice, rpm=1, daily_spend="0.01")
    first, second, third = (_charge(client, "0.02", f"k{n}") for n in range(3))
    _assert_429(first, "spend_cap_reached")
    _assert_429(second, "rate_limit_exceeded")
    _assert_429(third, "rate_limit_exceeded")
    assert _balance(alice) == parse_usd("10")
    assert _charges() == 0


@pytest.mark.usefixtures("one_minute")
def test_rpm_is_per_key_and_a_desktop_token_has_none(alice):
    _, limited = _key(alice, rpm=1)
    _, other = _key(alice)
    desktop = _client(token_pair_issue(user=alice).access)
    assert limited.get("/v1/user/balance").status_code == 200
    assert limited.get("/v1/user/balance").status_code == 429
    assert all(other.get("/v1/user/balance").status_code == 200 for _ in range(5))
    assert all(desktop.get("/v1/user/balance").status_code == 200 for _ in range(5))


# --- spend caps: tool charges count, refusals and replays do not ---------------------------------


def _next_midnight() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def _next_month() -> datetime:
    first = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


@pytest.mark.parametrize(("window", "reset"), [("daily", _next_midnight), ("monthly", _next_month)])
def test_tool_charges_count_against_the_keys_spend_cap_until_the_window_resets(alice, window, reset):
    _, client = _key(alice, **{f"{window}_spend": "0.05"})
    assert _charge(client, "0.03", "a").status_code == 200
    refused = _charge(client, "0.03", "b")
    _assert_429(refused, "spend_cap_reached", retry_after=_seconds_to(reset()))
    assert f"{window} spend cap of $0.050000000" in refused.json()["error"]["message"]
    # The refused charge gave its reservation back: the rest of the cap is still there.
    assert _charge(client, "0.02", "c").status_code == 200
    _assert_429(_charge(client, "0.000000001", "d"), "spend_cap_reached")
    assert _balance(alice) == parse_usd("9.95")


def test_a_charge_refused_for_funds_does_not_count_against_the_cap(bob):
    _, client = _key(bob, daily_spend="1.00")
    assert _charge(client, "0.60", "short").status_code == 402
    wallet_credit(wallet=bob.wallet, amount=parse_usd("5"), kind=EntryKind.TOP_UP, idempotency_key="top-up")
    # Had the 402 kept its reservation, 0.60 + 0.60 would pass the 1.00 cap.
    assert _charge(client, "0.60", "after-top-up").status_code == 200


def test_a_replay_counts_once_and_is_answered_even_when_the_cap_is_full(alice):
    _, client = _key(alice, daily_spend="0.05")
    first = _charge(client, "0.03", "once")
    for _ in range(3):  # the cap has room for one more 0.03 at most: these are replays, not charges
        again = _charge(client, "0.03", "once")
        assert again.status_code == 200
        assert again.json() == first.json()
    assert _charge(client, "0.02", "fills-the-cap").status_code == 200
    full = _charge(client, "0.03", "once")  # the cap is full now, and the replay still answers
    assert full.status_code == 200
    assert full.json() == first.json()
    _assert_429(_charge(client, "0.03", "new"), "spend_cap_reached")
    assert _balance(alice) == parse_usd("9.95")


def test_a_conflicting_reuse_of_the_key_does_not_count_against_the_cap(alice):
    _, client = _key(alice, daily_spend="1.00")
    assert _charge(client, "0.50", "k").status_code == 200
    assert _charge(client, "0.60", "k").status_code == 409
    assert _charge(client, "0.50", "k2").status_code == 200  # 0.50 + 0.50: exactly the cap


def test_a_billing_keys_charges_to_other_users_count_against_its_own_cap(alice, bob, staff):
    _, secret = api_key_create(user=staff, name="billing", scopes=["billing"], limits={"daily_spend": "1.00"})
    billing = _client(secret)
    assert _charge(billing, "0.70", "a", user=alice.email).status_code == 200
    _assert_429(_charge(billing, "0.70", "b", user=alice.email), "spend_cap_reached")
    assert _balance(alice) == parse_usd("9.30")


def test_deposits_credit_and_never_count_against_a_spend_cap(bob, staff):
    _, secret = api_key_create(user=staff, name="billing", scopes=["billing"], limits={"daily_spend": "0.01"})
    billing = _client(secret)
    for n in range(3):
        response = billing.post(
            "/v1/user/balance/deposit",
            {"user": bob.email, "amount": "5", "kind": "bonus"},
            content_type="application/json",
            headers={"Idempotency-Key": f"d{n}"},
        )
        assert response.status_code == 201
    assert _balance(bob) == parse_usd("15")


def test_model_use_and_tool_use_share_one_budget(alice):
    key, client = _key(alice, daily_spend="0.05")
    # A request the proxy settled today for 0.04 with this key; then the counter is lost.
    UsageRecord.objects.create(
        request_id="req_earlier",
        user=alice,
        api_key=key,
        model="openai/gpt-4o-mini",
        status=UsageStatus.OK,
        charge=parse_usd("0.04"),
    )
    _assert_429(_charge(client, "0.02", "tool"), "spend_cap_reached")
    assert _charge(client, "0.01", "small-tool").status_code == 200


# --- a lost counter is rebuilt from the ledger too ------------------------------------------------


def test_a_spend_cap_survives_losing_the_cache(alice):
    _, client = _key(alice, daily_spend="0.05")
    assert _charge(client, "0.03", "before").status_code == 200
    cache.clear()  # a restart of an in-memory cache, or an eviction
    _assert_429(_charge(client, "0.03", "after"), "spend_cap_reached")
    cache.clear()
    assert _charge(client, "0.02", "fits").status_code == 200


def test_the_rebuild_counts_only_this_keys_charges(alice):
    _, capped = _key(alice, daily_spend="0.05")
    _, other = _key(alice)
    desktop = _client(token_pair_issue(user=alice).access)
    assert _charge(other, "0.04", "other-key").status_code == 200
    assert _charge(desktop, "0.04", "desktop").status_code == 200
    cache.clear()
    assert _charge(capped, "0.05", "mine").status_code == 200


@pytest.mark.parametrize("metadata", [{"api_key_id": 1}, {"api_key_id": "mine", "x": 1}])
def test_a_caller_cannot_name_the_key_a_charge_is_counted_against(alice, alice_key, metadata):
    # Otherwise a user could spend their own money "as" someone else's key, and a rebuilt
    # counter would refuse that key.
    for client in (_client(alice_key[1]), _client(token_pair_issue(user=alice).access)):
        response = _charge(client, "0.01", "forged", metadata=metadata)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "metadata"
    assert _charges() == 0


# --- concurrency and processes -------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_racing_charges_never_pass_the_cap_together(alice):
    _, secret = api_key_create(user=alice, name="agent", limits={"daily_spend": "0.05"})
    statuses = race(lambda index: _charge(_client(secret), "0.01", f"race-{index}").status_code, threads=12)
    assert sorted(statuses) == [200] * 5 + [429] * 7
    assert _balance(alice) == parse_usd("9.95")


@pytest.mark.redis
def test_charge_counters_live_in_redis_and_rebuild_there(alice, redis_cache):
    key, client = _key(alice, daily_spend="0.05")
    assert _charge(client, "0.03", "a").status_code == 200
    import redis

    shared = redis.Redis.from_url(os.environ["TEST_REDIS_URL"])
    (counter,) = shared.keys(f"tt-test-{os.getpid()}:*tt:spend:{key.pk}:daily:*")
    assert int(shared.get(counter)) == parse_usd("0.03")  # what another process would read
    shared.delete(counter)  # lost: rebuilt from the ledger, as an integer Redis can add to
    _assert_429(_charge(client, "0.03", "b"), "spend_cap_reached")
    assert _charge(client, "0.02", "c").status_code == 200
    assert int(shared.get(counter)) == parse_usd("0.05")
