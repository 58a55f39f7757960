"""/api/usage, /api/usage/{id}, /api/usage/summary: a user's own usage, filtered, paged and totalled.

Usage records are created directly here: they are the data these endpoints read, not the code
under test (the proxy that writes them has its own tests).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from rest_framework.test import APIClient

from accounts.services import api_key_create
from proxy.models import UsageRecord, UsageStatus

_ids = itertools.count(1)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def usage(user, *, created_at="2025-05-01T12:00:00", **fields) -> UsageRecord:
    values = {
        "request_id": f"req_test_{next(_ids)}",
        "model": "openai/gpt-4o-mini",
        "status": UsageStatus.OK,
        "created_at": at(created_at),
        **fields,
    }
    return UsageRecord.objects.create(user=user, **values)


def page_ids(response) -> list[int]:
    assert response.status_code == 200, response.content
    return [row["id"] for row in response.json()["results"]]


def test_a_record_has_exactly_the_documented_fields_with_9_place_amounts(alice, alice_client):
    record = usage(
        alice,
        alias="tier/fast",
        served_model="openai/gpt-4o-mini",
        fallback=True,
        upstream_model="openai/gpt-4o-mini-2024-07-18",
        upstream="openrouter-eu",
        stream=True,
        prompt_tokens=1200,
        completion_tokens=300,
        reasoning_tokens=40,
        cached_tokens=1000,
        upstream_cost=Decimal("0.000123456789012"),
        charge=148_148,
        estimated=True,
        latency_ms=812,
        run="run-7",
        agent="planner",
        tool="search",
    )

    response = alice_client.get(f"/api/usage/{record.pk}")

    assert response.status_code == 200
    assert response.json() == {
        "id": record.pk,
        "request_id": record.request_id,
        "model": "openai/gpt-4o-mini",
        "alias": "tier/fast",
        "served_model": "openai/gpt-4o-mini",
        "fallback": True,
        "upstream_model": "openai/gpt-4o-mini-2024-07-18",
        "upstream": "openrouter-eu",
        "stream": True,
        "status": "ok",
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "reasoning_tokens": 40,
        "cached_tokens": 1000,
        "upstream_cost": "0.000123457",
        "charge": "0.000148148",
        "estimated": True,
        "latency_ms": 812,
        "created_at": "2025-05-01T12:00:00Z",
        "run": "run-7",
        "agent": "planner",
        "tool": "search",
    }


def test_an_unknown_upstream_cost_is_null(alice, alice_client):
    record = usage(alice, status=UsageStatus.REFUSED)

    body = alice_client.get("/api/usage").json()

    assert body["results"][0]["id"] == record.pk
    assert body["results"][0]["upstream_cost"] is None
    assert body["results"][0]["upstream"] is None  # it never reached one
    assert body["results"][0]["charge"] == "0.000000000"
    assert body["next"] is None


def test_a_user_sees_only_their_own_usage(alice, mallory, alice_client, mallory_client):
    mine = usage(alice)
    theirs = usage(mallory)

    assert page_ids(alice_client.get("/api/usage")) == [mine.pk]
    assert alice_client.get(f"/api/usage/{theirs.pk}").status_code == 404
    response = mallory_client.get(f"/api/usage/{mine.pk}")
    assert response.status_code == 404
    assert response.json()["detail"].startswith("no such usage record;")
    assert mallory_client.get("/api/usage/999999").status_code == 404
    summary = mallory_client.get("/api/usage/summary?group_by=model").json()
    assert [row["model"] for row in summary["results"]] == ["openai/gpt-4o-mini"]
    assert summary["totals"]["requests"] == 1


def test_it_needs_a_credential(db):
    response = APIClient().get("/api/usage")
    assert response.status_code == 401
    assert "detail" in response.json()


def test_pages_run_newest_first_without_gaps_or_repeats_even_when_times_tie(alice, alice_client):
    times = ["2025-05-01T10:00:00", "2025-05-01T11:00:00", "2025-05-01T11:00:00", "2025-05-01T11:00:00"]
    times += ["2025-05-02T09:00:00"]
    records = [usage(alice, created_at=moment) for moment in times]
    expected = [records[4].pk, records[3].pk, records[2].pk, records[1].pk, records[0].pk]

    seen, url = [], "/api/usage?limit=2"
    for _ in range(10):  # bounded: 5 records in pages of 2 take 3 pages
        response = alice_client.get(url)
        seen += page_ids(response)
        url = response.json()["next"]
        if url is None:
            break

    assert seen == expected


def test_it_filters_by_model_and_by_the_users_own_api_key(alice, mallory, alice_client):
    key, _ = api_key_create(user=alice, name="ci")
    other_key, _ = api_key_create(user=mallory, name="mallory's")
    by_key = usage(alice, api_key=key, model="acme/big")
    by_token = usage(alice, model="openai/gpt-4o-mini")
    usage(mallory, api_key=other_key)

    assert page_ids(alice_client.get("/api/usage?model=acme/big")) == [by_key.pk]
    assert page_ids(alice_client.get(f"/api/usage?key={key.pk}")) == [by_key.pk]
    assert page_ids(alice_client.get(f"/api/usage?key={other_key.pk}")) == []
    assert page_ids(alice_client.get("/api/usage?model=")) == [by_token.pk, by_key.pk]


def test_since_is_inclusive_and_a_bare_until_date_includes_that_whole_day(alice, alice_client):
    before = usage(alice, created_at="2025-04-30T23:59:59")
    first = usage(alice, created_at="2025-05-01T00:00:00")
    last = usage(alice, created_at="2025-05-02T23:59:59")
    after = usage(alice, created_at="2025-05-03T00:00:00")

    assert page_ids(alice_client.get("/api/usage?since=2025-05-01&until=2025-05-02")) == [last.pk, first.pk]
    # A date-time until is exclusive; a naive one is UTC.
    assert page_ids(alice_client.get("/api/usage?since=2025-04-30T23:59:59&until=2025-05-03T00:00:00")) == [
        last.pk,
        first.pk,
        before.pk,
    ]
    assert page_ids(alice_client.get("/api/usage", {"since": "2025-05-03T02:00:00+02:00"})) == [after.pk]


@pytest.mark.parametrize(
    "query",
    ["since=yesterday", "until=2025-13-01", "since=2025-05-02&until=2025-05-01", "key=abc", "cursor=garbage"],
)
def test_bad_filters_are_a_400_with_a_detail(alice_client, query):
    response = alice_client.get(f"/api/usage?{query}")

    assert response.status_code == 400
    assert isinstance(response.json()["detail"], str)


@pytest.mark.parametrize("path", ["/api/usage", "/api/usage/summary"])
@pytest.mark.parametrize(
    "key",
    [
        "-1",
        "%C2%B2",  # "²": a digit to str.isdigit(), not to int()
        "9223372036854775808",  # one past the largest bigint id
        "99999999999999999999",
        "9" * 5000,  # longer than int() will parse
    ],
)
def test_a_key_filter_that_cannot_be_an_id_is_a_400_not_a_500(alice_client, path, key):
    response = alice_client.get(f"{path}?key={key}")

    assert response.status_code == 400
    assert "not an API key id" in response.json()["detail"]


def test_the_largest_possible_key_id_is_a_valid_filter_that_matches_nothing(alice, alice_client):
    usage(alice)
    response = alice_client.get("/api/usage?key=9223372036854775807")
    assert response.status_code == 200
    assert response.json()["results"] == []


def test_every_response_carries_the_request_id(alice, alice_client):
    record = usage(alice)
    for url in ("/api/usage", f"/api/usage/{record.pk}", "/api/usage/summary", "/api/usage/0", "/api/usage?since=x"):
        response = alice_client.get(url, HTTP_X_REQUEST_ID="trace-42")
        assert response["X-Request-Id"] == "trace-42", url


def test_summary_by_day_sums_exactly_per_utc_day(alice, mallory, alice_client):
    usage(
        alice,
        created_at="2025-05-01T00:00:01",
        prompt_tokens=100,
        completion_tokens=10,
        reasoning_tokens=1,
        cached_tokens=50,
        upstream_cost=Decimal("0.000100000000001"),
        charge=120_000,
    )
    usage(
        alice,
        created_at="2025-05-01T23:59:59",
        model="acme/big",
        prompt_tokens=200,
        completion_tokens=20,
        upstream_cost=Decimal("0.000000000400000"),
        charge=1,
    )
    usage(alice, created_at="2025-05-03T08:00:00", status=UsageStatus.REFUSED, prompt_tokens=7)
    usage(mallory, created_at="2025-05-01T12:00:00", charge=999_999_999)

    response = alice_client.get("/api/usage/summary?group_by=day")

    assert response.status_code == 200
    body = response.json()
    assert body["group_by"] == "day"
    assert body["results"] == [
        {
            "day": "2025-05-01",
            "requests": 2,
            "prompt_tokens": 300,
            "completion_tokens": 30,
            "reasoning_tokens": 1,
            "cached_tokens": 50,
            "upstream_cost": "0.000100000",
            "charge": "0.000120001",
        },
        {
            "day": "2025-05-03",
            "requests": 1,
            "prompt_tokens": 7,
            "completion_tokens": 0,
            "reasoning_tokens": 0,
            "cached_tokens": 0,
            "upstream_cost": "0.000000000",
            "charge": "0.000000000",
        },
    ]
    assert body["totals"] == {
        "requests": 3,
        "prompt_tokens": 307,
        "completion_tokens": 30,
        "reasoning_tokens": 1,
        "cached_tokens": 50,
        "upstream_cost": "0.000100000",
        "charge": "0.000120001",
    }


def test_summary_by_model_orders_by_spend_and_honours_the_date_range(alice, alice_client):
    usage(alice, model="acme/cheap", charge=5, prompt_tokens=1)
    usage(alice, model="acme/dear", charge=2_500_000_000, prompt_tokens=2)
    usage(alice, model="acme/dear", charge=2_500_000_001, prompt_tokens=3)
    usage(alice, model="acme/dear", created_at="2025-06-01T00:00:00", charge=10**12)

    body = alice_client.get("/api/usage/summary?group_by=model&since=2025-05-01&until=2025-05-31").json()

    assert [(row["model"], row["requests"], row["prompt_tokens"], row["charge"]) for row in body["results"]] == [
        ("acme/dear", 2, 5, "5.000000001"),
        ("acme/cheap", 1, 1, "0.000000005"),
    ]
    assert body["totals"]["charge"] == "5.000000006"
    assert body["totals"]["requests"] == 3


def test_summary_of_nothing_is_empty_with_zero_totals(alice_client):
    body = alice_client.get("/api/usage/summary").json()

    assert body == {
        "group_by": "day",
        "results": [],
        "totals": {
            "requests": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "reasoning_tokens": 0,
            "cached_tokens": 0,
            "upstream_cost": "0.000000000",
            "charge": "0.000000000",
        },
    }


def test_summary_refuses_an_unknown_grouping(alice_client):
    response = alice_client.get("/api/usage/summary?group_by=week")

    assert response.status_code == 400
    assert "group_by" in response.json()["detail"]
