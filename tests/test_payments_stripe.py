"""POST /webhooks/stripe: events verified by the official library, credited from our own checkout."""

import json
import time

import pytest

from payments.models import Checkout, EventStatus, Payment, PaymentStatus, StaffAlert, Subscription, WebhookEvent
from tests import payments_fixtures as fx
from tests.fake_payment_apis import (
    post_stripe,
    stripe_charge,
    stripe_event,
    stripe_invoice,
    stripe_line_item,
    stripe_payment_link_session,
    stripe_session,
    stripe_signature,
)
from tests.payments_fixtures import NANOS, balance_of
from wallet.models import Entry, EntryKind

pytestmark = pytest.mark.django_db
packs, payment_settings, fake_stripe = fx.packs, fx.payment_settings, fx.fake_stripe
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


# --- Signatures from the future (issue 11, item 13) ----------------------------------------------


def test_it_refuses_a_signature_dated_ten_minutes_in_the_future(client, alice, starter_checkout):
    response = post_stripe(client, completed(starter_checkout), timestamp=int(time.time()) + 600)

    assert response.status_code == 400
    assert WebhookEvent.objects.count() == 0
    assert balance_of(alice) == 10 * NANOS


def test_it_allows_a_little_clock_skew_into_the_future(client, alice, starter_checkout):
    response = post_stripe(client, completed(starter_checkout), timestamp=int(time.time()) + 30)

    assert response.status_code == 200
    assert balance_of(alice) == 20 * NANOS


# --- Signed but unreadable bodies (item 12) ------------------------------------------------------


def _post_signed(client, body: bytes):
    return client.post(
        "/webhooks/stripe", data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=stripe_signature(body)
    )


def _session_event_with(**changes) -> bytes:
    session = stripe_session(checkout_id="ck_any", user_id=1)
    session.update(changes)
    return json.dumps(stripe_event("checkout.session.completed", session)).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[]", "body must be an object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"not json at all", "not JSON"),
        (json.dumps({"id": "evt_1", "type": "checkout.session.completed", "data": {}}).encode(), "data.object"),
        (_session_event_with(amount_total=1000.5), "amount_total must be an integer number of cents"),
        (_session_event_with(amount_total="1000"), "amount_total must be an integer number of cents"),
        (_session_event_with(metadata=["checkout_id"]), "metadata must be an object"),
        (_session_event_with(client_reference_id="ck_\u0000"), "client_reference_id must be a string"),
        (_session_event_with(id=None), "data.object.id is missing"),
    ],
    ids=["list", "deeply-nested", "not-json", "no-data-object", "float", "string", "metadata", "nul", "no-id"],
)
def test_a_signed_body_we_can_never_process_is_a_400_stored_as_rejected(client, alice, packs, body, reason):
    first = _post_signed(client, body)
    again = _post_signed(client, body)  # the provider's retry finds the same row

    assert (first.status_code, again.status_code) == (400, 400)
    assert reason in first.json()["detail"]
    event = WebhookEvent.objects.get()
    assert event.status == EventStatus.REJECTED
    assert reason in event.error
    assert not Payment.objects.exists()
    assert balance_of(alice) == 10 * NANOS


def test_staff_see_rejected_events_with_their_reason_in_the_admin(client, staff, packs):
    _post_signed(client, _session_event_with(amount_total="1000"))
    client.force_login(staff)

    listing = client.get("/admin/payments/webhookevent/", {"status__exact": "rejected"}).content.decode()

    assert "evt_1Qx7Tokentill0001" in listing
    assert "amount_total must be an integer number of cents" in listing


# --- Totals that are no purchase (item 15) -------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "tax", "reason"),
    [(0, -1000, "the total paid is $0.00"), (-1000, -2000, "the total paid is -$10.00"), (2000, -1000, "negative")],
)
def test_a_zero_or_negative_total_or_a_negative_tax_is_flagged_and_credits_nothing(
    client, alice, starter_checkout, total, tax, reason
):
    session = stripe_session(checkout_id=starter_checkout.public_id, user_id=alice.pk, amount_cents=total)
    session["total_details"]["amount_tax"] = tax

    response = post_stripe(client, stripe_event("checkout.session.completed", session))

    assert response.status_code == 200
    assert balance_of(alice) == 10 * NANOS
    payment = Payment.objects.get()
    assert (payment.status, payment.credit) == (PaymentStatus.FLAGGED, 0)
    assert reason in payment.flag_reason
    assert StaffAlert.objects.filter(payment=payment, kind="payment_flagged").exists()


def test_a_subscription_invoice_with_a_negative_tax_is_flagged(client, bob, packs):
    checkout = Checkout.objects.create(user=bob, pack=packs["monthly"], provider="stripe")
    invoice = stripe_invoice(invoice_id="in_neg", checkout_id=checkout.public_id, amount=0)
    invoice["total_excluding_tax"] = 2000  # tax = total − total_excluding_tax = −$20

    post_stripe(client, stripe_event("invoice.payment_succeeded", invoice, event_id="evt_neg"))

    assert balance_of(bob) == 0
    assert "the total paid is $0.00" in Payment.objects.get().flag_reason


