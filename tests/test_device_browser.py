"""Browser sign-in for apps, and one-time web links, in a real browser (Debian's chromium through
Playwright) against a real server (the shipped uvicorn command, sharing the test database): the
app's side is plain HTTP, the user's side is the portal as a person would click through it.

Each test's browser comes from an address of its own (``X-Forwarded-For``, which uvicorn trusts
from loopback), so the per-address throttles of one test never reach another."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import pytest
from django.utils import timezone

from accounts.models import DeviceAuthorization, TokenFamily
from accounts.services import token_pair_issue
from tests.conftest import make_user
from tests.live import BASE_DIR, live_server
from tests.test_portal_browser import PASSWORD, TIMEOUT_MS, chromium, watch_csp  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

APP = "Acme Desktop"
_addresses = iter(range(1, 250))


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker):
    with live_server(DEVICE_USER_CODE_RATE="3/h") as url:
        yield url


@pytest.fixture
def page(chromium, server):  # noqa: F811
    context = chromium.new_context(
        base_url=server, extra_http_headers={"X-Forwarded-For": f"10.9.0.{next(_addresses)}"}
    )
    context.set_default_timeout(TIMEOUT_MS)
    violations = watch_csp(context)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()
    assert violations == [], "the Content-Security-Policy blocked something"


def local(url: str) -> str:
    """A URL the server printed (under APP_URL) as a path on the test server."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def start(server: str) -> dict:
    response = httpx.post(f"{server}/api/auth/device", json={"client_name": APP}, timeout=5)
    assert response.status_code == 200
    return response.json()


def poll(server: str, device_code: str) -> httpx.Response:
    return httpx.post(f"{server}/api/auth/device/token", json={"device_code": device_code}, timeout=5)


def log_in(page, email: str) -> None:
    page.get_by_label(re.compile("Email")).fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()


def test_an_app_signs_in_through_the_browser_and_collects_its_tokens_once(page, server):
    make_user("desk@example.com")
    codes = start(server)

    page.goto(local(codes["verification_uri_complete"]))
    page.wait_for_url(re.compile(r"/login\?next="))
    log_in(page, "desk@example.com")
    page.wait_for_url(re.compile(r"/device\?code="))
    assert page.get_by_label("Code").input_value() == codes["user_code"]
    assert poll(server, codes["device_code"]).json()["error"] == "authorization_pending"

    page.get_by_role("button", name="Continue").click()
    page.get_by_role("heading", name=f"Sign in {APP}?").wait_for()
    assert page.locator('[data-field="user-code"]').inner_text() == codes["user_code"]
    page.screenshot(path=str(BASE_DIR / "var" / "portal-device-approve.png"), full_page=True)
    page.get_by_role("button", name="Approve").click()
    assert "You approved" in page.get_by_role("status").inner_text()

    pair = poll(server, codes["device_code"])
    assert pair.status_code == 200
    me = httpx.get(f"{server}/api/auth/me", headers={"Authorization": f"Bearer {pair.json()['access']}"}, timeout=5)
    assert me.json()["email"] == "desk@example.com"
    again = poll(server, codes["device_code"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"

    page.get_by_role("link", name="Your signed-in apps").click()
    assert APP in page.locator("table.sessions").inner_text()


def test_a_new_user_signs_up_from_the_device_page_and_denies_the_app(page, server):
    codes = start(server)
    page.goto(local(codes["verification_uri_complete"]))
    page.wait_for_url(re.compile(r"/login\?next="))
    page.get_by_role("link", name="Sign up").click()
    page.get_by_label("Email").fill("fresh@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    page.wait_for_url(re.compile(r"/device\?code="))
    assert page.get_by_label("Code").input_value() == codes["user_code"]

    page.get_by_role("button", name="Continue").click()
    page.get_by_role("button", name="Deny").click()
    assert "was not signed in" in page.get_by_role("status").inner_text()
    response = poll(server, codes["device_code"])
    assert response.status_code == 400 and response.json()["error"] == "access_denied"
    assert not TokenFamily.objects.exists()


def test_wrong_and_expired_codes_are_refused_and_guessing_is_throttled(page, server):
    make_user("typo@example.com")
    codes = start(server)
    page.goto("/device")
    log_in(page, "typo@example.com")
    page.wait_for_url("**/device")

    DeviceAuthorization.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    page.get_by_label("Code").fill(codes["user_code"].lower())
    page.get_by_role("button", name="Continue").click()
    assert "not valid" in page.locator(".field .error").inner_text()
    assert poll(server, codes["device_code"]).json()["error"] == "expired_token"

    fresh = start(server)
    for _ in range(2):  # with the expired one, three wrong codes: the rate's allowance
        page.get_by_label("Code").fill("BBBB-BBBB")
        page.get_by_role("button", name="Continue").click()
        assert "not valid" in page.locator(".field .error").inner_text()
    page.get_by_label("Code").fill(fresh["user_code"])
    page.get_by_role("button", name="Continue").click()
    assert "Too many wrong codes" in page.get_by_role("alert").inner_text()
    assert poll(server, fresh["device_code"]).json()["error"] == "authorization_pending"


def test_a_web_link_signs_the_browser_in_once_and_an_app_is_signed_out_from_the_portal(page, server, chromium):  # noqa: F811
    user = make_user("linked@example.com")
    app = token_pair_issue(user=user, name=APP)
    auth = {"Authorization": f"Bearer {app.access}"}
    link = httpx.post(f"{server}/api/auth/web-link", json={"next": "/history"}, headers=auth, timeout=5)
    assert link.status_code == 201

    page.goto(local(link.json()["url"]))
    page.wait_for_url("**/history")
    assert "linked@example.com" in page.locator(".who").inner_text()  # signed in, no password asked

    other = chromium.new_context(base_url=server)
    try:
        reused = other.new_page()
        reused.goto(local(link.json()["url"]))
        assert reused.get_by_role("heading", name="This link is not valid").is_visible()
        assert reused.locator(".who").count() == 0
    finally:
        other.close()

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Apps").click()
    page.get_by_role("button", name=f"Sign out {APP}").click()
    page.wait_for_url("**/apps")
    assert "is signed out" in page.get_by_role("status").inner_text()
    assert httpx.get(f"{server}/api/auth/me", headers=auth, timeout=5).status_code == 401
    assert httpx.get(f"{server}/v1/user/balance", headers=auth, timeout=5).status_code == 401
