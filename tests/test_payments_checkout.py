"""GET /api/packs, POST /api/checkout against loopback fakes of both providers, seeding, admin."""

import importlib
import json

import pytest
from django.apps import apps as django_apps
from django.core.management import call_command
from django.test import Client
from rest_framework.test import APIClient

from payments.models import Checkout, CreditPack, StaffAlert, WebhookEvent
from payments.seed import seed_packs
from tests import payments_fixtures as fx
from tests.payments_fixtures import NANOS

pytestmark = pytest.mark.django_db
packs, payment_settings, fake_ls, fake_stripe = fx.packs, fx.payment_settings, fx.fake_ls, fx.fake_stripe
fast_password_hashing = fx.fast_password_hashing


def test_the_pack_list_is_public_and_shows_price_credit_and_bonus(packs):
    response = APIClient().get("/api/packs")

    assert response.status_code == 200
    by_id = {pack["id"]: pack for pack in response.json()}
    assert by_id["pro"] == {
        "id": "pro",
        "name": "Pro",
        "price": "25.000000000",
        "currency": "USD",
        "credit": "26.000000000",
        "bonus": "1.000000000",
        "recurring": False,
        "lemonsqueezy_variant_id": "412244",
        "stripe_price_id": "price_pro",
    }
    assert by_id["starter"]["bonus"] == "0.000000000"


def test_inactive_packs_are_not_listed(packs):
    CreditPack.objects.filter(slug="pro").update(active=False)

    assert "pro" not in [pack["id"] for pack in APIClient().get("/api/packs").json()]


def test_checkout_through_lemon_squeezy_sends_our_ids_and_returns_the_url(alice, alice_client, packs, fake_ls):
    response = alice_client.post("/api/checkout", {"pack": "pro"}, format="json")

    assert response.status_code == 201
    body = response.json()
    checkout = Checkout.objects.get(public_id=body["checkout_id"])
    assert body["url"].startswith("https://tokentill.lemonsqueezy.com/checkout/custom/")
    assert (checkout.user, checkout.pack.slug, checkout.provider, checkout.url) == (
        alice,
        "pro",
        "lemonsqueezy",
        body["url"],
    )
    request = fake_ls.requests[-1]
    assert request["headers"]["Accept"] == "application/vnd.api+json"
    assert request["headers"]["Content-Type"] == "application/vnd.api+json"
    sent = json.loads(request["body"])["data"]
    assert sent["type"] == "checkouts"
    assert sent["relationships"]["store"]["data"] == {"type": "stores", "id": "70011"}
    assert sent["relationships"]["variant"]["data"] == {"type": "variants", "id": "412244"}
    assert sent["attributes"]["checkout_data"]["custom"] == {
        "user_id": str(alice.pk),
        "checkout_id": checkout.public_id,
    }
    assert sent["attributes"]["product_options"]["redirect_url"] == (
        f"http://127.0.0.1:8000/topup/done?checkout={checkout.public_id}"
    )
    assert sent["attributes"]["test_mode"] is False


def test_checkout_falls_back_to_stripe_with_a_deterministic_idempotency_key(alice, alice_client, packs, fake_stripe):
    response = alice_client.post("/api/checkout", {"pack": "starter"}, format="json")

    assert response.status_code == 201
    checkout = Checkout.objects.get(public_id=response.json()["checkout_id"])
    assert (checkout.provider, checkout.provider_checkout_id) == ("stripe", "cs_test_000001")
    assert response.json()["url"] == "https://checkout.stripe.com/c/pay/cs_test_000001"
    form = fake_stripe.last_form()
    assert form["mode"] == "payment"
    assert form["line_items[0][price]"] == "price_starter"
    assert form["client_reference_id"] == checkout.public_id
    assert form["metadata[user_id]"] == str(alice.pk)
    assert form["metadata[checkout_id]"] == checkout.public_id
    assert form["success_url"].endswith(f"/topup/done?checkout={checkout.public_id}")
    assert fake_stripe.requests[-1]["headers"]["Idempotency-Key"] == f"checkout-{checkout.public_id}"


def test_checkout_honours_an_explicit_provider(alice_client, packs, fake_ls, fake_stripe):
    response = alice_client.post("/api/checkout", {"pack": "starter", "provider": "stripe"}, format="json")

    assert response.status_code == 201
    assert Checkout.objects.get().provider == "stripe"
    assert fake_ls.requests == []


def test_checkout_is_503_when_no_provider_is_configured(alice_client, packs):
    response = alice_client.post("/api/checkout", {"pack": "starter"}, format="json")

    assert response.status_code == 503
    assert "not configured" in response.json()["detail"]
    assert not Checkout.objects.exists()


def test_checkout_is_503_for_a_pack_without_a_variant(alice_client, packs, fake_ls):
    CreditPack.objects.filter(slug="starter").update(lemonsqueezy_variant_id="")

    response = alice_client.post("/api/checkout", {"pack": "starter", "provider": "lemonsqueezy"}, format="json")

    assert response.status_code == 503
    assert "Lemon Squeezy" in response.json()["detail"]


def test_checkout_of_an_unknown_pack_is_400(alice_client, packs, fake_ls):
    response = alice_client.post("/api/checkout", {"pack": "mega"}, format="json")

    assert response.status_code == 400
    assert "mega" in response.json()["detail"]


def test_a_provider_failure_is_502_and_the_checkout_is_marked_failed(alice_client, packs, fake_ls):
    fake_ls.fail_with = 500

    response = alice_client.post("/api/checkout", {"pack": "starter"}, format="json")

    assert response.status_code == 502
    assert "HTTP 500" in response.json()["detail"]
    assert Checkout.objects.get().status == "failed"


