"""Per-request run limits: X-Tokentill-Run-Max-Steps / -Max-Spend, tightened by the key's and the
operator's limits; tool charges made in a run count against its spend; the counters survive a
lost cache; and a run can be read back (/api/usage?run=, /api/runs/<run>)."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from __future__ import annotations

import uuid
from decimal import Decimal
from urllib.parse import quote

import pytest
from django.core.cache import cache
from django.test import Client

from accounts.services import api_key_create
from proxy import limits
from proxy.models import UsageRecord, UsageStatus
from tests.conftest import bearer_client, make_user
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    MODEL,
    Reply,
    call,
    completion,
    fake_upstream,
    fake_upstream_server,
    key,
    price,
    usage,
)
from wallet.models import Entry, EntryKind

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}], "max_tokens": 100}
RUN = "run-7"


@pytest.fixture(autouse=True)
def fresh_counters():
    cache.clear()
    yield
    cache.clear()


def run_headers(run=RUN, steps=None, spend=None) -> dict:
    headers = {"X-Tokentill-Run": run}
    if steps is not None:
        headers["X-Tokentill-Run-Max-Steps"] = str(steps)
    if spend is not None:
        headers["X-Tokentill-Run-Max-Spend"] = spend
    return headers


def answers(fake_upstream, n: int, cost: str = "0.00005") -> None:
    fake_upstream.script("chat", *[Reply(body=completion(u=usage(10, 5, cost=cost))) for _ in range(n)])


def chat(token, **run) -> int:
    response = call(CHAT, HELLO, token=token, headers=run_headers(**run))
    return response.status if response.status != 429 else response.error["code"]


def charge(secret: str, amount: str, **headers):
    return Client(headers={"Authorization": f"Bearer {secret}"}).post(
        "/v1/user/charge",
        {"amount": amount, "description": "web search"},
        content_type="application/json",
        headers={"Idempotency-Key": uuid.uuid4().hex, **headers},
    )


# --- the headers --------------------------------------------------------------------------------


def test_the_run_headers_are_parsed_strictly():
    ask = limits.run_ask_parse(
        {"x-tokentill-run": "r" * 250, "x-tokentill-run-max-steps": "12", "x-tokentill-run-max-spend": "0.5"}
    )
    assert ask == limits.RunAsk(run="r" * 200, max_steps=12, max_spend=500_000_000)
    assert limits.run_ask_parse({}) == limits.RunAsk()
    assert limits.run_ask_parse({"x-tokentill-run": "r"}) == limits.RunAsk(run="r")


@pytest.mark.parametrize(
    "headers, param",
    [
        ({"x-tokentill-run-max-steps": "0"}, "X-Tokentill-Run-Max-Steps"),
        ({"x-tokentill-run-max-steps": "-1"}, "X-Tokentill-Run-Max-Steps"),
        ({"x-tokentill-run-max-steps": "+3"}, "X-Tokentill-Run-Max-Steps"),
        ({"x-tokentill-run-max-steps": "2.5"}, "X-Tokentill-Run-Max-Steps"),
        ({"x-tokentill-run-max-steps": "٣"}, "X-Tokentill-Run-Max-Steps"),  # a digit, but not ASCII
        ({"x-tokentill-run-max-steps": "1" * 30}, "X-Tokentill-Run-Max-Steps"),
        ({"x-tokentill-run-max-steps": ""}, "X-Tokentill-Run-Max-Steps"),
        ({"x-tokentill-run-max-spend": "0"}, "X-Tokentill-Run-Max-Spend"),
        ({"x-tokentill-run-max-spend": "-0.5"}, "X-Tokentill-Run-Max-Spend"),
        ({"x-tokentill-run-max-spend": "1e3"}, "X-Tokentill-Run-Max-Spend"),
        ({"x-tokentill-run-max-spend": "NaN"}, "X-Tokentill-Run-Max-Spend"),
        ({"x-tokentill-run-max-spend": "0.0000000001"}, "X-Tokentill-Run-Max-Spend"),
        ({"x-tokentill-run-max-spend": "$5"}, "X-Tokentill-Run-Max-Spend"),
        ({"x-tokentill-run-max-spend": "9" * 40}, "X-Tokentill-Run-Max-Spend"),
    ],
)
def test_a_bad_run_header_names_itself(headers, param):
    with pytest.raises(limits.InvalidRunHeader) as refused:
        limits.run_ask_parse({"x-tokentill-run": RUN, **headers})
    assert refused.value.header == param


@pytest.mark.parametrize("name", ["X-Tokentill-Run-Max-Steps", "X-Tokentill-Run-Max-Spend"])
def test_a_run_limit_needs_a_run(name):
    with pytest.raises(limits.InvalidRunHeader, match="X-Tokentill-Run") as refused:
        limits.run_ask_parse({name.lower(): "3"})
    assert refused.value.header == name


@pytest.mark.parametrize("path", [CHAT, "/v1/embeddings"])
def test_a_bad_run_header_is_a_400_naming_it_and_nothing_reaches_the_upstream(fake_upstream, key, path):
    body = HELLO if path == CHAT else {"model": MODEL, "input": "hello"}
    response = call(path, body, token=key, headers=run_headers(steps="many"))
    assert response.status == 400
    assert (response.error["code"], response.error["param"]) == ("invalid_request", "X-Tokentill-Run-Max-Steps")
    assert not fake_upstream.requests
    assert UsageRecord.objects.get().status == UsageStatus.REFUSED


def test_a_bad_run_header_on_a_tool_charge_is_a_400_naming_it(alice, key):
    response = charge(key, "0.01", **{"X-Tokentill-Run-Max-Spend": "lots", "X-Tokentill-Run": RUN})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "X-Tokentill-Run-Max-Spend"
    assert not Entry.objects.filter(kind=EntryKind.CHARGE).exists()


# --- steps --------------------------------------------------------------------------------------


def test_a_request_sets_its_own_step_limit_and_a_refused_step_is_not_counted(fake_upstream, alice, key):
    answers(fake_upstream, 3)
    assert [chat(key, steps=2) for _ in range(3)] == [200, 200, "run_step_limit"]
    assert len(fake_upstream.calls("chat")) == 2
    refused = UsageRecord.objects.get(status=UsageStatus.REFUSED)
    assert (refused.run, refused.http_status) == (RUN, 429)
    # The refused call was no step: the same run allowed three gets exactly one more.
    assert [chat(key, steps=3), chat(key, steps=3)] == [200, "run_step_limit"]


def test_a_request_can_only_tighten_the_keys_and_the_operators_step_limits(fake_upstream, alice, price, settings):
    answers(fake_upstream, 4)
    strict_key = api_key_create(user=alice, name="agent", limits={"run_max_steps": 1})[1]
    assert [chat(strict_key, run="a", steps=5), chat(strict_key, run="a", steps=5)] == [200, "run_step_limit"]

    settings.RUN_MAX_STEPS = 2
    loose_key = api_key_create(user=alice, name="other")[1]
    assert [chat(loose_key, run="b", steps=10) for _ in range(3)] == [200, 200, "run_step_limit"]
    assert [chat(loose_key, run="c", steps=1) for _ in range(2)] == [200, "run_step_limit"]


def test_the_keys_run_spend_limit_holds_whatever_the_request_asks(fake_upstream, alice, price):
    answers(fake_upstream, 2)
    token = api_key_create(user=alice, name="agent", limits={"run_max_spend": "0.0001"})[1]
    assert [chat(token, spend="5") for _ in range(2)] == [200, "run_spend_limit"]
    assert [chat(token, run="no-limit-of-its-own")] == [200]  # the key's limit needs no header


def test_a_step_refused_for_funds_is_given_back(fake_upstream, price):
    bob = make_user("bob@example.com")
    token = api_key_create(user=bob, name="k")[1]
    assert call(CHAT, HELLO, token=token, headers=run_headers(steps=1)).status == 402
    assert cache.get(limits._run_key(bob.pk, RUN, "steps")) == 0


# --- spend --------------------------------------------------------------------------------------


def test_a_request_sets_its_own_spend_limit(fake_upstream, alice, key):
    # Each call holds ~$0.0000756 (100 output tokens) and is charged $0.00006 (0.00005 × 1.2).
    answers(fake_upstream, 2)
    assert [chat(key, spend="0.0001") for _ in range(2)] == [200, "run_spend_limit"]
    response = call(CHAT, HELLO, token=key, headers=run_headers(spend="0.0001"))
    assert response.error["message"] == "This agent run reached its spend limit of $0.000100000."
    assert int(response.headers["retry-after"]) > 0


def test_tool_charges_in_a_run_count_against_its_spend_and_are_labelled(fake_upstream, alice, key):
    limit = {"X-Tokentill-Run": RUN, "X-Tokentill-Run-Max-Spend": "0.05"}
    assert charge(key, "0.04", **limit).status_code == 200
    over = charge(key, "0.02", **limit)
    assert over.status_code == 429 and over.json()["error"]["code"] == "run_spend_limit"
    assert over["Retry-After"]
    (entry,) = Entry.objects.filter(kind=EntryKind.CHARGE)
    assert entry.metadata[limits.CHARGE_RUN_FIELD] == RUN
    # A model call of the run sees the tool spend too.
    assert chat(key, spend="0.04") == "run_spend_limit"
    assert not fake_upstream.requests
    # Another run is not touched.
    assert charge(key, "0.02", **{**limit, "X-Tokentill-Run": "other"}).status_code == 200


def test_a_tool_charge_is_no_step(fake_upstream, alice, key):
    answers(fake_upstream, 1)
    assert charge(key, "0.01", **{"X-Tokentill-Run": RUN}).status_code == 200
    assert chat(key, steps=1) == 200


def test_a_caller_cannot_label_a_charge_with_a_run_through_its_metadata(alice, key):
    response = Client(headers={"Authorization": f"Bearer {key}"}).post(
        "/v1/user/charge",
        {"amount": "0.01", "description": "x", "metadata": {limits.CHARGE_RUN_FIELD: "someone-elses"}},
        content_type="application/json",
        headers={"Idempotency-Key": "k1"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "metadata"


def test_a_replayed_tool_charge_counts_once(alice, key):
    limit = {"X-Tokentill-Run": RUN, "X-Tokentill-Run-Max-Spend": "0.05", "Idempotency-Key": "same"}
    client = Client(headers={"Authorization": f"Bearer {key}"})
    body = {"amount": "0.03", "description": "tool"}
    for _ in range(3):
        response = client.post("/v1/user/charge", body, content_type="application/json", headers=limit)
        assert response.status_code == 200
    assert charge(key, "0.02", **{k: v for k, v in limit.items() if k != "Idempotency-Key"}).status_code == 200


def test_a_billing_key_charging_a_user_in_a_run_counts_against_that_users_run(fake_upstream, alice, key, price):
    operator = make_user("operator@example.com")
    billing = api_key_create(user=operator, name="billing", scopes=["billing"])[1]
    response = Client(headers={"Authorization": f"Bearer {billing}"}).post(
        "/v1/user/charge",
        {"amount": "0.04", "description": "tool", "user": "alice@example.com"},
        content_type="application/json",
        headers={"Idempotency-Key": "op-1", "X-Tokentill-Run": RUN},
    )
    assert response.status_code == 200
    assert chat(key, spend="0.04") == "run_spend_limit"  # alice's own call in her run sees it
    assert alice_client_run(alice)["tool_charges"] == 1


def alice_client_run(user, run=RUN) -> dict:
    return bearer_client(user).get(f"/api/runs/{quote(run, safe='')}").json()


# --- a lost cache -------------------------------------------------------------------------------


def test_run_counters_are_rebuilt_from_the_records_when_the_cache_loses_them(fake_upstream, alice, key):
    answers(fake_upstream, 2)
    assert chat(key, steps=2) == 200
    cache.clear()  # a restart of an in-memory cache, or an eviction
    assert chat(key, steps=2) == 200
    cache.clear()
    assert chat(key, steps=2) == "run_step_limit"

    assert charge(key, "0.04", **{"X-Tokentill-Run": "spendy"}).status_code == 200
    cache.clear()
    assert chat(key, run="spendy", spend="0.04") == "run_spend_limit"


# --- reading a run back -------------------------------------------------------------------------


def test_a_run_is_read_back_with_its_steps_spend_and_tool_charges(fake_upstream, alice, key, mallory):
    run = "agent/7 ask?#1"  # any client string: the id is URL-encoded in the path
    answers(fake_upstream, 3, cost="0.0005")
    assert [chat(key, run=run, steps=2) for _ in range(3)] == [200, 200, "run_step_limit"]
    assert charge(key, "0.25", **{"X-Tokentill-Run": run}).status_code == 200
    assert charge(key, "0.01", **{"X-Tokentill-Run": "elsewhere"}).status_code == 200
    assert chat(key, run="elsewhere") == 200

    client = bearer_client(alice)
    listed = client.get("/api/usage", {"run": run}).json()["results"]
    assert len(listed) == 3 and {record["run"] for record in listed} == {run}
    summary = client.get(f"/api/runs/{quote(run, safe='')}")
    assert summary.status_code == 200
    body = summary.json()
    assert {k: body[k] for k in ("run", "steps", "requests", "tool_charges", "spend")} == {
        "run": run,
        "steps": 2,
        "requests": 3,  # the refused third call included
        "tool_charges": 1,
        "spend": "0.251200000",  # two calls × 0.0005 × 1.2, and the tool charge
    }
    assert body["first_at"] <= body["last_at"]

    assert bearer_client(mallory).get(f"/api/runs/{quote(run, safe='')}").status_code == 404
    assert client.get("/api/runs/never-ran").status_code == 404


def test_a_runs_spend_adds_model_charges_and_tool_charges(fake_upstream, alice, key):
    answers(fake_upstream, 1, cost="0.0005")
    assert chat(key) == 200
    assert charge(key, "0.25", **{"X-Tokentill-Run": RUN}).status_code == 200
    body = alice_client_run(alice)
    assert (body["steps"], body["requests"], body["tool_charges"]) == (1, 1, 1)
    assert Decimal(body["spend"]) == Decimal("0.25") + Decimal("0.0006")
