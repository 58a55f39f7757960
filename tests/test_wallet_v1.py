"""/v1/user/balance, /v1/user/charge and /v1/user/balance/deposit through the test client."""

from __future__ import annotations

import pytest
from django.test import Client, override_settings

from accounts.services import api_key_create, token_pair_issue
from core.money import parse_usd
from wallet.models import Entry, EntryKind
from wallet.services import hold_create, wallet_credit

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


def test_it_charges_the_caller(alice, alice_key, alice_v1):
    response = _charge(alice_v1, {"amount": "0.25", "description": "web search", "metadata": {"tool": "search"}})
    assert response.status_code == 200
    body = response.json()
    entry = Entry.objects.get(pk=body["entry_id"])
    assert body == {"success": True, "charged": "0.250000000", "balance": "9.750000000", "entry_id": entry.pk}
    assert entry.kind == EntryKind.CHARGE
    assert entry.amount == -parse_usd("0.25")
    assert entry.idempotency_key == "charge:k1"
    assert entry.description == "web search"
    assert entry.metadata == {"tool": "search", "api_key_id": alice_key[0].pk}  # which key made it
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


def test_a_key_refused_for_funds_posts_nothing_so_the_same_key_charges_after_a_top_up(bob):
    _, secret = api_key_create(user=bob, name="bob agent")
    bob_v1 = _client(secret)
    refused = _charge(bob_v1, {"amount": "0.40", "description": "search"}, key="retry-me")
    assert refused.status_code == 402
    assert not Entry.objects.filter(wallet=bob.wallet, idempotency_key="charge:retry-me").exists()

    wallet_credit(wallet=bob.wallet, amount=parse_usd("1"), kind=EntryKind.TOP_UP, idempotency_key="top-up")
    charged = _charge(bob_v1, {"amount": "0.40", "description": "search"}, key="retry-me")
    assert charged.status_code == 200
    assert charged.json()["balance"] == "0.600000000"
    # From the first 200 on, the key is used: the same request answers that body, once.
    again = _charge(bob_v1, {"amount": "0.40", "description": "search"}, key="retry-me")
    assert again.status_code == 200
    assert again.json() == charged.json()
    assert _balance(bob) == parse_usd("0.60")
    assert Entry.objects.filter(wallet=bob.wallet, kind=EntryKind.CHARGE).count() == 1


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


# --- bounds: bad input is a 400 in the OpenAI shape, never a 500 ----------------------------------

TOO_LARGE = [
    "1000000.000000001",  # just past the per-operation limit
    "99999999999999999999",  # past the ledger's bigint
    "1e999990",  # finite; converting it to nanodollars alone would take seconds of CPU
    "1e999999999",  # past what Decimal's context holds
    "-1e30",
]


@pytest.mark.parametrize("amount", TOO_LARGE)
def test_a_charge_above_a_million_dollars_is_a_400(alice, alice_v1, amount):
    response = _charge(alice_v1, {"amount": amount, "description": "tool"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_amount", "amount")
    assert "at most 1000000.000000000 USD" in error["message"]
    assert _balance(alice) == parse_usd("10")


@pytest.mark.parametrize("amount", TOO_LARGE)
def test_a_deposit_above_a_million_dollars_is_a_400(bob, billing_v1, amount):
    response = _deposit(billing_v1, {"user": bob.email, "amount": amount, "kind": "grant"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_amount"
    assert _balance(bob) == 0


def test_a_deposit_of_exactly_a_million_dollars_is_accepted(bob, billing_v1):
    response = _deposit(billing_v1, {"user": bob.email, "amount": "1000000", "kind": "grant"})
    assert response.status_code == 201
    assert response.json()["balance"] == "1000000.000000000"


@pytest.mark.parametrize(
    "metadata",
    [
        {"blob": "x" * 100_000},
        {"blob": "x" * 4090},  # 4,101 bytes once encoded with its key
        {"blob": "é" * 2050},  # 2,061 characters but 4,111 bytes of UTF-8
        {"nested": {"a": 1}},
        {"list": [1, 2]},
    ],
    ids=["100KB", "just-over-4KB", "utf8-bytes", "nested-object", "list"],
)
def test_charge_metadata_must_be_a_small_flat_object(alice, alice_v1, metadata):
    response = _charge(alice_v1, {"amount": "0.01", "description": "tool", "metadata": metadata})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", "metadata")
    assert not Entry.objects.filter(kind=EntryKind.CHARGE).exists()


def test_charge_metadata_up_to_4kb_is_stored_as_sent(alice, alice_key, alice_v1):
    metadata = {"blob": "x" * 4057, "n": 1, "ok": True, "none": None}  # 4,096 bytes of compact JSON
    response = _charge(alice_v1, {"amount": "0.01", "description": "tool", "metadata": metadata})
    assert response.status_code == 200
    stored = Entry.objects.get(pk=response.json()["entry_id"]).metadata
    assert stored == {**metadata, "api_key_id": alice_key[0].pk}


@pytest.mark.parametrize("path", ["/v1/user/charge", "/v1/user/balance/deposit"])
def test_nan_in_metadata_is_a_400_not_a_database_error(bob, billing_v1, path):
    # Python's JSON reader accepts NaN; neither database's JSON type does.
    body = '{"user": "bob@example.com", "amount": "1", "kind": "bonus", "description": "x", "metadata": {"x": NaN}}'
    response = billing_v1.post(path, body, content_type="application/json", headers={"Idempotency-Key": "nan"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "metadata"


def test_deposit_metadata_is_bounded_too(bob, billing_v1):
    response = _deposit(billing_v1, {"user": bob.email, "amount": "1", "kind": "bonus", "metadata": {"b": "x" * 5000}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "metadata"
    assert _balance(bob) == 0


@pytest.mark.parametrize("user", ["²", "99999999999999999999", "9" * 5000])
def test_a_user_reference_that_cannot_be_an_id_or_email_is_a_404(billing_v1, user):
    response = _charge(billing_v1, {"amount": "0.5", "description": "x", "user": user})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "user_not_found"
