"""HTTPS deployment settings and the Content-Security-Policy (issue 11, item 3), through the shipped
server: an APP_URL on https turns on HSTS and Secure cookies, each overridable; the CSP is sent on
every page. (That the pages pass it in a browser: tests/test_security_browser.py.)"""

from __future__ import annotations

import httpx
import pytest

from tests.live import live_server
from tests.test_settings import load_settings

pytestmark = pytest.mark.django_db(transaction=True)

HTTPS = {"X-Forwarded-Proto": "https"}  # from 127.0.0.1, which uvicorn trusts by default (FORWARDED_ALLOW_IPS)
SETTINGS = "settings.SECURE_HSTS_SECONDS, settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE"


def test_an_https_app_url_turns_on_hsts_and_secure_cookies_by_default():
    https = load_settings(SETTINGS, APP_URL="https://billing.example.com")
    plain = load_settings(SETTINGS, APP_URL="http://127.0.0.1:8000")

    assert https.stdout.split() == ["31536000", "True", "True"], https.stderr
    assert plain.stdout.split() == ["0", "False", "False"], plain.stderr


def test_each_https_setting_can_be_overridden():
    result = load_settings(
        SETTINGS + ", settings.SECURE_HSTS_INCLUDE_SUBDOMAINS, settings.CONTENT_SECURITY_POLICY",
        APP_URL="https://billing.example.com",
        SECURE_HSTS_SECONDS="600",
        SESSION_COOKIE_SECURE="false",
        CSRF_COOKIE_SECURE="false",
        SECURE_HSTS_INCLUDE_SUBDOMAINS="true",
        CSP="off",
    )
    assert result.stdout.split() == ["600", "False", "False", "True", "None"], result.stderr
    forced = load_settings(SETTINGS, APP_URL="http://127.0.0.1:8000", SESSION_COOKIE_SECURE="true")
    assert forced.stdout.split() == ["0", "True", "False"]


@pytest.mark.parametrize(("name", "value"), [("CSP", "maybe"), ("SECURE_HSTS_SECONDS", "a year")])
def test_a_security_setting_it_cannot_understand_stops_start_up(name, value):
    result = load_settings(**{name: value})
    assert result.returncode != 0 and name in result.stderr


@pytest.fixture(scope="module")
def https_server(django_db_setup, django_db_blocker):
    with live_server(APP_URL="https://billing.example.com") as url:
        yield url


def test_over_https_the_server_sends_hsts_and_marks_its_cookies_secure(https_server):
    response = httpx.get(f"{https_server}/login", headers=HTTPS)

    assert response.status_code == 200
    assert response.headers["strict-transport-security"] == "max-age=31536000"
    csrf_cookie = next(value for key, value in response.headers.multi_items() if key == "set-cookie")
    assert csrf_cookie.startswith("csrftoken=") and "Secure" in csrf_cookie
    # Over plain HTTP (a health check inside the network) browsers would ignore HSTS; Django omits it.
    assert "strict-transport-security" not in httpx.get(f"{https_server}/login").headers


@pytest.mark.parametrize("path", ["/login", "/signup", "/admin/login/", "/api/docs/", "/v1/docs"])
def test_every_page_carries_the_content_security_policy(https_server, path):
    response = httpx.get(f"{https_server}{path}", headers=HTTPS)

    assert response.status_code == 200, path
    policy = dict(
        directive.strip().split(" ", 1) for directive in response.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'"  # no 'unsafe-inline', no CDN
    assert policy["style-src"] == "'self'"
    assert policy["object-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'"
