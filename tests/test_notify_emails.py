"""Emails to users: sent by the worker from the outbox (Django's locmem backend here), each with a
one-click unsubscribe link that works signed out; users choose their threshold and emails in the
portal."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core import mail
from django.test import Client

from core.money import parse_usd
from notify.emails import unsubscribe_token
from notify.models import Delivery, DeliveryStatus, Preference
from notify.worker import Worker
from tests import payments_fixtures as fx
from tests.fake_payment_apis import ls_invoice, ls_order, ls_subscription, post_ls
from wallet.models import Wallet
from wallet.services import wallet_charge

pytestmark = pytest.mark.django_db
packs, payment_settings = fx.packs, fx.payment_settings
fast_password_hashing = fx.fast_password_hashing


@pytest.fixture(autouse=True)
def locmem_mail(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.APP_URL = "https://credits.example.com"
    settings.LOW_BALANCE_THRESHOLD, settings.MIN_BALANCE = Decimal("1.00"), Decimal("0.05")


def deliver() -> None:
    worker = Worker()
    try:
        worker.run_once()
    finally:
        worker.close()


def spend(user, amount: str, key: str) -> None:
    wallet_charge(wallet=user.wallet, amount=parse_usd(amount), idempotency_key=key)


def test_falling_below_the_threshold_emails_the_user_once_with_unsubscribe_headers(alice):
    spend(alice, "9.50", "a")  # $10.00 → $0.50
    spend(alice, "0.10", "b")  # still low: no second email
    deliver()

    (email,) = mail.outbox
    assert email.to == [alice.email]
    assert email.subject == "[Tokentill] Your balance is below $1.00"
    assert "$0.50" in email.body and "https://credits.example.com/topup" in email.body
    html, mime = email.alternatives[0]
    assert mime == "text/html" and "$0.50" in html and "https://credits.example.com/unsubscribe/" in html
    unsubscribe = email.extra_headers["List-Unsubscribe"]
    assert unsubscribe.startswith("<https://credits.example.com/unsubscribe/") and unsubscribe.endswith(">")
    assert email.extra_headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert unsubscribe[1:-1] in email.body
    assert Delivery.objects.get(channel="email").status == DeliveryStatus.DELIVERED


def test_a_depleted_wallet_gets_its_own_email(bob, alice):
    spend(alice, "9.97", "a")  # $10.00 → $0.03: below the threshold and below MIN_BALANCE
    deliver()
    subjects = sorted(email.subject for email in mail.outbox)
    assert subjects == ["[Tokentill] Your balance is below $1.00", "[Tokentill] Your balance is used up"]


def test_payments_and_renewals_are_emailed_but_a_renewal_only_once(client, bob, packs):
    post_ls(client, ls_order(user_id=bob.pk, variant_id=412233, total_cents=1000))
    post_ls(client, ls_subscription(user_id=bob.pk))
    post_ls(client, ls_invoice(invoice_id=1))
    deliver()
    subjects = sorted(email.subject for email in mail.outbox)
    assert subjects == [
        "[Tokentill] Payment received: $10.00 added",
        "[Tokentill] Subscription renewed: $22.00 added",
    ]


def test_the_unsubscribe_link_works_signed_out_in_one_click_and_is_idempotent(alice):
    spend(alice, "9.50", "a")
    deliver()
    link = mail.outbox[0].extra_headers["List-Unsubscribe"][1:-1].removeprefix("https://credits.example.com")
    anonymous = Client(enforce_csrf_checks=True)

    page = anonymous.get(link)  # a mail scanner's fetch changes nothing
    assert page.status_code == 200 and b"Unsubscribe" in page.content
    assert Preference.objects.filter(user=alice).count() == 0

    # RFC 8058: the mail client POSTs this body, with no cookie and no CSRF token.
    for _ in range(2):
        done = anonymous.post(link, "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
        assert done.status_code == 200 and b"data-unsubscribed" in done.content
    preference = Preference.objects.get(user=alice)
    assert not preference.email_low_balance and preference.email_payments  # only that kind

    # The next crossing is not emailed; the delivery is skipped, not failed.
    from wallet.services import wallet_credit

    wallet_credit(wallet=alice.wallet, amount=parse_usd("5"), kind="top_up", idempotency_key="t")
    spend(alice, "5", "b")
    mail.outbox.clear()
    deliver()
    assert mail.outbox == []
    assert Delivery.objects.filter(channel="email", status=DeliveryStatus.SKIPPED).count() == 1


def test_a_tampered_unsubscribe_token_is_refused(alice):
    token = unsubscribe_token(alice.pk, "email_low_balance")
    response = Client().post(f"/unsubscribe/{token[:-2]}xx")
    assert response.status_code == 400 and b"not valid" in response.content
    assert Client().post(f"/unsubscribe/{unsubscribe_token(alice.pk, 'is_staff')}").status_code == 400
    assert not Preference.objects.exists()


def test_a_mail_server_outage_is_retried_and_never_touches_the_payment(client, bob, packs, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", 1, 2  # nothing listens on port 1
    assert post_ls(client, ls_order(user_id=bob.pk, variant_id=412233, total_cents=1000)).status_code == 200
    assert Wallet.objects.get(user=bob).balance == parse_usd("10")  # the payment is in
    deliver()
    delivery = Delivery.objects.get(channel="email")
    assert delivery.status == DeliveryStatus.PENDING and delivery.attempts == 1 and delivery.last_error


# --- the portal page ---------------------------------------------------------------------------------


def test_the_settings_page_saves_a_threshold_and_email_choices(alice):
    client = Client()
    client.force_login(alice)
    page = client.get("/settings/notifications")
    assert page.status_code == 200 and b"$1.00" in page.content

    response = client.post(
        "/settings/notifications", {"threshold": "2.50", "email_low_balance": "on", "email_payments": "on"}
    )
    assert response.status_code == 302
    assert Wallet.objects.get(user=alice).low_balance_threshold == parse_usd("2.50")
    preference = Preference.objects.get(user=alice)
    assert (preference.email_low_balance, preference.email_depleted, preference.email_payments) == (True, False, True)
    assert b'value="2.5"' in client.get("/settings/notifications").content

    client.post("/settings/notifications", {"threshold": "", "email_low_balance": "on"})
    assert Wallet.objects.get(user=alice).low_balance_threshold is None  # back to the operator's default


@pytest.mark.parametrize("bad", ["abc", "-1", "1,50", "1.0000000001", "1e3"])
def test_a_threshold_that_is_not_a_money_string_is_refused_at_the_form(alice, bad):
    client = Client()
    client.force_login(alice)
    response = client.post("/settings/notifications", {"threshold": bad, "email_low_balance": "on"})
    assert response.status_code == 400
    assert b"is not an amount of money" in response.content
    assert Wallet.objects.get(user=alice).low_balance_threshold is None


def test_the_settings_page_needs_a_sign_in():
    response = Client().get("/settings/notifications")
    assert response.status_code == 302 and "/login" in response["Location"]


def test_the_users_threshold_drives_the_wallet_status_too(alice_client, alice):
    Wallet.objects.filter(user=alice).update(low_balance_threshold=parse_usd("20"))
    body = alice_client.get("/api/wallet").json()
    assert (body["status"], body["low_balance_threshold"]) == ("low", "20.000000000")
