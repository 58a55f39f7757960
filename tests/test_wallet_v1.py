"""/v1/user/balance, /v1/user/charge and /v1/user/balance/deposit through the test client."""

from __future__ import annotations

import pytest
from django.test import Client, override_settings

from accounts.services import api_key_create, token_pair_issue
from wallet.models import Entry, EntryKind
from wallet.money import parse_usd
from wallet.services import hold_create

pytestmark = pytest.mark.django_db


def _client(secret: str) -> Client:
    return Client(headers={"Authorization": f"Bearer {secret}"})


@pytest.fixture
def alice_v1(alice_key):
    return _client(alice_key[1])


@pytest.fixture
def billing_v1(staff):
    _, secret = api_key_create(user=staff, name="billing backend", scopes=["billing"])
    return _client(secret)


def _charge(client, body: dict, key: str | None = "k1"):
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/user/charge", body, content_type="application/json", headers=headers)


def _deposit(client, body: dict, key: str | None = "d1"):
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/user/balance/deposit", body, content_type="application/json", headers=headers)


def _balance(user) -> int:
    user.wallet.refresh_from_db()
    return user.wallet.balance


def test_it_shows_the_callers_balance(alice, alice_v1):
    hold_create(wallet=alice.wallet, amount=parse_usd("1.5"), request_id="req-v1-1")
    response = alice_v1.get("/v1/user/balance")
    assert response.status_code == 200
    assert response.json() == {
        "balance": "10.000000000",
        "held": "1.500000000",
        "available": "8.500000000",
        "currency": "USD",
    }
    assert response["X-Request-Id"]


def test_a_desktop_access_token_works_too(alice):
    client = _client(token_pair_issue(user=alice).access)
    assert client.get("/v1/user/balance").json()["balance"] == "10.000000000"


def test_it_refuses_a_missing_credential_in_openai_shape(client):
    response = client.get("/v1/user/balance")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_it_charges_the_caller(alice, alice_v1):
    response = _charge(alice_v1, {"amount": "0.25", "description": "web search", "metadata": {"tool": "search"}})
    assert response.status_code == 200
    body = response.json()
    entry = Entry.objects.get(pk=body["entry_id"])
    assert body == {"success": True, "charged": "0.250000000", "balance": "9.750000000", "entry_id": entry.pk}
    assert entry.kind == EntryKind.CHARGE
    assert entry.amount == -parse_usd("0.25")
    assert entry.idempotency_key == "charge:k1"
    assert entry.description == "web search"
    assert entry.metadata == {"tool": "search"}
    assert _balance(alice) == parse_usd("9.75")


@override_settings(APP_URL="https://till.example.com")
def test_it_answers_402_and_charges_nothing_when_funds_are_short(alice, alice_v1):
    hold_create(wallet=alice.wallet, amount=parse_usd("9.90"), request_id="req-v1-2")
    response = _charge(alice_v1, {"amount": "0.2", "description": "too much"})
    assert response.status_code == 402
    body = response.json()
    assert body["success"] is False
    assert body["topup_url"] == "https://till.example.com/topup"
    assert "0.100000000" in body["message"]
    assert _balance(alice) == parse_usd("10")
    assert not Entry.objects.filter(kind=EntryKind.CHARGE).exists()


def test_a_replayed_key_returns_the_first_result_and_changes_nothing(alice, alice_v1):
    first = _charge(alice_v1, {"amount": "1", "description": "tool"})
    _charge(alice_v1, {"amount": "2", "description": "another tool"}, key="k2")
    again = _charge(alice_v1, {"amount": "1", "description": "tool"})
    assert again.status_code == 200
    assert again.json() == first.json()
    assert first.json()["balance"] == "9.000000000"
    assert _balance(alice) == parse_usd("7")
    assert Entry.objects.filter(kind=EntryKind.CHARGE).count() == 2


