"""The portal in a real browser (Debian's chromium through Playwright) against a real server
(the shipped uvicorn command in a subprocess, sharing the test database), WebSocket live updates
included."""

from __future__ import annotations

import io
import os
import re
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command

from accounts.services import api_key_create
from tests.conftest import make_user
from tests.live import BASE_DIR, live_server

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "correct horse battery staple"
TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        reason = f"{CHROMIUM} is not installed (scripts/ensure-chromium installs it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run on CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop running in this thread while it is open, so
    # Django's async-safety check would refuse the plain synchronous ORM calls these tests (and
    # the database flush after each) make between browser steps.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


# Each page reports a Content-Security-Policy violation as a console error of its own; the event
# listener adds what it says about the violation (which directive, which resource).
_CSP_LISTENER = """
document.addEventListener("securitypolicyviolation", (event) => {
  console.error("CSP violation: " + event.violatedDirective + " blocked " + (event.blockedURI || "inline") +
                " at " + event.sourceFile + ":" + event.lineNumber);
});
"""


def watch_csp(context) -> list[str]:
    """Every Content-Security-Policy violation that any page of ``context`` reports, as it is
    reported. The browser tests' ``page`` fixtures assert it stays empty: the portal, the admin
    and the API docs must work under the policy, not merely load."""
    violations: list[str] = []
    context.add_init_script(_CSP_LISTENER)

    def on_console(message) -> None:
        if "Content Security Policy" in message.text or message.text.startswith("CSP violation"):
            violations.append(message.text)

    context.on("console", on_console)
    return violations


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker):
    with live_server(SIGNUP_TRIAL_CREDIT="0.50") as url:
        yield url


@pytest.fixture
def page(chromium, server):
    context = chromium.new_context(base_url=server)
    context.set_default_timeout(TIMEOUT_MS)
    violations = watch_csp(context)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()
    assert violations == [], "the Content-Security-Policy blocked something"


def sign_up(page, email: str) -> None:
    page.goto("/signup")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    page.wait_for_url("**/")


def log_in(page, email: str, path: str = "/login") -> None:
    page.goto(path)
    page.get_by_label(re.compile("Email")).fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()


def balance_text(page) -> str:
    return page.locator('[data-live-balance] [data-field="balance"]').inner_text()


def test_a_visitor_signs_up_sees_the_trial_credit_and_manages_a_key(page):
    sign_up(page, "newbie@example.com")
    assert balance_text(page) == "$0.50"

    page.get_by_role("navigation", name="Main").get_by_role("link", name="API keys").click()
    page.get_by_label("New key name").fill("laptop")
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_label("New API key").input_value()
    assert secret.startswith("tt_") and len(secret) > 30
    assert page.get_by_role("button", name="Copy").is_visible()

    page.reload()  # the secret was in one response only; a reload lists keys without it
    assert page.get_by_label("New API key").count() == 0
    assert secret not in page.content()
    assert page.get_by_label(re.compile("Name of key")).input_value() == "laptop"

    page.get_by_role("button", name="Revoke key laptop").click()
    page.wait_for_url("**/keys")
    assert "revoked" in page.get_by_role("status").inner_text()
    page.screenshot(path=str(BASE_DIR / "var" / "portal-keys.png"), full_page=True)
    assert (
        httpx.get(
            page.url.replace("/keys", "/v1/user/balance"), headers={"Authorization": f"Bearer {secret}"}
        ).status_code
        == 401
    )


def test_the_history_lists_the_trial_entry(page):
    sign_up(page, "historian@example.com")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="History").click()
    row = page.locator("tbody tr").first
    assert "Trial credit" in row.inner_text() and "$0.50" in row.inner_text()


def test_a_user_logs_out_and_back_in(page):
    make_user("returning@example.com", balance="4.00")
    log_in(page, "returning@example.com")
    page.wait_for_url("**/")
    assert balance_text(page) == "$4.00"
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/login")
    page.goto("/")
    assert page.url.endswith("/login?next=/")


def test_a_credit_appears_on_the_open_home_page_without_a_reload(page, server):
    make_user("watcher@example.com", balance="10.00")
    operator = make_user("operator@example.com")
    _, billing_key = api_key_create(user=operator, name="billing", scopes=["billing"])
    log_in(page, "watcher@example.com")
    page.wait_for_url("**/")
    page.wait_for_selector("body[data-live=connected]")
    assert balance_text(page) == "$10.00"

    response = httpx.post(
        f"{server}/v1/user/balance/deposit",
        json={"user": "watcher@example.com", "amount": "2.3450005", "kind": "bonus"},
        headers={"Authorization": f"Bearer {billing_key}", "Idempotency-Key": uuid.uuid4().hex},
        timeout=5,
    )
    assert response.status_code == 201
    live = page.locator('[data-live-balance] [data-field="balance"]')
    # The script applies the server's display rule: half-up to six places, not to cents.
    live.filter(has_text="$12.345001").wait_for(timeout=2_000)
    assert live.get_attribute("title") == "12.345000500"
    page.screenshot(path=str(BASE_DIR / "var" / "portal-home.png"), full_page=True)


def test_staff_see_the_dashboard_figures_in_the_admin(page):
    make_user("boss@example.com", is_staff=True, is_superuser=True)
    make_user("spender@example.com", balance="25.00")
    log_in(page, "boss@example.com", path="/admin/login/?next=/admin/")
    page.wait_for_url("**/admin/")
    assert page.locator('[data-figure="revenue"]').inner_text() == "$0.00"
    # The ledger panel shows the last verify_ledger run's verdict; the page never checks itself.
    assert page.locator('[data-figure="ledger_balanced"]').inner_text() == "not checked"
    call_command("verify_ledger", stdout=io.StringIO())
    page.reload()
    assert page.locator('[data-figure="ledger_balanced"]').inner_text() == "yes"
    page.get_by_role("link", name="7 days").click()
    assert "last 7 days" in page.locator("#tt-dashboard-title").inner_text()
    page.screenshot(path=str(BASE_DIR / "var" / "admin-dashboard.png"), full_page=True)
