"""Bad input is a 400 in the surface's own shape, never a 500 (issue 11, items 9, 10 and 14).

NUL characters (PostgreSQL's text and jsonb cannot hold U+0000), dates at the edges of what
Python and the databases can represent, and numbers written in ways ``Decimal()`` and ``int()``
accept but a client never means: other scripts' digits, underscores, signs, whitespace, floats.
"""

from __future__ import annotations

import pytest
from django.test import Client

from accounts.models import ApiKey
from accounts.services import api_key_create
from core.money import MoneyError, parse_usd
from core.numbers import parse_id
from wallet.models import Entry

pytestmark = pytest.mark.django_db


def v1(secret: str) -> Client:
    return Client(headers={"Authorization": f"Bearer {secret}"})


@pytest.fixture
def alice_v1(alice_key):
    return v1(alice_key[1])


@pytest.fixture
def billing_v1(staff):
    return v1(api_key_create(user=staff, name="billing backend", scopes=["billing"])[1])


def post(client, path, body, key="k1"):
    return client.post(path, body, content_type="application/json", headers={"Idempotency-Key": key})


def openai_error(response, param: str | None = None) -> dict:
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    return error


# --- item 9: NUL characters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"amount": "0.01", "description": "web\x00search"}, "description"),
        ({"amount": "0.01", "description": "x", "metadata": {"q": "a\x00b"}}, "metadata"),
        ({"amount": "0.01", "description": "x", "metadata": {"a\x00b": 1}}, "metadata"),
    ],
)
def test_nul_in_a_charges_description_or_metadata_is_a_400_in_the_openai_shape(alice, alice_v1, body, param):
    response = post(alice_v1, "/v1/user/charge", body)

    assert "NUL" in openai_error(response, param)["message"]
    assert not Entry.objects.filter(wallet__user=alice, kind="tool").exists()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"user": "bob@example.com", "amount": "1", "kind": "bonus", "metadata": {"note": "\x00"}}, "metadata"),
        ({"user": "bob\x00@example.com", "amount": "1", "kind": "bonus"}, "user"),
    ],
)
def test_nul_in_a_deposit_is_a_400_in_the_openai_shape(bob, billing_v1, body, param):
    response = post(billing_v1, "/v1/user/balance/deposit", body)

    openai_error(response, param)
    assert not Entry.objects.filter(wallet__user=bob).exists()


@pytest.mark.parametrize("path", ["/api/usage", "/api/usage/summary"])
@pytest.mark.parametrize("name", ["model", "run"])
def test_nul_in_a_usage_filter_is_a_400_in_the_drf_shape(alice_client, path, name):
    response = alice_client.get(path, {name: "openai/gpt\x00"})

    assert response.status_code == 400
    assert response.json() == {"detail": f"{name} must not contain NUL (U+0000) characters"}


def test_nul_in_the_portal_usage_filter_is_a_400(client, alice):
    client.force_login(alice)

    response = client.get("/usage", {"model": "a\x00b"})

    assert response.status_code == 400
    assert b"NUL" in response.content


# --- item 10: dates out of range -----------------------------------------------------------------

OUT_OF_RANGE = [
    {"until": "9999-12-31"},
    {"since": "0001-01-01T00:00:00+01:00"},
    {"until": "9999-12-31T23:59:59"},
]


@pytest.mark.parametrize("path", ["/api/usage", "/api/usage/summary", "/api/wallet/entries"])
@pytest.mark.parametrize("params", OUT_OF_RANGE)
def test_a_date_out_of_range_is_a_400_on_the_api(alice_client, path, params):
    response = alice_client.get(path, params)

    assert response.status_code == 400, response.content
    assert "out of range" in response.json()["detail"]


@pytest.mark.parametrize("path", ["/api/usage", "/api/usage/summary", "/api/wallet/entries"])
@pytest.mark.parametrize("since", ["0299-05-31T20:04:28+23:00", "2025-05-31T20:04:28-23:59"])
def test_an_offset_postgresql_cannot_store_is_read_in_utc(alice_client, path, since):
    # ±23:00 is a valid ISO 8601 offset that PostgreSQL refuses (beyond ±15:59): it is converted.
    response = alice_client.get(path, {"since": since, "until": "9998-12-31"})

    assert response.status_code == 200, response.content


