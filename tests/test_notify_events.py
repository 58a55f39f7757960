"""What each cause writes into the outbox, through the public surfaces that cause it: provider
webhooks (payments), the key API, the spend caps, and the hourly usage summary."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.cache import cache
from django.test import Client
from django.utils import timezone

from accounts.services import api_key_create
from notify.models import Event, JobMark
from notify.services import endpoint_create
from notify.worker import run_hourly
from proxy.models import UsageRecord, UsageStatus
from tests import payments_fixtures as fx
from tests.fake_payment_apis import (
    ls_invoice,
    ls_order,
    ls_refund,
    ls_subscription,
    post_ls,
    post_stripe,
    stripe_event,
    stripe_invoice,
)

pytestmark = pytest.mark.django_db
packs, payment_settings = fx.packs, fx.payment_settings
fast_password_hashing = fx.fast_password_hashing


def events(type_: str | None = None) -> list[Event]:
    found = Event.objects.order_by("created_at", "id")
    return list(found.filter(type=type_) if type_ else found)


def only(type_: str) -> Event:
    (event,) = events(type_)
    return event


# --- payments ----------------------------------------------------------------------------------------


def test_a_paid_order_is_payment_succeeded_with_what_was_paid_and_credited(client, alice, packs):
    post_ls(client, ls_order(user_id=alice.pk, variant_id=412233, total_cents=1000))
    event = only("payment.succeeded")
    assert event.user == alice
    assert event.data == {
        "payment": {
            "id": "3310457",
            "provider": "lemonsqueezy",
            "amount": "10.000000000",
            "currency": "USD",
            "credit": "10.000000000",
            "pack": "starter",
            "subscription": None,
            "status": "paid",
            "test_mode": False,
        }
    }
    post_ls(client, ls_order(user_id=alice.pk, variant_id=412233, total_cents=1000))  # the provider retries
    assert len(events("payment.succeeded")) == 1


def test_a_refund_is_payment_refunded_with_this_refund_and_the_running_total(client, alice, packs):
    post_ls(client, ls_order(user_id=alice.pk))
    post_ls(client, ls_refund(user_id=alice.pk, refunded_cents=400))
    post_ls(client, ls_refund(user_id=alice.pk, refunded_cents=1000))
    first, second = events("payment.refunded")
    assert (first.data["refunded"], first.data["clawed_back"], first.data["payment"]["refunded"]) == (
        "4.000000000",
        "4.000000000",
        "4.000000000",
    )
    assert (second.data["refunded"], second.data["payment"]["refunded"], second.data["payment"]["status"]) == (
        "6.000000000",
        "10.000000000",
        "refunded",
    )


def test_a_payment_that_buys_nothing_is_payment_flagged(client, alice, packs):
    post_ls(client, ls_order(user_id=alice.pk, variant_id=412233, total_cents=900))
    event = only("payment.flagged")
    assert event.user == alice and "costs $10.00" in event.data["reason"]
    assert event.data["payment"]["credit"] == "0.000000000"
    assert not events("payment.succeeded")


def test_subscription_invoices_are_renewals_and_a_cancellation_is_announced_once(client, bob, packs):
    post_ls(client, ls_subscription(user_id=bob.pk))
    post_ls(client, ls_invoice(invoice_id=1))
    renewed = only("subscription.renewed")
    assert renewed.user == bob
    assert renewed.data["subscription"]["pack"] == "monthly" and renewed.data["subscription"]["id"] == "880011"
    assert renewed.data["payment"]["subscription"] == "880011"
    assert only("payment.succeeded").data["payment"]["subscription"] == "880011"

    cancelled = ls_subscription(
        user_id=bob.pk, event_name="subscription_cancelled", status="cancelled", updated_at="2026-09-01T00:00:00Z"
    )
    post_ls(client, cancelled)
    later = ls_subscription(
        user_id=bob.pk, event_name="subscription_expired", status="cancelled", updated_at="2026-09-02T00:00:00Z"
    )
    post_ls(client, later)
    event = only("subscription.cancelled")
    assert event.user == bob and event.data["subscription"]["status"] == "cancelled"


def test_a_declined_renewal_is_payment_failed_for_the_subscriber(client, bob, packs):
    from payments.models import Subscription

    Subscription.objects.create(
        provider="stripe", provider_subscription_id="sub_1QxTokentill01", user=bob, pack=packs["pro"], credit=1
    )
    invoice = stripe_invoice(invoice_id="in_fail")
    invoice.update({"status": "open", "amount_paid": 0, "attempt_count": 2, "next_payment_attempt": 1761500000})
    post_stripe(client, stripe_event("invoice.payment_failed", invoice, event_id="evt_f"))
    event = only("payment.failed")
    assert event.user == bob
    assert event.data["provider"] == "stripe" and event.data["reference"] == "in_fail"
    assert "attempt 2" in event.data["reason"] and "stripe will retry" in event.data["reason"]


# --- keys ---------------------------------------------------------------------------------------------


def test_creating_and_revoking_a_key_are_events_without_its_secret(alice_client, alice):
    body = alice_client.post("/api/keys", {"name": "laptop"}, format="json").json()
    created = only("key.created")
    assert created.user == alice
    assert created.data["api_key"]["id"] == body["id"] and created.data["api_key"]["name"] == "laptop"
    assert created.data["api_key"]["prefix"] == body["prefix"] and created.data["api_key"]["revoked_at"] is None
    assert body["key"] not in str(created.data)

    assert alice_client.delete(f"/api/keys/{body['id']}").status_code in (200, 204)
    alice_client.delete(f"/api/keys/{body['id']}")  # revoked already: no second event
    revoked = only("key.revoked")
    assert revoked.data["api_key"]["revoked_at"] is not None


# --- spend caps ----------------------------------------------------------------------------------------


def test_a_full_spend_cap_is_announced_once_per_window_however_often_it_refuses(alice):
    cache.clear()
    key, secret = api_key_create(user=alice, name="agent", limits={"daily_spend": "0.01"})
    client = Client(headers={"Authorization": f"Bearer {secret}"})

    def charge(idempotency_key: str):
        return client.post(
            "/v1/user/charge",
            {"amount": "0.01", "description": "tool"},
            content_type="application/json",
            headers={"Idempotency-Key": idempotency_key},
        )

    assert charge("a").status_code == 200
    assert [charge(k).status_code for k in ("b", "c", "d")] == [429, 429, 429]
    event = only("usage.cap_reached")
    assert event.user == alice
    assert event.data["code"] == "spend_cap_reached" and event.data["limit"] == "0.010000000"
    assert event.data["api_key"] == {"id": key.pk, "prefix": key.prefix}
    assert "daily spend cap" in event.data["message"] and event.data["retry_after"] > 0
    cache.clear()  # even with the cache's memory of it gone, the dedup key holds
    charge("e")
    assert len(events("usage.cap_reached")) == 1


# --- the hourly usage summary ---------------------------------------------------------------------------


def _record(user, *, model: str, charge: int, at, status=UsageStatus.OK, n: int = 0):
    return UsageRecord.objects.create(
        request_id=f"{user.pk}-{model}-{at:%H%M%S}-{n}",
        user=user,
        model=model,
        status=status,
        prompt_tokens=10,
        completion_tokens=5,
        charge=charge,
        created_at=at,
    )


def test_the_hourly_summary_is_one_event_per_user_and_hour_only_when_an_endpoint_wants_it(alice, bob):
    now = timezone.now().replace(minute=30, second=0, microsecond=0)
    last_hour = now.replace(minute=0) - timedelta(hours=1)
    _record(alice, model="m1", charge=1_000_000, at=last_hour + timedelta(minutes=5))
    _record(alice, model="m1", charge=2_000_000, at=last_hour + timedelta(minutes=6), n=1)
    _record(alice, model="m2", charge=0, at=last_hour + timedelta(minutes=7), status=UsageStatus.REFUSED)
    _record(bob, model="m1", charge=500, at=now)  # this hour: not yet

    assert run_hourly(now=now) == 1
    assert not events("usage.summary")  # nobody subscribes: the hour is marked done, nothing written
    assert JobMark.objects.get(name="usage.summary").done_until == now.replace(minute=0)

    JobMark.objects.all().delete()
    endpoint_create(url="https://ops.example.com/hooks", event_types=["usage.summary"])
    run_hourly(now=now)
    run_hourly(now=now)  # a second worker, or a second round: nothing twice
    summary = only("usage.summary")
    assert summary.user == alice
    assert summary.data["period"]["start"] == last_hour.isoformat()
    assert (summary.data["requests"], summary.data["refused"], summary.data["charge"]) == (2, 1, "0.003000000")
    assert [m["model"] for m in summary.data["models"]] == ["m1", "m2"]
    assert summary.dedup_key == f"usage.summary:{alice.pk}:{last_hour:%Y%m%d%H}"

    # Bob's hour is summarised once it is over.
    run_hourly(now=now + timedelta(hours=1))
    assert [e.user for e in events("usage.summary")] == [alice, bob]
