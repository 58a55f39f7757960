"""POST /webhooks/lemonsqueezy: signed deliveries in, credit out — once, and only what was paid."""

import json

import pytest
from django.db import connection

from payments.models import EventStatus, Payment, PaymentStatus, StaffAlert, Subscription, WebhookEvent
from tests import payments_fixtures as fx
from tests.fake_payment_apis import ls_invoice, ls_order, ls_refund, ls_signature, ls_subscription, post_ls
from tests.payments_fixtures import NANOS, balance_of
from wallet.models import Entry, EntryKind

pytestmark = pytest.mark.django_db
packs, payment_settings = fx.packs, fx.payment_settings
fast_password_hashing = fx.fast_password_hashing

ALICE_START = 10 * NANOS


def test_a_signed_paid_order_credits_the_pack_and_records_the_fee(client, alice, packs):
    response = post_ls(client, ls_order(user_id=alice.pk, variant_id=412233, total_cents=1000))

    assert response.status_code == 200
    assert balance_of(alice) == ALICE_START + 10 * NANOS
    entry = Entry.objects.get(idempotency_key="lemonsqueezy:order:3310457")
    assert (entry.kind, entry.amount, entry.wallet.user) == (EntryKind.TOP_UP, 10 * NANOS, alice)
    payment = Payment.objects.get(provider="lemonsqueezy", provider_payment_id="3310457")
    # 5 % of $10.00 + $0.50
    assert (payment.gross, payment.fee, payment.net) == (10 * NANOS, 1 * NANOS, 9 * NANOS)
    assert (payment.user, payment.pack.slug, payment.status, payment.credit) == (
        alice,
        "starter",
        PaymentStatus.PAID,
        10 * NANOS,
    )
    event = WebhookEvent.objects.get()
    assert (event.event_id, event.status, event.attempts) == ("order_created:3310457", EventStatus.PROCESSED, 1)


def test_the_pro_pack_credits_its_bonus(client, bob, packs):
    post_ls(client, ls_order(user_id=bob.pk, variant_id=412244, total_cents=2500))

    assert balance_of(bob) == 26 * NANOS


@pytest.mark.parametrize("signature", ["", "0" * 64, ls_signature(b"some other body")])
def test_it_refuses_a_bad_signature_and_stores_nothing(client, alice, packs, signature):
    response = post_ls(client, ls_order(user_id=alice.pk), signature=signature)

    assert response.status_code == 400
    assert WebhookEvent.objects.count() == 0
    assert balance_of(alice) == ALICE_START


def test_it_refuses_every_delivery_while_no_secret_is_configured(client, alice, packs, payment_settings):
    payment_settings.LEMONSQUEEZY_WEBHOOK_SECRET = ""

    assert post_ls(client, ls_order(user_id=alice.pk)).status_code == 400


def test_it_only_accepts_post(client):
    assert client.get("/webhooks/lemonsqueezy").status_code == 405


def test_a_duplicate_delivery_answers_200_and_credits_once(client, alice, packs):
    payload = ls_order(user_id=alice.pk)
    first, second = post_ls(client, payload), post_ls(client, payload)

    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json()["duplicate"] is True
    assert balance_of(alice) == ALICE_START + 10 * NANOS
    assert WebhookEvent.objects.count() == 1


def test_forged_custom_data_cannot_buy_a_bigger_pack(client, alice, packs):
    # The buyer paid for Starter and edited the custom data to name a Pro checkout: the variant
    # and the amount paid decide, so Starter is what lands.
    payload = ls_order(user_id=alice.pk, variant_id=412233, total_cents=1000)
    payload["meta"]["custom_data"].update({"pack": "pro", "checkout_id": "ck_forged"})

    post_ls(client, payload)

    assert balance_of(alice) == ALICE_START + 10 * NANOS


