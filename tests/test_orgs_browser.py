"""The organization flow in a real browser (chromium through Playwright) against a real server:
create an organization, invite by link, the invitee signs up from the link and joins, the owner
sets the member's limit, mints an organization key, sees the member's usage filtered by member
and removes them — all under the Content-Security-Policy (no inline scripts or styles)."""

from __future__ import annotations

import re
from decimal import Decimal

import httpx
import pytest

from accounts.models import User
from accounts.services import api_key_create
from orgs.models import Organization
from proxy.models import ModelPrice
from tests.live import BASE_DIR
from tests.test_portal_browser import PASSWORD, TIMEOUT_MS, chromium, log_in, server, sign_up, watch_csp  # noqa: F401
from wallet.models import EntryKind
from wallet.services import wallet_credit

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def browser_context(chromium, server):  # noqa: F811
    contexts, violations = [], []

    def new():
        context = chromium.new_context(base_url=server)
        context.set_default_timeout(TIMEOUT_MS)
        violations.append(watch_csp(context))
        contexts.append(context)
        return context.new_page()

    yield new
    for context in contexts:
        context.close()
    assert all(found == [] for found in violations), violations


def test_a_team_is_created_invited_limited_used_and_trimmed(browser_context, server):  # noqa: F811
    ModelPrice.objects.create(model="tokentill/demo", is_demo=True, prompt=Decimal("0.50"), completion=Decimal("1.50"))
    owner = browser_context()
    sign_up(owner, "olivia@example.com")

    # The switcher leads from "me" to the organizations.
    owner.locator("[data-org-switcher] summary").click()
    owner.get_by_role("link", name="Organizations…").click()
    owner.get_by_label("New organization name").fill("Acme Robotics")
    owner.get_by_role("button", name="Create organization").click()
    owner.wait_for_url(re.compile(r"/orgs/\d+$"))
    assert owner.locator("[data-my-role]").inner_text() == "Owner"
    org = Organization.objects.get(name="Acme Robotics")
    wallet_credit(wallet=org.wallet, amount=2 * 10**9, kind=EntryKind.TOP_UP, idempotency_key="browser:acme")

    # Invite by link; the link is shown once.
    owner.get_by_label("Email").fill("mia@example.com")
    owner.get_by_role("button", name="Invite").click()
    link = owner.get_by_role("textbox", name="Invitation link").input_value()
    assert "/orgs/join/" in link

    # The invitee has no account: she signs up from the link and comes back to accept.
    invitee = browser_context()
    invitee.goto(link)
    assert "Join Acme Robotics" in invitee.get_by_role("heading", level=1).inner_text()
    invitee.get_by_role("link", name="Sign up").click()
    invitee.get_by_label("Email").fill("mia@example.com")
    invitee.get_by_label("Password").fill(PASSWORD)
    invitee.get_by_role("button", name="Sign up").click()
    invitee.get_by_role("button", name="Accept and join").click()
    invitee.wait_for_url(re.compile(r"/orgs/\d+$"))
    assert invitee.locator("[data-my-role]").inner_text() == "Member"
    assert invitee.get_by_role("heading", name="Organization API keys").count() == 0  # not hers to see
    invitee.goto(link)  # single use
    assert "not valid" in invitee.get_by_role("heading", level=1).inner_text()

    # The owner sets her daily limit and mints an organization key.
    owner.reload()
    row = owner.locator('tr[data-member="mia@example.com"]')
    row.get_by_label("Daily").fill("1.50")
    row.get_by_role("button", name="Save").click()
    assert "role and limits saved" in owner.get_by_role("status").inner_text()
    assert owner.locator('tr[data-member="mia@example.com"]').get_by_label("Daily").input_value() == "1.500000000"
    owner.get_by_label("New key name").fill("ci")
    owner.get_by_role("button", name="Create key").click()
    org_secret = owner.get_by_label("New API key").input_value()
    assert org_secret.startswith("tt_")

    # Mia's app spends from the organization by naming it; the org key spends from it too.
    mia = User.objects.get(email="mia@example.com")
    _, mia_secret = api_key_create(user=mia, name="app")
    body = {"model": "tokentill/demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    for secret, headers in ((mia_secret, {"X-Tokentill-Org": org.slug}), (org_secret, {})):
        sent = httpx.post(
            f"{server}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {secret}", **headers},
            timeout=10,
        )
        assert sent.status_code == 200, sent.text

    # Usage, filtered by member.
    owner.reload()
    owner.get_by_label("Member", exact=True).select_option(label="mia@example.com")
    owner.get_by_role("button", name="Filter").click()
    # Spend is shown to the nanodollar: a fraction of a cent is not $0.00.
    spent = owner.locator('tr[data-member="mia@example.com"] [data-spent-today]').inner_text()
    assert spent != "0.000000000" and spent.startswith("0.0000")
    usage_rows = owner.locator("table.usage tbody tr")
    assert usage_rows.count() == 1 and "mia@example.com" in usage_rows.first.inner_text()
    owner.screenshot(path=str(BASE_DIR / "var" / "portal-org.png"), full_page=True)

    # Removing her ends her access at once.
    owner.get_by_role("button", name="Remove mia@example.com").click()
    assert "access ended at once" in owner.get_by_role("status").inner_text()
    refused = httpx.post(
        f"{server}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {mia_secret}", "X-Tokentill-Org": org.slug},
        timeout=10,
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "organization_forbidden"
    assert invitee.goto(f"/orgs/{org.pk}").status == 404
