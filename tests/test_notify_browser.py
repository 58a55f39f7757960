"""The notification settings page and an email's unsubscribe link, in a real browser against a
real server (see test_portal_browser for the set-up)."""

# ruff: noqa: F811  (fixtures imported from test_portal_browser are redefined as arguments)

from __future__ import annotations

import pytest

from accounts.models import User
from notify.emails import unsubscribe_token
from notify.models import Preference
from tests.test_portal_browser import TIMEOUT_MS, chromium, page, server, sign_up, watch_csp  # noqa: F401
from wallet.models import Wallet

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_user_sets_a_threshold_and_chooses_emails_and_a_bad_amount_is_refused(page):
    sign_up(page, "careful@example.com")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Notifications").click()
    threshold = page.get_by_label("Low-balance threshold (USD)")

    threshold.fill("two dollars")
    page.get_by_role("button", name="Save").click()
    assert "is not an amount of money" in page.get_by_role("alert").inner_text()

    threshold = page.get_by_label("Low-balance threshold (USD)")
    threshold.fill("2.50")
    page.get_by_label("Payments received, refunded or failed").uncheck()
    page.get_by_role("button", name="Save").click()
    page.wait_for_url("**/settings/notifications")
    assert "saved" in page.get_by_role("status").inner_text()
    assert page.get_by_label("Low-balance threshold (USD)").input_value() == "2.5"
    assert not page.get_by_label("Payments received, refunded or failed").is_checked()

    user = User.objects.get(email="careful@example.com")
    assert Wallet.objects.get(user=user).low_balance_threshold == 2_500_000_000
    assert Preference.objects.get(user=user).email_payments is False


def test_an_emails_unsubscribe_link_works_signed_out_with_one_click(chromium, server):
    user = User.objects.create_user(email="reader@example.com", password="x")
    context = chromium.new_context(base_url=server)  # no session: signed out
    context.set_default_timeout(TIMEOUT_MS)
    violations = watch_csp(context)
    try:
        browser_page = context.new_page()
        browser_page.goto(f"/unsubscribe/{unsubscribe_token(user.pk, 'email_low_balance')}")
        assert "reader@example.com" in browser_page.content()
        assert not Preference.objects.filter(user=user).exists()  # opening the link changed nothing
        browser_page.get_by_role("button", name="Unsubscribe").click()
        assert "no longer get" in browser_page.get_by_role("status").inner_text()
    finally:
        context.close()
    assert violations == []
    assert Preference.objects.get(user=user).email_low_balance is False