def test_a_paid_amount_below_the_pack_price_is_flagged_and_credits_nothing(
    client, alice, packs, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = post_ls(client, ls_order(user_id=alice.pk, variant_id=412244, total_cents=1000))

    assert response.status_code == 200
    assert balance_of(alice) == ALICE_START
    payment = Payment.objects.get()
    assert payment.status == PaymentStatus.FLAGGED
    assert "paid $10.00 for the Pro pack, which costs $25.00" in payment.flag_reason
    assert payment.credit == 0
    alert = StaffAlert.objects.get()
    assert (alert.kind, alert.payment) == ("payment_flagged", payment)
    assert [mail.to for mail in mailoutbox] == [["ops@example.com"]]


def test_a_payment_in_another_currency_is_flagged(client, alice, packs):
    post_ls(client, ls_order(user_id=alice.pk, variant_id=412233, total_cents=1000, currency="EUR"))

    assert balance_of(alice) == ALICE_START
    assert "paid in EUR" in Payment.objects.get().flag_reason


def test_an_order_for_an_unknown_user_or_variant_is_flagged(client, alice, packs):
    post_ls(client, ls_order(order_id=1, user_id=999999))
    post_ls(client, ls_order(order_id=2, user_id=alice.pk, variant_id=1))

    reasons = dict(Payment.objects.values_list("provider_payment_id", "flag_reason"))
    assert "is not a known user" in reasons["1"]
    assert "variant 1 is not a credit pack" in reasons["2"]
    assert StaffAlert.objects.count() == 2
    assert balance_of(alice) == ALICE_START


def test_an_unpaid_order_credits_nothing(client, alice, packs):
    response = post_ls(client, ls_order(user_id=alice.pk, status="pending"))

    assert response.status_code == 200
    assert WebhookEvent.objects.get().status == EventStatus.IGNORED
    assert balance_of(alice) == ALICE_START


def test_a_test_mode_order_is_stored_and_ignored_while_test_mode_is_off(client, alice, packs):
    response = post_ls(client, ls_order(user_id=alice.pk, test_mode=True))

    assert response.status_code == 200
    event = WebhookEvent.objects.get()
    assert (event.status, event.test_mode) == (EventStatus.IGNORED, True)
    assert balance_of(alice) == ALICE_START
    assert not Payment.objects.exists()


def test_a_test_mode_order_credits_when_test_mode_is_on(client, alice, packs, payment_settings):
    payment_settings.PAYMENTS_TEST_MODE = True

    post_ls(client, ls_order(user_id=alice.pk, test_mode=True))

    assert balance_of(alice) == ALICE_START + 10 * NANOS
    assert Payment.objects.get().test_mode is True


def test_event_types_we_do_not_handle_answer_200_and_are_stored_as_ignored(client, packs):
    payload = {
        "meta": {"event_name": "license_key_created", "custom_data": {}},
        "data": {"type": "license-keys", "id": "5", "attributes": {"updated_at": "2026-08-25T09:31:41Z"}},
    }

    response = post_ls(client, payload)

    assert response.status_code == 200
    assert WebhookEvent.objects.get().status == EventStatus.IGNORED


def test_a_signed_body_that_is_not_an_event_is_refused(client, packs):
    body = b'{"hello": "world"}'
    response = client.post(
        "/webhooks/lemonsqueezy", data=body, content_type="application/json", HTTP_X_SIGNATURE=ls_signature(body)
    )

    assert response.status_code == 400


def test_partial_refunds_claw_back_proportional_credit_for_each_increase(client, alice, packs):
    post_ls(client, ls_order(user_id=alice.pk, variant_id=412244, total_cents=2500))
    start = balance_of(alice)

    post_ls(client, ls_refund(user_id=alice.pk, variant_id=412244, total_cents=2500, refunded_cents=500))
    # $5 of $25 refunded → a fifth of the $26 credit
    assert balance_of(alice) == start - 5_200_000_000
    post_ls(client, ls_refund(user_id=alice.pk, variant_id=412244, total_cents=2500, refunded_cents=1500))
    assert balance_of(alice) == start - 15_600_000_000

    payment = Payment.objects.get()
    assert (payment.status, payment.refunded_amount, payment.clawed_back) == (
        PaymentStatus.PARTIALLY_REFUNDED,
        15 * NANOS,
        15_600_000_000,
    )
    keys = set(Entry.objects.filter(kind=EntryKind.REFUND).values_list("idempotency_key", flat=True))
    assert keys == {"lemonsqueezy:refund:3310457:500", "lemonsqueezy:refund:3310457:1500"}

    post_ls(client, ls_refund(user_id=alice.pk, variant_id=412244, total_cents=2500, refunded_cents=2500))
    payment.refresh_from_db()
    assert (payment.status, payment.clawed_back) == (PaymentStatus.REFUNDED, 26 * NANOS)
    assert balance_of(alice) == start - 26 * NANOS


def test_a_stale_smaller_refund_arriving_late_claws_back_nothing_more(client, alice, packs):
    post_ls(client, ls_order(user_id=alice.pk))
    post_ls(client, ls_refund(user_id=alice.pk, refunded_cents=600))
    after_big = balance_of(alice)

    response = post_ls(client, ls_refund(user_id=alice.pk, refunded_cents=300))

    assert response.status_code == 200
    assert balance_of(alice) == after_big


def test_a_refund_before_its_order_is_parked_and_applied_when_the_order_lands(client, alice, packs):
    response = post_ls(client, ls_refund(user_id=alice.pk, refunded_cents=1000))

    assert response.status_code == 200
    parked = WebhookEvent.objects.get()
    assert (parked.status, parked.waiting_for) == (EventStatus.PENDING, "lemonsqueezy:payment:3310457")
    assert balance_of(alice) == ALICE_START

    post_ls(client, ls_order(user_id=alice.pk))

    parked.refresh_from_db()
    assert parked.status == EventStatus.PROCESSED
    assert balance_of(alice) == ALICE_START  # credited $10, then clawed back $10
    assert Payment.objects.get().status == PaymentStatus.REFUNDED


def _break_payment_inserts():
    """Simulate a database fault: every INSERT into payments_payment fails until repaired."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "CREATE FUNCTION tt_test_fail() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'disk on fire'; END $$"
            )
            cursor.execute(
                "CREATE TRIGGER tt_test_fail BEFORE INSERT ON payments_payment "
                "FOR EACH ROW EXECUTE FUNCTION tt_test_fail()"
            )
        else:
            cursor.execute(
                "CREATE TRIGGER tt_test_fail BEFORE INSERT ON payments_payment "
                "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
            )


def _repair_payment_inserts():
    with connection.cursor() as cursor:
        cursor.execute(
            "DROP TRIGGER tt_test_fail ON payments_payment"
            if connection.vendor == "postgresql"
            else "DROP TRIGGER tt_test_fail"
        )


def test_a_processing_error_answers_500_and_a_retry_processes_it(client, alice, packs):
    payload = ls_order(user_id=alice.pk)
    _break_payment_inserts()

    failed = post_ls(client, payload)

    assert failed.status_code == 500
    event = WebhookEvent.objects.get()
    assert (event.status, event.attempts) == (EventStatus.FAILED, 1)
    assert "disk on fire" in event.error
    assert balance_of(alice) == ALICE_START

    _repair_payment_inserts()
    retried = post_ls(client, payload)

    assert retried.status_code == 200
    event.refresh_from_db()
    assert (event.status, event.attempts, event.error) == (EventStatus.PROCESSED, 2, "")
    assert balance_of(alice) == ALICE_START + 10 * NANOS


def test_staff_can_replay_a_failed_event_from_the_admin(client, alice, staff, packs):
    _break_payment_inserts()
    assert post_ls(client, ls_order(user_id=alice.pk)).status_code == 500
    _repair_payment_inserts()
    event = WebhookEvent.objects.get()
    client.force_login(staff)

    response = client.post(
        "/admin/payments/webhookevent/", {"action": "replay", "_selected_action": [event.pk]}, follow=True
    )

    assert response.status_code == 200
    assert "Replayed 1 event(s)." in response.content.decode()
    event.refresh_from_db()
    assert (event.status, event.attempts) == (EventStatus.PROCESSED, 2)
    assert balance_of(alice) == ALICE_START + 10 * NANOS


def test_subscription_invoices_grant_the_plan_credit_until_the_subscription_is_cancelled(client, bob, packs):
    assert post_ls(client, ls_subscription(user_id=bob.pk)).status_code == 200
    post_ls(client, ls_invoice(invoice_id=1))
    post_ls(client, ls_invoice(invoice_id=2))

    assert balance_of(bob) == 44 * NANOS
    grants = Entry.objects.filter(kind=EntryKind.GRANT).values_list("idempotency_key", flat=True)
    assert set(grants) == {"lemonsqueezy:invoice:1", "lemonsqueezy:invoice:2"}

    post_ls(
        client,
        ls_subscription(
            user_id=bob.pk, event_name="subscription_cancelled", status="cancelled", updated_at="2026-09-01T00:00:00Z"
        ),
    )
    assert Subscription.objects.get().status == "cancelled"
    # An older "active" update delivered late does not revive it.
    post_ls(
        client, ls_subscription(user_id=bob.pk, event_name="subscription_updated", updated_at="2026-08-30T00:00:00Z")
    )
    post_ls(client, ls_invoice(invoice_id=3))

    assert Subscription.objects.get().status == "cancelled"
    assert balance_of(bob) == 44 * NANOS
    assert WebhookEvent.objects.get(event_id="subscription_payment_success:3").status == EventStatus.IGNORED


def test_a_subscription_invoice_before_its_subscription_waits_for_it(client, bob, packs):
    post_ls(client, ls_invoice(invoice_id=7))
    assert balance_of(bob) == 0

    post_ls(client, ls_subscription(user_id=bob.pk))

    assert balance_of(bob) == 22 * NANOS
    assert WebhookEvent.objects.get(event_id="subscription_payment_success:7").status == EventStatus.PROCESSED


def test_the_first_order_of_a_subscription_grants_nothing_by_itself(client, bob, packs):
    post_ls(client, ls_order(user_id=bob.pk, variant_id=555001, total_cents=2000))

    assert balance_of(bob) == 0
    assert WebhookEvent.objects.get().status == EventStatus.IGNORED


def test_a_subscription_invoice_with_the_wrong_amount_is_flagged(client, bob, packs):
    post_ls(client, ls_subscription(user_id=bob.pk))
    post_ls(client, ls_invoice(invoice_id=9, total_cents=500))

    assert balance_of(bob) == 0
    assert Payment.objects.get().status == PaymentStatus.FLAGGED


# --- Signed but unreadable bodies (issue 11, item 12) --------------------------------------------


def _post_signed(client, body: bytes, event_name: str = "order_created"):
    return client.post(
        "/webhooks/lemonsqueezy",
        data=body,
        content_type="application/json",
        HTTP_X_SIGNATURE=ls_signature(body),
        HTTP_X_EVENT_NAME=event_name,
    )


def _order_with(user_id, **attributes) -> bytes:
    payload = ls_order(user_id=user_id)
    payload["data"]["attributes"].update(attributes)
    return json.dumps(payload).encode()


def _order_without_attributes(user_id) -> bytes:
    payload = ls_order(user_id=user_id)
    payload["data"]["attributes"] = None
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (lambda user: b"[]", "body must be an object"),
        (lambda user: b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (lambda user: b"\xff\xfe not utf-8", "not UTF-8"),
        (lambda user: _order_with(user, total_usd=1000.0), "total_usd must be an integer number of cents"),
        (lambda user: _order_with(user, total_usd="1000"), "total_usd must be an integer number of cents"),
        (lambda user: _order_with(user, tax_inclusive="no"), "tax_inclusive must be true or false"),
        (lambda user: _order_with(user, first_order_item=[412233]), "first_order_item must be an object"),
        (_order_without_attributes, "data.attributes is missing"),
        (lambda user: json.dumps({"meta": {"event_name": "order_created"}}).encode(), "body.data is missing"),
    ],
    ids=["list", "deeply-nested", "not-utf8", "float", "string", "bool", "item", "attributes-null", "no-data"],
)
def test_a_signed_body_we_can_never_process_is_a_400_stored_as_rejected(client, alice, packs, body, reason):
    raw = body(alice.pk)

    first = _post_signed(client, raw)
    again = _post_signed(client, raw)  # Lemon Squeezy's retry finds the same row

    assert (first.status_code, again.status_code) == (400, 400)
    assert reason in first.json()["detail"]
    event = WebhookEvent.objects.get()
    assert (event.status, event.event_type) == (EventStatus.REJECTED, "order_created")
    assert reason in event.error
    assert not Payment.objects.exists()
    assert balance_of(alice) == ALICE_START


def test_a_transient_failure_is_still_a_500_and_not_rejected(client, alice, packs):
    _break_payment_inserts()
    try:
        response = post_ls(client, ls_order(user_id=alice.pk))
    finally:
        _repair_payment_inserts()

    assert response.status_code == 500
    assert WebhookEvent.objects.get().status == EventStatus.FAILED


# --- Totals that are no purchase (item 15) -------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "tax", "reason"),
    [(0, -1000, "the total paid is $0.00"), (-1000, 0, "the total paid is -$10.00"), (1500, -500, "tax is negative")],
)
def test_a_zero_or_negative_total_or_a_negative_tax_is_flagged_and_credits_nothing(
    client, alice, packs, total, tax, reason
):
    payload = ls_order(user_id=alice.pk, variant_id=412233, total_cents=total)
    payload["data"]["attributes"].update(tax_usd=tax, status="paid")

    response = post_ls(client, payload)

    assert response.status_code == 200
    assert balance_of(alice) == ALICE_START
    payment = Payment.objects.get()
    assert (payment.status, payment.credit, payment.pack.slug) == (PaymentStatus.FLAGGED, 0, "starter")
    assert reason in payment.flag_reason
    assert StaffAlert.objects.filter(payment=payment, kind="payment_flagged").exists()


def test_a_subscription_invoice_with_a_zero_total_is_flagged(client, bob, packs):
    post_ls(client, ls_subscription(user_id=bob.pk))
    invoice = ls_invoice(invoice_id=11, total_cents=0)
    invoice["data"]["attributes"]["tax_usd"] = -2000

    post_ls(client, invoice)

    assert balance_of(bob) == 0
    assert "the total paid is $0.00" in Payment.objects.get().flag_reason


def test_replaying_an_old_failed_event_with_an_unreadable_body_rejects_it(client, staff, packs):
    # Stored 'failed' before bodies were checked on arrival: retried forever until staff replay it.
    event = WebhookEvent.objects.create(
        provider="lemonsqueezy",
        event_id="order_created:1",
        event_type="order_created",
        body=json.dumps({"meta": {"event_name": "order_created"}, "data": {"id": "1", "attributes": None}}),
        signature_valid=True,
        status=EventStatus.FAILED,
        attempts=3,
    )
    client.force_login(staff)

    client.post("/admin/payments/webhookevent/", {"action": "replay", "_selected_action": [event.pk]}, follow=True)

    event.refresh_from_db()
    assert (event.status, event.attempts) == (EventStatus.REJECTED, 4)
    assert "data.attributes is missing" in event.error
    # and the provider's next retry of it gets the 400 that stops it
    body = event.body.encode()
    retry = client.post(
        "/webhooks/lemonsqueezy", data=body, content_type="application/json", HTTP_X_SIGNATURE=ls_signature(body)
    )
    assert retry.status_code == 400
