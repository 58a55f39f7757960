"""The portal's limits page in a real browser against a real server (see test_portal_browser)."""

# ruff: noqa: F811  (fixtures imported from test_portal_browser are redefined as arguments)

from __future__ import annotations

import pytest

from accounts.models import User
from tests.test_portal_browser import TIMEOUT_MS, chromium, page, server, sign_up  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_user_tightens_a_limit_and_is_told_they_cannot_loosen_staffs(page):
    sign_up(page, "budget@example.com")
    User.objects.filter(email="budget@example.com").update(limits={"daily_spend": "5.000000000"})
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Limits").click()
    assert "$5.000000000" in page.locator("[data-staff-limit=daily_spend]").inner_text()

    page.get_by_label("Daily spend limit (USD)").fill("8")
    page.get_by_role("button", name="Save").click()
    assert "the limit your operator set" in page.get_by_role("alert").inner_text()

    page.get_by_label("Daily spend limit (USD)").fill("2.50")
    page.get_by_label("Requests in flight at once").fill("3")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url("**/settings/limits")
    assert "saved" in page.get_by_role("status").inner_text()
    assert page.locator("[data-effective-limit=daily_spend]").inner_text() == "$2.500000000"
    assert page.locator("[data-effective-limit=max_parallel]").inner_text() == "3"

    user = User.objects.get(email="budget@example.com")
    assert user.own_limits["daily_spend"] == "2.500000000" and user.own_limits["max_parallel"] == 3
