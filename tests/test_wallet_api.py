"""/api/wallet and /api/wallet/entries through the DRF test client."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import override_settings
from django.utils import timezone

from core.money import parse_usd
from tests.conftest import bearer_client
from wallet.models import EntryKind
from wallet.services import hold_create, hold_settle, wallet_credit

pytestmark = pytest.mark.django_db


def _credit(user, amount: str, key: str, kind=EntryKind.BONUS, description=""):
    return wallet_credit(
        wallet=user.wallet, amount=parse_usd(amount), kind=kind, idempotency_key=key, description=description
    ).entry


def _rows(response) -> list[dict]:
    body = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(body)))


def test_it_shows_the_wallet_with_amounts_as_nine_place_strings(alice, alice_client):
    hold_create(wallet=alice.wallet, amount=parse_usd("0.25"), request_id="req-api-1")
    response = alice_client.get("/api/wallet")
    assert response.status_code == 200
    assert response.json() == {
        "balance": "10.000000000",
        "held": "0.250000000",
        "available": "9.750000000",
        "currency": "USD",
        "status": "ok",
        "low_balance_threshold": "1.000000000",
    }
    assert response["X-Request-Id"]


@override_settings(LOW_BALANCE_THRESHOLD=Decimal("5"), MIN_BALANCE=Decimal("0.05"))
def test_it_reports_low_and_blocked_status(db):
    from tests.conftest import make_user

    low = make_user("low@example.com", balance="2.00")
    blocked = make_user("blocked@example.com", balance="0.04")
    assert bearer_client(low).get("/api/wallet").json()["status"] == "low"
    assert bearer_client(blocked).get("/api/wallet").json()["status"] == "blocked"


def test_a_wallet_at_zero_is_blocked(bob_client):
    assert bob_client.get("/api/wallet").json()["status"] == "blocked"


def test_it_requires_a_credential(client):
    response = client.get("/api/wallet")
    assert response.status_code == 401
    assert response.json()["detail"]
    assert client.get("/api/wallet/entries?format=csv").status_code == 401


def test_it_lists_entries_newest_first_with_every_field(alice, alice_client):
    _credit(alice, "1.5", "api:1", description="first")
    hold = hold_create(wallet=alice.wallet, amount=parse_usd("0.1"), request_id="req-api-2")
    hold_settle(hold=hold, amount=parse_usd("0.123456789"), metadata={"model": "m"})
    response = alice_client.get("/api/wallet/entries")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"results", "next"}
    assert body["next"] is None
    newest, middle, opening = body["results"]
    assert newest["kind"] == "usage"
    assert newest["amount"] == "-0.123456789"
    assert newest["balance_after"] == "11.376543211"
    assert newest["reference"] == "req-api-2"
    assert newest["metadata"] == {"model": "m"}
    assert set(newest) == {
        "id",
        "kind",
        "amount",
        "balance_after",
        "description",
        "reference",
        "created_at",
        "metadata",
    }
    assert middle["description"] == "first"
    assert opening["kind"] == "top_up"


def test_it_pages_with_a_cursor_until_next_is_null(alice, alice_client):
    for i in range(60):
        _credit(alice, "0.01", f"api:page:{i}")
    first = alice_client.get("/api/wallet/entries").json()
    assert len(first["results"]) == 50
    assert first["next"].startswith("http://testserver/api/wallet/entries?cursor=")
    second = alice_client.get(first["next"]).json()
    assert len(second["results"]) == 11  # 60 credits + the opening top-up
    assert second["next"] is None
    ids = [row["id"] for row in first["results"] + second["results"]]
    assert ids == sorted(ids, reverse=True)
    assert len(set(ids)) == 61


def test_the_cursor_keeps_the_filters(alice, alice_client):
    for i in range(55):
        _credit(alice, "0.01", f"api:grant:{i}", kind=EntryKind.GRANT)
    first = alice_client.get("/api/wallet/entries?kind=grant").json()
    assert "kind=grant" in first["next"]
    second = alice_client.get(first["next"]).json()
    assert {row["kind"] for row in first["results"] + second["results"]} == {"grant"}
    assert len(first["results"]) + len(second["results"]) == 55


def test_it_filters_by_kind_and_time(alice, alice_client):
    _credit(alice, "1", "api:bonus", kind=EntryKind.BONUS)
    old = timezone.now() - timedelta(days=3)
    kinds = [row["kind"] for row in alice_client.get("/api/wallet/entries?kind=bonus").json()["results"]]
    assert kinds == ["bonus"]
    assert alice_client.get("/api/wallet/entries?kind=&since=").status_code == 200

    since = (timezone.now() + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    assert alice_client.get("/api/wallet/entries", {"since": since}).json()["results"] == []
    until = old.date().isoformat()
    assert alice_client.get("/api/wallet/entries", {"until": until}).json()["results"] == []
    today = timezone.now().date().isoformat()
    # A bare-date ``until`` includes that whole day.
    assert len(alice_client.get("/api/wallet/entries", {"since": today, "until": today}).json()["results"]) == 2


@pytest.mark.parametrize(
    "query", ["kind=gift", "since=yesterday", "until=2026-13-45", "since=2026-02-01&until=2026-01-01"]
)
def test_it_refuses_bad_filters_with_a_drf_error(alice_client, query):
    response = alice_client.get(f"/api/wallet/entries?{query}")
    assert response.status_code == 400
    assert response.json()["detail"]


def test_bad_filters_are_json_errors_even_when_csv_was_asked_for(alice_client):
    response = alice_client.get("/api/wallet/entries?kind=gift&format=csv")
    assert response.status_code == 400
    assert response["Content-Type"].startswith("application/json")
    assert "kind" in response.json()["detail"]


def test_it_streams_the_whole_filtered_history_as_csv_by_accept_header(alice, alice_client):
    for i in range(60):
        _credit(alice, "0.000000001", f"api:csv:{i}", description="=HYPERLINK(evil)" if i == 0 else "")
    response = alice_client.get("/api/wallet/entries", HTTP_ACCEPT="text/csv")
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"].startswith("text/csv")
    assert response["X-Request-Id"]
    rows = _rows(response)
    assert len(rows) == 61  # not one page: everything
    assert list(rows[0]) == [
        "id",
        "created_at",
        "kind",
        "amount",
        "balance_after",
        "description",
        "reference",
        "metadata",
    ]
    assert rows[0]["amount"] == "0.000000001"
    assert rows[-1]["amount"] == "10.000000000"
    assert rows[0]["balance_after"] == "10.000000060"
    # A spreadsheet must not execute a description a client chose.
    assert rows[-2]["description"] == "'=HYPERLINK(evil)"


def test_it_streams_csv_for_the_format_query_parameter_with_filters(alice, alice_client):
    _credit(alice, "2", "api:csv:grant", kind=EntryKind.GRANT)
    response = alice_client.get("/api/wallet/entries?format=csv&kind=grant")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    rows = _rows(response)
    assert [(row["kind"], row["amount"]) for row in rows] == [("grant", "2.000000000")]


@pytest.mark.django_db(transaction=True)
async def test_csv_streams_under_asgi_too(alice, async_client):
    from asgiref.sync import sync_to_async

    from accounts.services import token_pair_issue

    pair = await sync_to_async(token_pair_issue)(user=alice)
    response = await async_client.get(
        "/api/wallet/entries", headers={"Accept": "text/csv", "Authorization": f"Bearer {pair.access}"}
    )
    assert response.status_code == 200
    assert response.is_async  # a sync iterator would be read whole into memory under ASGI
    body = b"".join([chunk async for chunk in response.streaming_content]).decode()
    assert body.splitlines()[1].split(",")[3] == "10.000000000"


def test_it_returns_one_entry(alice, alice_client):
    entry = _credit(alice, "3", "api:one", kind=EntryKind.TRIAL)
    response = alice_client.get(f"/api/wallet/entries/{entry.pk}")
    assert response.status_code == 200
    assert response.json()["amount"] == "3.000000000"
    assert response.json()["kind"] == "trial"


def test_mallory_gets_404_for_alices_entries(alice, mallory_client):
    entry = alice.wallet.entries.first()
    response = mallory_client.get(f"/api/wallet/entries/{entry.pk}")
    assert response.status_code == 404
    assert response.json() == {"detail": "no such entry"}
    assert response["X-Request-Id"]
    listed = mallory_client.get("/api/wallet/entries").json()["results"]
    assert entry.pk not in [row["id"] for row in listed]
    rows = _rows(mallory_client.get("/api/wallet/entries?format=csv"))
    assert [row["amount"] for row in rows] == ["1.000000000"]
