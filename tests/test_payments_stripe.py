"""POST /webhooks/stripe: events verified by the official library, credited from our own checkout."""

import time

import pytest

from payments.models import Checkout, EventStatus, Payment, PaymentStatus, StaffAlert, Subscription, WebhookEvent
from tests import payments_fixtures as fx
from tests.fake_payment_apis import (
    post_stripe,
    stripe_charge,
    stripe_event,
    stripe_invoice,
    stripe_session,
    stripe_signature,
)
from tests.payments_fixtures import NANOS, balance_of
from wallet.models import Entry, EntryKind

pytestmark = pytest.mark.django_db
packs, payment_settings = fx.packs, fx.payment_settings
fast_password_hashing = fx.fast_password_hashing


@pytest.fixture
def starter_checkout(alice, packs):
    return Checkout.objects.create(user=alice, pack=packs["starter"], provider="stripe", provider_checkout_id="cs_1")


def completed(checkout, **kwargs):
    return stripe_event(
        "checkout.session.completed", stripe_session(checkout_id=checkout.public_id, user_id=checkout.user_id, **kwargs)
    )


def test_a_paid_checkout_session_credits_the_pack_and_records_the_fee(client, alice, starter_checkout):
    response = post_stripe(client, completed(starter_checkout))

    assert response.status_code == 200
    assert balance_of(alice) == 20 * NANOS
    assert Entry.objects.get(idempotency_key="stripe:checkout:cs_test_a1B2c3D4e5").kind == EntryKind.TOP_UP
    payment = Payment.objects.get()
    # 2.9 % of $10.00 + $0.30
    assert (payment.gross, payment.fee, payment.net) == (10 * NANOS, 590_000_000, 9_410_000_000)
    assert (payment.provider, payment.payment_intent, payment.checkout) == (
        "stripe",
        "pi_3Qx7Tokentill0001",
        starter_checkout,
    )
    starter_checkout.refresh_from_db()
    assert starter_checkout.status == "completed"
    assert WebhookEvent.objects.get().event_id == "evt_1Qx7Tokentill0001"


@pytest.mark.parametrize("header", ["", "t=1,v1=deadbeef", "garbage", stripe_signature(b"{}")])
def test_it_refuses_a_bad_signature_and_stores_nothing(client, alice, starter_checkout, header):
    response = post_stripe(client, completed(starter_checkout), signature=header)

    assert response.status_code == 400
    assert WebhookEvent.objects.count() == 0
    assert balance_of(alice) == 10 * NANOS


def test_it_refuses_a_correctly_signed_but_stale_delivery(client, alice, starter_checkout):
    response = post_stripe(client, completed(starter_checkout), timestamp=int(time.time()) - 600)

    assert response.status_code == 400
    assert WebhookEvent.objects.count() == 0


def test_a_duplicate_event_answers_200_and_credits_once(client, alice, starter_checkout):
    event = completed(starter_checkout)

    assert post_stripe(client, event).status_code == 200
    assert post_stripe(client, event).status_code == 200

    assert balance_of(alice) == 20 * NANOS


def test_completed_and_async_succeeded_for_one_session_credit_once(client, alice, starter_checkout):
    session = stripe_session(checkout_id=starter_checkout.public_id, user_id=alice.pk, payment_status="unpaid")
    post_stripe(client, stripe_event("checkout.session.completed", session, event_id="evt_a"))
    assert balance_of(alice) == 10 * NANOS  # a delayed payment method: nothing yet

    session["payment_status"] = "paid"
    post_stripe(client, stripe_event("checkout.session.async_payment_succeeded", session, event_id="evt_b"))
    post_stripe(client, stripe_event("checkout.session.completed", session, event_id="evt_c"))

    assert balance_of(alice) == 20 * NANOS
    assert Payment.objects.count() == 1


def test_an_amount_that_does_not_match_the_checkout_pack_is_flagged(client, alice, starter_checkout):
    response = post_stripe(client, completed(starter_checkout, amount_cents=500))

    assert response.status_code == 200
    assert balance_of(alice) == 10 * NANOS
    payment = Payment.objects.get()
    assert payment.status == PaymentStatus.FLAGGED
    assert "paid $5.00 for the Starter pack" in payment.flag_reason
    assert StaffAlert.objects.filter(payment=payment).exists()


def test_a_session_that_is_not_one_of_our_checkouts_is_flagged(client, alice, packs):
    post_stripe(
        client, stripe_event("checkout.session.completed", stripe_session(checkout_id="ck_nope", user_id=alice.pk))
    )

    assert balance_of(alice) == 10 * NANOS
    assert "is not one of our checkouts" in Payment.objects.get().flag_reason


def test_a_test_mode_event_is_ignored_unless_test_mode_is_on(client, alice, starter_checkout, payment_settings):
    event = completed(starter_checkout)
    event["livemode"] = False

    post_stripe(client, event)
    assert WebhookEvent.objects.get().status == EventStatus.IGNORED
    assert balance_of(alice) == 10 * NANOS

    payment_settings.PAYMENTS_TEST_MODE = True
    event["id"] = "evt_test_again"
    post_stripe(client, event)
    assert balance_of(alice) == 20 * NANOS
    assert Payment.objects.get().test_mode is True