def test_the_portal_history_says_a_date_is_out_of_range(client, alice):
    client.force_login(alice)

    page = client.get("/history", {"until": "9999-12-31"})
    export = client.get("/history.csv", {"until": "9999-12-31"})

    assert page.status_code == 200
    assert "Choose a date before 9999-01-01." in page.content.decode()
    assert export.status_code == 400
    assert "Choose a date before 9999-01-01." in export.content.decode()
    assert client.get("/history.csv", {"since": "0001-01-01", "until": "9998-12-31"}).status_code == 200


# --- item 14: numbers as a client means them ----------------------------------------------------

NOT_AMOUNTS = ["١٠", "０.０１", "1_0", "1\u00a0", "\u00a01", "0.01\n", " 0.01", "+0.01", "1e-2", "0x10", "1.2.3", "."]


@pytest.mark.parametrize("text", NOT_AMOUNTS)
def test_parse_usd_takes_ascii_digits_and_one_dot_only(text):
    with pytest.raises(MoneyError):
        parse_usd(text)


@pytest.mark.parametrize("text", NOT_AMOUNTS)
def test_a_charge_amount_in_another_form_is_refused(alice, alice_v1, text):
    response = post(alice_v1, "/v1/user/charge", {"amount": text, "description": "x"})

    openai_error(response, "amount")
    assert not Entry.objects.filter(wallet__user=alice, kind="tool").exists()


@pytest.mark.parametrize("text", ["١٠", "1_0", "+5", "5\n"])
def test_a_spend_limit_in_another_form_is_refused(alice_client, text):
    response = alice_client.post("/api/keys", {"name": "k", "limits": {"daily_spend": text}}, format="json")

    assert response.status_code == 400, response.content
    assert not ApiKey.objects.filter(name="k").exists()


@pytest.mark.parametrize("rpm", [1e30, 2.0, 10**30, 2**31, "60", True])
def test_an_rpm_that_is_not_a_whole_number_that_fits_is_refused(alice_client, rpm):
    response = alice_client.post("/api/keys", {"name": "k", "limits": {"rpm": rpm}}, format="json")

    assert response.status_code == 400, response.content
    assert "rpm" in str(response.json())
    assert not ApiKey.objects.filter(name="k").exists()


def test_the_largest_rpm_allowed_is_kept_and_one_more_refused(alice_client):
    from accounts.limits import MAX_COUNT

    response = alice_client.post("/api/keys", {"name": "k", "limits": {"rpm": MAX_COUNT}}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["limits"]["rpm"] == MAX_COUNT

    response = alice_client.post("/api/keys", {"name": "k2", "limits": {"rpm": MAX_COUNT + 1}}, format="json")
    assert response.status_code == 400, response.content


def test_a_user_id_written_as_a_float_is_not_that_user(alice, bob, billing_v1):
    as_text = post(billing_v1, "/v1/user/charge", {"amount": "0.5", "description": "x", "user": f"{alice.pk}.0"})
    as_float = post(billing_v1, "/v1/user/charge", {"amount": "0.5", "description": "x", "user": float(alice.pk)})
    arabic = post(billing_v1, "/v1/user/charge", {"amount": "0.5", "description": "x", "user": chr(0x660 + alice.pk)})

    assert as_text.status_code == 404 and as_text.json()["error"]["code"] == "user_not_found"
    assert as_float.status_code == 400 and as_float.json()["error"]["param"].startswith("body.user")
    assert arabic.status_code == 404
    assert not Entry.objects.filter(kind="tool").exists()
    # The forms that do name a user still do.
    by_id = post(billing_v1, "/v1/user/charge", {"amount": "0.5", "description": "x", "user": alice.pk}, key="k2")
    assert by_id.status_code == 200, by_id.content


@pytest.mark.parametrize("key", ["2.0", "٢", "+2", "9" * 30])
def test_a_usage_key_filter_that_is_not_an_id_is_a_400(alice_client, key):
    response = alice_client.get("/api/usage", {"key": key})

    assert response.status_code == 400
    assert "is not an API key id" in response.json()["detail"]


@pytest.mark.parametrize("value", ["2.0", "٢", "+2", " 2", 2.0, True, 0, 2**63, "9" * 40])
def test_parse_id_takes_an_int_or_ascii_digits_that_fit(value):
    with pytest.raises(ValueError):
        parse_id(value)
    assert parse_id("2") == parse_id(2) == 2
