"""GET /v1/models: the models on sale, each at the price a client pays (markup included)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from proxy.models import ModelPrice
from proxy.prices import prices_current_enabled
from tests.conftest import bearer_client


@pytest.fixture(autouse=True)
def _pricing_settings(settings):
    settings.MARKUP = Decimal("0.20")
    settings.UPSTREAM_API_KEY = "sk-or-test"
    settings.PROXY_PRICE_CACHE_SECONDS = 0


def price(model, *, ago=timedelta(days=1), **fields):
    return ModelPrice.objects.create(model=model, effective_from=timezone.now() - ago, **fields)


def listed(client):
    response = client.get("/v1/models")
    assert response.status_code == 200, response.content
    return {item["id"]: item for item in response.json()["data"]}


def test_it_lists_enabled_models_in_the_openai_shape_with_marked_up_per_token_prices(alice_client):
    price("openai/gpt-4o-mini", prompt=Decimal("0.15"), completion=Decimal("0.60"))

    response = alice_client.get("/v1/models")

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    [item] = body["data"]
    assert item["id"] == "openai/gpt-4o-mini"
    assert item["object"] == "model"
    assert item["owned_by"] == "openai"
    assert isinstance(item["created"], int)
    # $0.15 / 1M × 1.20 = $0.00000018 per token, exactly.
    assert item["pricing"] == {"prompt": "0.00000018", "completion": "0.00000072", "request": "0"}


def test_a_per_model_markup_and_request_fee_are_included(alice_client):
    price(
        "acme/big",
        prompt=Decimal("3"),
        completion=Decimal("15"),
        request_fee=1_000_000,  # $0.001
        markup=Decimal("0.5000"),
    )

    assert listed(alice_client)["acme/big"]["pricing"] == {
        "prompt": "0.0000045",
        "completion": "0.0000225",
        "request": "0.0015",
    }


def test_the_version_in_force_is_listed_not_an_older_or_a_scheduled_one(alice_client):
    first = price("openai/gpt-4o", ago=timedelta(days=30), prompt=Decimal("5"), completion=Decimal("15"))
    price("openai/gpt-4o", ago=timedelta(days=2), prompt=Decimal("2.5"), completion=Decimal("10"))
    price("openai/gpt-4o", ago=-timedelta(days=3), prompt=Decimal("1"), completion=Decimal("1"))

    item = listed(alice_client)["openai/gpt-4o"]

    assert item["pricing"]["prompt"] == "0.000003"  # 2.5 × 1.2 / 1M
    assert item["pricing"]["completion"] == "0.000012"
    # "created" is when the model first appeared in the table, not when it was last re-priced.
    assert item["created"] == int(first.effective_from.timestamp())


def test_a_model_whose_current_version_is_disabled_is_not_listed(alice_client):
    price("acme/old", ago=timedelta(days=9), prompt=Decimal("1"))
    price("acme/old", ago=timedelta(days=1), prompt=Decimal("1"), enabled=False)
    price("acme/never", enabled=False)
    price("acme/on", prompt=Decimal("1"))

    assert set(listed(alice_client)) == {"acme/on"}


def test_the_demo_model_is_listed_only_while_no_upstream_key_is_set(alice_client, settings):
    price("tokentill/demo", is_demo=True)
    price("acme/real", prompt=Decimal("1"))

    assert set(listed(alice_client)) == {"acme/real"}

    settings.UPSTREAM_API_KEY = ""
    models = listed(alice_client)
    assert set(models) == {"acme/real", "tokentill/demo"}
    assert models["tokentill/demo"]["owned_by"] == "tokentill"
    assert models["tokentill/demo"]["pricing"] == {"prompt": "0", "completion": "0", "request": "0"}


def test_it_answers_401_in_the_openai_shape_without_a_valid_bearer(client, db):
    response = client.get("/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"

    response = client.get("/v1/models", HTTP_AUTHORIZATION="Bearer tt_not_a_real_key_at_all")
    assert response.status_code == 401
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
    assert response["X-Request-Id"]


def test_an_api_key_may_list_models(alice_key):
    from rest_framework.test import APIClient

    price("acme/on", prompt=Decimal("1"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {alice_key[1]}")

    response = client.get("/v1/models", HTTP_X_REQUEST_ID="trace-123")

    assert response.status_code == 200
    assert response["X-Request-Id"] == "trace-123"
    assert [item["id"] for item in response.json()["data"]] == ["acme/on"]


def test_listing_costs_the_same_queries_for_three_models_or_thirty(alice, django_assert_num_queries, settings):
    settings.PROXY_PRICE_CACHE_SECONDS = 3600
    client = bearer_client(alice)
    for n in range(3):
        price(f"acme/m{n}", ago=timedelta(days=5), prompt=Decimal("1"))
        price(f"acme/m{n}", prompt=Decimal("2"))
    # The bearer check, the price list, and once per cache period the aliases, fallbacks and
    # agent routes (proxy.selectors.tiers_current).
    with django_assert_num_queries(5):
        assert len(listed(client)) == 3
    with django_assert_num_queries(2):
        assert len(listed(client)) == 3

    for n in range(3, 30):
        price(f"acme/m{n}", ago=timedelta(days=5), prompt=Decimal("1"))
        price(f"acme/m{n}", prompt=Decimal("2"))
    with django_assert_num_queries(2):
        assert len(listed(client)) == 30


def test_current_enabled_prices_pick_exactly_one_version_per_model(db):
    now = timezone.now()
    price("a/x", ago=timedelta(hours=3), prompt=Decimal("1"))
    latest = price("a/x", ago=timedelta(hours=1), prompt=Decimal("2"))
    price("a/x", ago=-timedelta(hours=1), prompt=Decimal("3"))
    only = price("b/y", ago=timedelta(minutes=1))

    rows = list(prices_current_enabled(now=now))

    assert [(row.model, row.pk) for row in rows] == [("a/x", latest.pk), ("b/y", only.pk)]


def test_a_key_limited_to_some_models_lists_only_those(alice):
    from rest_framework.test import APIClient

    from accounts.services import api_key_create

    for model in ("acme/one", "acme/two", "acme/three"):
        price(model, prompt=Decimal("1"))
    _, secret = api_key_create(user=alice, name="narrow", limits={"allowed_models": ["acme/two", "acme/gone"]})
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert list(listed(client)) == ["acme/two"]
    assert set(listed(bearer_client(alice))) == {"acme/one", "acme/two", "acme/three"}  # the user's own token