# --- Payment Links: client_reference_id is a user id (item 19) -----------------------------------


def link_completed(user, **kwargs):
    return stripe_event("checkout.session.completed", stripe_payment_link_session(user_id=user.pk, **kwargs))


def test_a_payment_link_session_credits_the_pack_its_price_buys(client, bob, packs, fake_stripe):
    fake_stripe.line_items["cs_live_link0001"] = [stripe_line_item(price_id="price_pro", unit_cents=2500)]

    response = post_stripe(client, link_completed(bob, amount_cents=2500))

    assert response.status_code == 200
    assert balance_of(bob) == 26 * NANOS
    payment = Payment.objects.get()
    assert (payment.user, payment.pack.slug, payment.status, payment.checkout) == (bob, "pro", "paid", None)
    assert Entry.objects.get(idempotency_key="stripe:checkout:cs_live_link0001").kind == EntryKind.TOP_UP
    asked = fake_stripe.requests[-1]
    assert asked["path"].startswith("/v1/checkout/sessions/cs_live_link0001/line_items")
    # A duplicate delivery asks Stripe nothing more and credits nothing more.
    post_stripe(client, link_completed(bob, amount_cents=2500))
    assert (balance_of(bob), len(fake_stripe.requests)) == (26 * NANOS, 1)


@pytest.mark.parametrize(
    ("items", "amount", "reason"),
    [
        ([stripe_line_item(price_id="price_unknown")], 1000, "price price_unknown is not an active credit pack"),
        ([stripe_line_item(price_id="price_monthly", unit_cents=2000)], 2000, "is not an active credit pack"),
        ([stripe_line_item(price_id="price_starter", quantity=2)], 2000, "exactly one credit pack, once"),
        (
            [stripe_line_item(price_id="price_starter"), stripe_line_item(price_id="price_pro", unit_cents=2500)],
            3500,
            "exactly one credit pack, once",
        ),
        ([stripe_line_item(price_id="price_pro", unit_cents=1000)], 1000, "paid $10.00 for the Pro pack"),
    ],
    ids=["unknown-price", "subscription-price", "quantity-2", "two-packs", "discounted"],
)
def test_a_payment_link_session_that_does_not_buy_one_pack_at_its_price_is_flagged(
    client, bob, packs, fake_stripe, items, amount, reason
):
    fake_stripe.line_items["cs_live_link0001"] = items

    response = post_stripe(client, link_completed(bob, amount_cents=amount))

    assert response.status_code == 200
    assert balance_of(bob) == 0
    payment = Payment.objects.get()
    assert (payment.status, payment.user) == (PaymentStatus.FLAGGED, bob)
    assert reason in payment.flag_reason


def test_a_payment_link_session_for_no_known_user_is_flagged_without_asking_stripe(client, packs, fake_stripe):
    post_stripe(client, stripe_event("checkout.session.completed", stripe_payment_link_session(user_id=999999)))

    assert "is not one of our checkouts, nor a user" in Payment.objects.get().flag_reason
    assert fake_stripe.requests == []


def test_a_payment_link_session_is_flagged_when_no_stripe_api_key_can_read_its_price(client, bob, packs):
    post_stripe(client, link_completed(bob))

    assert balance_of(bob) == 0
    assert "STRIPE_API_KEY is not set" in Payment.objects.get().flag_reason


def test_stripe_unreachable_for_the_line_items_is_a_500_and_the_retry_credits(client, bob, packs, fake_stripe):
    fake_stripe.line_items["cs_live_link0001"] = [stripe_line_item(price_id="price_starter")]
    fake_stripe.fail_with = 503

    failed = post_stripe(client, link_completed(bob))

    assert failed.status_code == 500
    event = WebhookEvent.objects.get()
    assert event.status == EventStatus.FAILED and "line items" in event.error
    assert balance_of(bob) == 0

    fake_stripe.fail_with = None
    assert post_stripe(client, link_completed(bob)).status_code == 200
    assert balance_of(bob) == 10 * NANOS


def test_a_refund_of_a_payment_link_payment_claws_back(client, bob, packs, fake_stripe):
    fake_stripe.line_items["cs_live_link0001"] = [stripe_line_item(price_id="price_starter")]
    post_stripe(client, link_completed(bob))

    refund = stripe_charge(charge_id="ch_link", payment_intent="pi_link0001", amount_refunded=1000)
    post_stripe(client, stripe_event("charge.refunded", refund, event_id="evt_link_refund"))

    assert balance_of(bob) == 0
    assert Payment.objects.get().status == PaymentStatus.REFUNDED