def test_the_same_key_with_a_different_amount_is_a_409(alice, alice_v1):
    _charge(alice_v1, {"amount": "1", "description": "tool"})
    response = _charge(alice_v1, {"amount": "1.5", "description": "tool"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "idempotency_conflict"
    assert _balance(alice) == parse_usd("9")


@pytest.mark.parametrize("amount", [0.25, 1, "0.1234567891", "-1", "0", "lots"])
def test_it_refuses_bad_amounts_clearly(alice, alice_v1, amount):
    response = _charge(alice_v1, {"amount": amount, "description": "tool"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "amount"
    assert error["code"] == "invalid_amount"
    if not isinstance(amount, str):
        assert "decimal string" in error["message"]
    assert _balance(alice) == parse_usd("10")


def test_it_requires_an_idempotency_key(alice, alice_v1):
    response = _charge(alice_v1, {"amount": "1", "description": "tool"}, key=None)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "Idempotency-Key"
    assert _balance(alice) == parse_usd("10")


def test_charging_another_user_without_the_billing_scope_is_403(alice, bob, mallory, alice_v1):
    response = _charge(alice_v1, {"amount": "0.5", "description": "x", "user": mallory.email})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"
    assert _balance(mallory) == parse_usd("1")
    desktop = _client(token_pair_issue(user=alice).access)
    response = _charge(desktop, {"amount": "0.5", "description": "x", "user": mallory.pk})
    assert response.status_code == 403


def test_a_billing_key_charges_another_user_by_email_or_id(alice, billing_v1, staff):
    by_email = _charge(billing_v1, {"amount": "0.5", "description": "x", "user": "ALICE@example.com"}, key="e")
    assert by_email.status_code == 200
    assert by_email.json()["balance"] == "9.500000000"
    by_id = _charge(billing_v1, {"amount": "0.5", "description": "x", "user": str(alice.pk)}, key="i")
    assert by_id.json()["balance"] == "9.000000000"
    by_int = _charge(billing_v1, {"amount": "0.5", "description": "x", "user": alice.pk}, key="n")
    assert by_int.json()["balance"] == "8.500000000"
    assert _balance(alice) == parse_usd("8.5")
    # Keys are namespaced on the *target* wallet.
    assert Entry.objects.filter(wallet=alice.wallet, idempotency_key="charge:e").exists()
    assert _balance(staff) == 0


def test_charging_an_unknown_user_is_404(billing_v1):
    response = _charge(billing_v1, {"amount": "0.5", "description": "x", "user": "nobody@example.com"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "user_not_found"


def test_a_billing_key_deposits_a_bonus(bob, billing_v1):
    response = _deposit(billing_v1, {"user": bob.email, "amount": "5.000000001", "kind": "bonus", "metadata": {"c": 1}})
    assert response.status_code == 201
    body = response.json()
    assert body["balance"] == "5.000000001"
    entry = Entry.objects.get(pk=body["entry_id"])
    assert (entry.kind, entry.amount, entry.idempotency_key) == ("bonus", 5_000_000_001, "deposit:d1")
    assert entry.metadata == {"c": 1}
    replay = _deposit(billing_v1, {"user": bob.email, "amount": "5.000000001", "kind": "bonus"})
    assert replay.status_code == 201
    assert replay.json() == body
    assert _balance(bob) == 5_000_000_001
    conflict = _deposit(billing_v1, {"user": bob.email, "amount": "6", "kind": "bonus"})
    assert conflict.status_code == 409


def test_deposits_need_the_billing_scope(bob, alice_v1):
    response = _deposit(alice_v1, {"user": bob.email, "amount": "5", "kind": "grant"})
    assert response.status_code == 403
    assert _balance(bob) == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"user": "ghost@example.com", "amount": "5", "kind": "trial"}, 404),
        ({"user": "bob@example.com", "amount": "5", "kind": "top_up"}, 400),
        ({"user": "bob@example.com", "amount": 5, "kind": "trial"}, 400),
    ],
)
def test_bad_deposits_are_refused_in_openai_shape(bob, billing_v1, body, status):
    response = _deposit(billing_v1, body)
    assert response.status_code == status
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
    assert _balance(bob) == 0
