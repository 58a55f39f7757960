"""A user's limits (staff's in the admin, their own in the portal and the API, the stricter in
force) and token limits per key and per user: enforced on the metered endpoints and tool charges
across all the user's keys, 429 with a distinct code and Retry-After, rebuilt from the records
when the cache is lost."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import async_to_sync
from django.core.cache import cache
from django.test import Client

from accounts.models import User
from accounts.services import api_key_create
from notify.models import Event
from tests.conftest import bearer_client
from tests.fake_upstream import MODEL, Reply, call, completion, fake_upstream, fake_upstream_server, price, usage  # noqa: F401

CHAT = "/v1/chat/completions"
# About 15 prompt tokens by size, and 100 of output: a hold assumes ~115 tokens.
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}], "max_tokens": 100}


@pytest.fixture(autouse=True)
def fresh_counters():
    cache.clear()
    yield
    cache.clear()


def _staff_limits(user, **limits) -> None:
    User.objects.filter(pk=user.pk).update(limits=limits)


def _two_keys(user, **key_limits) -> tuple[str, str]:
    return (
        api_key_create(user=user, name="laptop", limits=key_limits)[1],
        api_key_create(user=user, name="server", limits=key_limits)[1],
    )


def _assert_429(response, code: str):
    assert response.status == 429, response.body
    assert response.error["code"] == code and response.error["type"] == "rate_limit_error"
    assert int(response.headers["retry-after"]) >= 1


def _replies(fake_upstream, n: int, prompt=1, completion_tokens=1, cost="0.000001"):
    fake_upstream.script("chat", *[Reply(body=completion(u=usage(prompt, completion_tokens, cost=cost)))] * n)


# --- the proxy: each user limit, across two keys --------------------------------------------------


@pytest.mark.usefixtures("one_minute")
@pytest.mark.django_db(transaction=True)
def test_the_users_rpm_counts_requests_from_all_their_keys(fake_upstream, alice, price):
    _staff_limits(alice, rpm=2)
    first, second = _two_keys(alice)
    _replies(fake_upstream, 2)
    assert call(CHAT, HELLO, token=first).status == 200
    assert call(CHAT, HELLO, token=second).status == 200
    response = call(CHAT, HELLO, token=first)
    _assert_429(response, "user_rate_limit_exceeded")
    assert int(response.headers["retry-after"]) <= 60


@pytest.mark.django_db(transaction=True)
def test_the_users_daily_spend_cap_covers_all_their_keys_and_announces_itself(fake_upstream, alice, price):
    # Each request is charged $0.0006 (cost 0.0005 × 1.2): two of them fill a $0.0012 cap.
    _staff_limits(alice, daily_spend="0.0012")
    first, second = _two_keys(alice)
    _replies(fake_upstream, 2, cost="0.0005")
    assert call(CHAT, HELLO, token=first).status == 200
    assert call(CHAT, HELLO, token=second).status == 200
    _assert_429(call(CHAT, HELLO, token=first), "user_spend_cap_reached")
    _assert_429(call(CHAT, HELLO, token=second), "user_spend_cap_reached")
    (event,) = Event.objects.filter(type="usage.cap_reached")  # once per cap and window
    assert event.user_id == alice.pk
    assert event.data["scope"] == "user" and event.data["code"] == "user_spend_cap_reached"
    assert event.data["limit"] == "0.001200000" and event.data["unit"] == "usd"
    assert event.data["organization"] is None  # not a member's cap


@pytest.mark.django_db(transaction=True)
def test_the_users_own_budget_applies_when_tighter_than_staffs(fake_upstream, alice, price):
    User.objects.filter(pk=alice.pk).update(limits={"daily_spend": "5.00"}, own_limits={"daily_spend": "0.0006"})
    first, second = _two_keys(alice)
    _replies(fake_upstream, 1, cost="0.0005")
    assert call(CHAT, HELLO, token=first).status == 200
    _assert_429(call(CHAT, HELLO, token=second), "user_spend_cap_reached")


@pytest.mark.django_db(transaction=True)
def test_a_users_spend_cap_survives_losing_the_cache(fake_upstream, alice, price):
    _staff_limits(alice, daily_spend="0.0012")
    first, second = _two_keys(alice)
    _replies(fake_upstream, 3, cost="0.0005")
    assert call(CHAT, HELLO, token=first).status == 200
    cache.clear()
    assert call(CHAT, HELLO, token=second).status == 200
    cache.clear()  # rebuilt from both keys' usage records
    _assert_429(call(CHAT, HELLO, token=first), "user_spend_cap_reached")


@pytest.mark.django_db(transaction=True)
def test_tool_charges_count_against_the_users_spend_cap(fake_upstream, alice, price):
    _staff_limits(alice, daily_spend="0.05")
    first, second = _two_keys(alice)

    def charge(token, key):
        return Client(headers={"Authorization": f"Bearer {token}"}).post(
            "/v1/user/charge",
            {"amount": "0.03", "description": "tool"},
            content_type="application/json",
            headers={"Idempotency-Key": key},
        )

    assert charge(first, "a").status_code == 200
    refused = charge(second, "b")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "user_spend_cap_reached"
    assert int(refused["Retry-After"]) >= 1


# --- tokens per minute and per day -----------------------------------------------------------------


@pytest.mark.usefixtures("one_minute")
@pytest.mark.django_db(transaction=True)
def test_a_keys_tpm_counts_the_hold_then_the_tokens_really_used(fake_upstream, alice, price):
    token = api_key_create(user=alice, name="k", limits={"tpm": 1300})[1]
    # The first request's hold assumes ~115 tokens; the upstream reports 1,200: the counter then
    # holds 1,200, so the next hold (~115 more) no longer fits.
    _replies(fake_upstream, 1, prompt=1000, completion_tokens=200)
    assert call(CHAT, HELLO, token=token).status == 200
    response = call(CHAT, HELLO, token=token)
    _assert_429(response, "token_limit_reached")
    assert int(response.headers["retry-after"]) <= 60
    (event,) = Event.objects.filter(type="usage.cap_reached")
    assert (event.data["scope"], event.data["unit"], event.data["limit"]) == ("api_key", "tokens", "1300")


@pytest.mark.usefixtures("one_minute")
@pytest.mark.django_db(transaction=True)
def test_small_requests_fit_a_tpm_limit_once_settled(fake_upstream, alice, price):
    token = api_key_create(user=alice, name="k", limits={"tpm": 300})[1]
    _replies(fake_upstream, 3, prompt=10, completion_tokens=10)  # 20 used each, though ~115 held
    assert [call(CHAT, HELLO, token=token).status for _ in range(3)] == [200, 200, 200]


@pytest.mark.django_db(transaction=True)
def test_a_keys_tpd_refuses_until_midnight(fake_upstream, alice, price):
    token = api_key_create(user=alice, name="k", limits={"tpd": 1300})[1]
    _replies(fake_upstream, 1, prompt=1000, completion_tokens=200)
    assert call(CHAT, HELLO, token=token).status == 200
    response = call(CHAT, HELLO, token=token)
    _assert_429(response, "token_limit_reached")
    assert "per day" in response.error["message"]


@pytest.mark.django_db(transaction=True)
def test_the_users_tokens_per_day_count_across_keys_and_survive_losing_the_cache(fake_upstream, alice, price):
    _staff_limits(alice, tpd=1300)
    first, second = _two_keys(alice)
    _replies(fake_upstream, 1, prompt=1000, completion_tokens=200)
    assert call(CHAT, HELLO, token=first).status == 200
    cache.clear()  # rebuilt from the usage records: 1,200 used
    _assert_429(call(CHAT, HELLO, token=second), "user_token_limit_reached")


@pytest.mark.usefixtures("one_minute")
@pytest.mark.django_db(transaction=True)
def test_a_key_tpm_counter_lost_is_rebuilt_from_the_records(fake_upstream, alice, price):
    token = api_key_create(user=alice, name="k", limits={"tpm": 1300})[1]
    _replies(fake_upstream, 1, prompt=1000, completion_tokens=200)
    assert call(CHAT, HELLO, token=token).status == 200
    cache.clear()
    _assert_429(call(CHAT, HELLO, token=token), "token_limit_reached")


# --- requests in flight per user -------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_over_the_users_max_parallel_are_refused_at_once(fake_upstream, alice, price):
    """Six requests at once through two keys of a user allowed two in flight: exactly two reach
    the upstream (on PostgreSQL, with the hot path's own connections), the rest are 429 at once,
    and the slots come back when they finish."""
    from config.asgi import application
    from tests.fake_upstream import _proxy_call, close_loop_resources

    _staff_limits(alice, max_parallel=2)
    first, second = _two_keys(alice)
    reply = completion(u=usage(1, 1, cost="0.000001"))
    fake_upstream.script("chat", *[Reply(body=reply, delay=3.0)] * 2, Reply(body=reply))

    def proxy_call(token):
        raw = json.dumps(HELLO).encode()
        return _proxy_call(application, CHAT, raw, [raw], token, None, None, 30, "POST")

    async def scenario():
        try:
            burst = await asyncio.gather(*(proxy_call(first if i % 2 else second) for i in range(6)))
            after = await proxy_call(first)  # both slots came back
            return burst, after
        finally:
            await close_loop_resources()

    burst, after = async_to_sync(scenario)()
    statuses = sorted(response.status for response in burst)
    assert statuses == [200, 200, 429, 429, 429, 429]
    for response in burst:
        if response.status == 429:
            assert response.error["code"] == "user_max_parallel_reached"
            assert response.headers["retry-after"] == "1"
    assert after.status == 200
    assert len(fake_upstream.calls("chat")) == 3


# --- where limits are entered: the REST API, the portal, the admin ----------------------------------


@pytest.mark.django_db
def test_the_api_shows_staff_own_and_effective_limits(alice):
    _staff_limits(alice, daily_spend="5.000000000", rpm=60)
    client = bearer_client(alice)
    response = client.patch("/api/account/limits", {"daily_spend": "2.50", "tpm": 1000}, format="json")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["staff"]["daily_spend"] == "5.000000000" and body["staff"]["rpm"] == 60
    assert body["own"]["daily_spend"] == "2.500000000" and body["own"]["tpm"] == 1000
    assert body["effective"] == {
        "daily_spend": "2.500000000",
        "monthly_spend": None,
        "rpm": 60,
        "max_parallel": None,
        "tpm": 1000,
        "tpd": None,
    }
    # PATCH keeps the limits it does not name; null clears one.
    body = client.patch("/api/account/limits", {"tpm": None}, format="json").json()
    assert body["own"]["daily_spend"] == "2.500000000" and body["own"]["tpm"] is None
    assert client.get("/api/account/limits").json() == body


@pytest.mark.django_db
@pytest.mark.parametrize(
    "limits, field, message",
    [
        ({"daily_spend": "9.00"}, "daily_spend", "can be at most $5.000000000"),  # looser than staff's
        ({"rpm": 61}, "rpm", "at most 60"),
        ({"rpm": "ten"}, "rpm", "must be a positive whole number"),
        ({"tpd": -1}, "tpd", "must be a positive whole number"),
        ({"max_parallel": 10**9 + 1}, "max_parallel", "at most 1000000000"),
        ({"monthly_spend": 3}, "monthly_spend", "decimal string"),
        ({"monthly_spend": "-1"}, "monthly_spend", "cannot be negative"),
        ({"monthly_spend": "99999999"}, "monthly_spend", "at most 1000000.000000000"),
        ({"burst": 3}, "non_field_errors", "unknown limit(s): burst"),
    ],
)
def test_the_api_refuses_a_bad_or_looser_limit_with_the_reason(alice, limits, field, message):
    _staff_limits(alice, daily_spend="5.000000000", rpm=60)
    response = bearer_client(alice).patch("/api/account/limits", limits, format="json")
    assert response.status_code == 400
    assert message in " ".join(response.json()[field])
    alice.refresh_from_db()
    assert not alice.own_limits


@pytest.mark.django_db
def test_an_api_key_reads_limits_but_cannot_lift_them(alice, alice_key):
    client = Client(headers={"Authorization": f"Bearer {alice_key[1]}"})
    assert client.get("/api/account/limits").status_code == 200
    response = client.patch("/api/account/limits", {"rpm": 5}, content_type="application/json")
    assert response.status_code == 403


@pytest.mark.django_db
def test_the_portal_page_tightens_and_refuses_loosening(alice):
    _staff_limits(alice, daily_spend="5.000000000", tpm=10000)
    client = Client()
    client.force_login(alice)
    page = client.get("/settings/limits")
    assert page.status_code == 200 and "$5.000000000" in page.content.decode()

    refused = client.post("/settings/limits", {"daily_spend": "6"})
    assert refused.status_code == 400
    assert "can be at most $5.000000000, the limit your operator set" in refused.content.decode()
    refused = client.post("/settings/limits", {"tpm": "abc"})
    assert refused.status_code == 400
    assert "tpm must be a positive whole number" in refused.content.decode()
    alice.refresh_from_db()
    assert not alice.own_limits

    saved = client.post("/settings/limits", {"daily_spend": "2.5", "tpm": "5000", "rpm": ""})
    assert saved.status_code == 302
    alice.refresh_from_db()
    assert alice.own_limits["daily_spend"] == "2.500000000" and alice.own_limits["tpm"] == 5000
    assert alice.own_limits["rpm"] is None


@pytest.fixture
def admin_client(staff):
    client = Client()
    client.force_login(staff)
    return client


def _admin_save(admin_client, user, limits: str):
    return admin_client.post(
        f"/admin/accounts/user/{user.pk}/change/",
        {"email": user.email, "is_active": "on", "limits": limits, "_save": "Save"},
    )


@pytest.mark.django_db
def test_staff_set_a_users_limits_in_the_admin(admin_client, alice):
    response = _admin_save(admin_client, alice, '{"daily_spend": "5", "max_parallel": 3, "tpd": 100000}')
    assert response.status_code == 302, response.context["adminform"].form.errors
    alice.refresh_from_db()
    assert alice.limits["daily_spend"] == "5.000000000"
    assert alice.limits["max_parallel"] == 3 and alice.limits["tpd"] == 100000


@pytest.mark.django_db
@pytest.mark.parametrize(
    "limits, message",
    [
        ('{"rpm": "fast"}', "rpm must be a positive whole number"),
        ('{"daily_spend": -2}', "decimal string"),
        ('{"tpm": 0}', "tpm must be a positive whole number"),
        ('{"allowed_models": ["x"]}', "unknown limit(s): allowed_models"),
    ],
)
def test_the_admin_refuses_a_limit_that_is_not_one(admin_client, alice, limits, message):
    response = _admin_save(admin_client, alice, limits)
    assert response.status_code == 200
    assert message in str(response.context["adminform"].form.errors)
    alice.refresh_from_db()
    assert not alice.limits