def test_partial_charge_refunds_claw_back_each_increase(client, alice, starter_checkout):
    post_stripe(client, completed(starter_checkout))

    post_stripe(client, stripe_event("charge.refunded", stripe_charge(amount_refunded=250), event_id="evt_r1"))
    assert balance_of(alice) == 17_500_000_000
    post_stripe(client, stripe_event("charge.refunded", stripe_charge(amount_refunded=1000), event_id="evt_r2"))
    assert balance_of(alice) == 10 * NANOS

    payment = Payment.objects.get()
    assert (payment.status, payment.refunded_amount, payment.clawed_back) == (
        PaymentStatus.REFUNDED,
        10 * NANOS,
        10 * NANOS,
    )
    keys = set(Entry.objects.filter(kind=EntryKind.REFUND).values_list("idempotency_key", flat=True))
    assert keys == {"stripe:refund:ch_3Qx7Tokentill0001:250", "stripe:refund:ch_3Qx7Tokentill0001:1000"}


def test_a_refund_before_the_session_is_parked_until_the_payment_lands(client, alice, starter_checkout):
    post_stripe(client, stripe_event("charge.refunded", stripe_charge(amount_refunded=500), event_id="evt_r1"))
    parked = WebhookEvent.objects.get()
    assert (parked.status, parked.waiting_for) == (EventStatus.PENDING, "stripe:payment_intent:pi_3Qx7Tokentill0001")

    post_stripe(client, completed(starter_checkout))

    parked.refresh_from_db()
    assert parked.status == EventStatus.PROCESSED
    assert balance_of(alice) == 15 * NANOS


def test_subscription_invoices_grant_until_the_subscription_is_deleted(client, bob, packs):
    checkout = Checkout.objects.create(user=bob, pack=packs["monthly"], provider="stripe")
    first = stripe_invoice(invoice_id="in_1", checkout_id=checkout.public_id)

    post_stripe(client, stripe_event("invoice.payment_succeeded", first, event_id="evt_i1"))
    # An older API version names the subscription at the top level.
    post_stripe(
        client,
        stripe_event("invoice.payment_succeeded", stripe_invoice(invoice_id="in_2", legacy=True), event_id="evt_i2"),
    )

    assert balance_of(bob) == 44 * NANOS
    subscription = Subscription.objects.get()
    assert (subscription.user, subscription.pack.slug) == (bob, "monthly")
    assert Entry.objects.filter(kind=EntryKind.GRANT, idempotency_key="stripe:invoice:in_1").exists()

    deleted = {"id": "sub_1QxTokentill01", "object": "subscription", "status": "canceled"}
    post_stripe(client, stripe_event("customer.subscription.deleted", deleted, event_id="evt_del"))
    post_stripe(client, stripe_event("invoice.payment_succeeded", stripe_invoice(invoice_id="in_3"), event_id="evt_i3"))

    assert balance_of(bob) == 44 * NANOS
    assert WebhookEvent.objects.get(event_id="evt_i3").status == EventStatus.IGNORED


def test_a_subscription_session_records_the_subscription_and_credits_nothing_itself(client, bob, packs):
    checkout = Checkout.objects.create(user=bob, pack=packs["monthly"], provider="stripe")
    post_stripe(client, stripe_event("invoice.payment_succeeded", stripe_invoice(invoice_id="in_9"), event_id="evt_i9"))
    assert WebhookEvent.objects.get().status == EventStatus.PENDING

    session = stripe_session(
        checkout_id=checkout.public_id, user_id=bob.pk, mode="subscription", subscription="sub_1QxTokentill01"
    )
    post_stripe(client, stripe_event("checkout.session.completed", session, event_id="evt_s"))

    assert balance_of(bob) == 22 * NANOS  # the parked invoice, granted once the subscription is known
    assert WebhookEvent.objects.get(event_id="evt_i9").status == EventStatus.PROCESSED


def test_a_failed_invoice_alerts_staff_by_admin_and_email(
    client, packs, mailoutbox, django_capture_on_commit_callbacks
):
    invoice = stripe_invoice(invoice_id="in_fail")
    invoice.update({"status": "open", "amount_paid": 0, "attempt_count": 2, "next_payment_attempt": 1761500000})

    with django_capture_on_commit_callbacks(execute=True):
        response = post_stripe(client, stripe_event("invoice.payment_failed", invoice, event_id="evt_f"))

    assert response.status_code == 200
    alert = StaffAlert.objects.get()
    assert alert.kind == "invoice_payment_failed"
    assert "in_fail" in alert.message and "Stripe will retry" in alert.message
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["ops@example.com"]
    assert "in_fail" in mailoutbox[0].body


def test_event_types_we_do_not_handle_answer_200(client, packs):
    response = post_stripe(client, stripe_event("customer.created", {"id": "cus_1", "object": "customer"}))

    assert response.status_code == 200
    assert WebhookEvent.objects.get().status == EventStatus.IGNORED


def test_an_expired_session_marks_our_checkout_expired(client, starter_checkout):
    session = stripe_session(checkout_id=starter_checkout.public_id, user_id=starter_checkout.user_id)
    session["payment_status"] = "unpaid"

    post_stripe(client, stripe_event("checkout.session.expired", session))

    starter_checkout.refresh_from_db()
    assert starter_checkout.status == "expired"