def test_a_stripe_failure_is_502(alice_client, packs, fake_stripe, payment_settings):
    payment_settings.STRIPE_API_KEY = "sk_test_wrong"

    response = alice_client.post("/api/checkout", {"pack": "starter"}, format="json")

    assert response.status_code == 502
    assert "sk_test" not in response.json()["detail"]


def test_checkout_needs_a_signed_in_user(packs, fake_ls):
    assert APIClient().post("/api/checkout", {"pack": "starter"}, format="json").status_code == 401


@pytest.fixture
def two_checkouts_an_hour(settings):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "checkout": "2/h"},
    }


def test_checkouts_are_limited_per_user_before_the_provider_is_called(
    alice_client, bob_client, packs, fake_ls, two_checkouts_an_hour
):
    statuses = [alice_client.post("/api/checkout", {"pack": "starter"}, format="json").status_code for _ in range(2)]
    refused = alice_client.post("/api/checkout", {"pack": "starter"}, format="json")

    assert statuses == [201, 201]
    assert refused.status_code == 429
    assert refused.json()["detail"].startswith("Too many checkouts started. Expected available in")
    assert 0 < int(refused["Retry-After"]) <= 3600
    assert len(fake_ls.requests) == Checkout.objects.count() == 2
    assert bob_client.post("/api/checkout", {"pack": "starter"}, format="json").status_code == 201


def test_the_portal_top_up_form_counts_with_the_api_and_explains_the_limit(
    alice, alice_client, packs, fake_ls, two_checkouts_an_hour
):
    portal = Client()
    portal.force_login(alice)
    assert alice_client.post("/api/checkout", {"pack": "starter"}, format="json").status_code == 201
    assert portal.post("/topup", {"pack": "pro"}).status_code == 302  # to the provider's checkout

    refused = portal.post("/topup", {"pack": "pro"})

    assert refused.status_code == 429
    assert "too many checkouts recently. Please try again in 60 minutes." in refused.content.decode()
    assert 0 < int(refused["Retry-After"]) <= 3600
    assert alice_client.post("/api/checkout", {"pack": "starter"}, format="json").status_code == 429
    assert len(fake_ls.requests) == 2


def test_the_data_migration_seeds_starter_and_pro():
    migration = importlib.import_module("payments.migrations.0002_seed_credit_packs")
    CreditPack.objects.all().delete()

    migration.forwards(django_apps, None)

    prices = {pack.slug: (pack.price, pack.credit, pack.currency) for pack in CreditPack.objects.all()}
    assert prices == {"starter": (10 * NANOS, 10 * NANOS, "USD"), "pro": (25 * NANOS, 26 * NANOS, "USD")}


def test_seeding_fills_empty_ids_from_the_environment_but_never_overwrites_staff_ids(settings):
    CreditPack.objects.all().delete()
    seed_packs(CreditPack)
    CreditPack.objects.filter(slug="pro").update(stripe_price_id="price_typed_by_staff")
    settings.LEMONSQUEEZY_VARIANT_STARTER = "111"
    settings.STRIPE_PRICE_STARTER = "price_env_starter"
    settings.STRIPE_PRICE_PRO = "price_env_pro"

    call_command("seed_packs")
    call_command("seed_packs")

    starter, pro = CreditPack.objects.get(slug="starter"), CreditPack.objects.get(slug="pro")
    assert (starter.lemonsqueezy_variant_id, starter.stripe_price_id) == ("111", "price_env_starter")
    assert pro.stripe_price_id == "price_typed_by_staff"
    assert CreditPack.objects.count() == 2


def test_staff_edit_pack_prices_in_dollars_in_the_admin(client, staff, packs):
    client.force_login(staff)
    pack = packs["starter"]
    page = client.get(f"/admin/payments/creditpack/{pack.pk}/change/")
    assert "10.000000000" in page.content.decode()

    response = client.post(
        f"/admin/payments/creditpack/{pack.pk}/change/",
        {
            "slug": "starter",
            "name": "Starter",
            "currency": "USD",
            "price_usd": "12.50",
            "credit_usd": "13",
            "lemonsqueezy_variant_id": "999",
            "stripe_price_id": "price_x",
            "active": "on",
            "sort_order": "10",
        },
    )

    assert response.status_code == 302
    pack.refresh_from_db()
    assert (pack.price, pack.credit, pack.lemonsqueezy_variant_id) == (12_500_000_000, 13 * NANOS, "999")


def test_the_admin_pages_render_for_staff(client, staff, packs):
    client.force_login(staff)
    for page in ["creditpack", "checkout", "payment", "webhookevent", "subscription", "staffalert"]:
        assert client.get(f"/admin/payments/{page}/").status_code == 200, page
    assert client.get("/admin/payments/payment/?status__exact=flagged").status_code == 200


def test_staff_can_read_a_webhook_events_raw_body(client, staff):
    event = WebhookEvent.objects.create(
        provider="stripe", event_id="evt_x", event_type="customer.created", body='{"id": "evt_x", "<b>": 1}'
    )
    client.force_login(staff)

    page = client.get(f"/admin/payments/webhookevent/{event.pk}/change/").content.decode()

    assert "&quot;id&quot;: &quot;evt_x&quot;" in page
    assert "&lt;b&gt;" in page  # escaped, never rendered as markup


def test_staff_resolve_alerts_from_the_admin(client, staff):
    alert = StaffAlert.objects.create(kind="payment_flagged", message="paid $1 for Pro")
    client.force_login(staff)

    client.post("/admin/payments/staffalert/", {"action": "resolve", "_selected_action": [alert.pk]})

    alert.refresh_from_db()
    assert alert.resolved is True and alert.resolved_at is not None
