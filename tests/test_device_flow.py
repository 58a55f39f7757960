"""Browser sign-in for apps (RFC 8628's device flow) through HTTP: the app's two endpoints with
DRF's client, the user's /device page with Django's, and the guarantees underneath — codes
stored hashed, single use, slow_down, expiry, and throttles against floods and guessing."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.db import IntegrityError
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from accounts import device
from accounts.models import DeviceAuthorization, DeviceStatus, TokenFamily
from accounts.services import sha256_hex
from tests.conftest import make_user, race

pytestmark = pytest.mark.django_db

APP = "Acme Desktop"
USER_CODE = re.compile(r"[BCDFGHJKMNPQRSTVWXZ]{4}-[BCDFGHJKMNPQRSTVWXZ]{4}")


@pytest.fixture(autouse=True)
def _fresh_throttles(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    cache.clear()
    yield
    cache.clear()


def set_rates(settings, **rates):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], **rates},
    }


def start(client_name=APP, addr="10.0.0.1"):
    return APIClient().post("/api/auth/device", {"client_name": client_name}, format="json", REMOTE_ADDR=addr)


def poll(device_code, addr="10.0.0.1"):
    return APIClient().post("/api/auth/device/token", {"device_code": device_code}, format="json", REMOTE_ADDR=addr)


def portal(user, addr="10.0.0.9") -> Client:
    client = Client(REMOTE_ADDR=addr)
    client.force_login(user)
    return client


def decide(client, user_code, decision=None):
    data = {"code": user_code}
    if decision:
        data["decision"] = decision
    return client.post("/device", data)


def poll_later(device_code):
    """Poll as if the interval had passed since the last poll."""
    DeviceAuthorization.objects.filter(device_code_hash=sha256_hex(device_code)).update(last_polled_at=None)
    return poll(device_code)


# --- the app asks for codes --------------------------------------------------------------------


def test_an_app_gets_a_device_code_and_a_user_code_to_show(settings):
    response = start()

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "device_code",
        "user_code",
        "verification_uri",
        "verification_uri_complete",
        "expires_in",
        "interval",
    }
    assert USER_CODE.fullmatch(body["user_code"])
    assert body["verification_uri"] == f"{settings.APP_URL}/device"
    assert body["verification_uri_complete"] == f"{settings.APP_URL}/device?code={body['user_code']}"
    assert (body["expires_in"], body["interval"]) == (600, 5)
    assert body["device_code"].startswith("ttd_") and len(body["device_code"]) > 40


def test_codes_are_stored_hashed_and_only_the_app_name_in_clear():
    body = start().json()

    row = DeviceAuthorization.objects.get()
    stored = " ".join(str(value) for value in row.__dict__.values())
    assert body["device_code"] not in stored
    assert body["user_code"] not in stored and body["user_code"].replace("-", "") not in stored
    assert row.device_code_hash == sha256_hex(body["device_code"])
    assert (row.client_name, row.status, row.user) == (APP, DeviceStatus.PENDING, None)


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "bad\nname", "tab\there"])
def test_an_app_name_must_be_1_to_100_printable_characters(name):
    response = start(client_name=name)
    assert response.status_code == 400 and "client_name" in response.json()
    assert not DeviceAuthorization.objects.exists()


def test_new_codes_are_throttled_per_client_address(settings):
    set_rates(settings, device_code="2/h")
    assert [start().status_code for _ in range(3)] == [200, 200, 429]
    refused = start()
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert start(addr="10.0.0.2").status_code == 200
    assert DeviceAuthorization.objects.count() == 3


def test_a_user_code_colliding_with_a_pending_one_is_drawn_again(monkeypatch):
    first = start().json()["user_code"].replace("-", "")
    draws = iter(first + "B" * 8)  # the same code again, then another
    monkeypatch.setattr(device.secrets, "choice", lambda alphabet: next(draws))

    second = start().json()["user_code"]

    assert second == "BBBB-BBBB" != first
    assert DeviceAuthorization.objects.count() == 2


def test_the_database_refuses_two_pending_authorizations_with_one_user_code():
    start()
    row = DeviceAuthorization.objects.get()
    row.pk, row.device_code_hash = None, "other"
    with pytest.raises(IntegrityError):
        row.save(force_insert=True)


def test_a_user_code_may_come_back_once_the_old_one_is_no_longer_pending():
    start()
    row = DeviceAuthorization.objects.get()
    DeviceAuthorization.objects.filter(pk=row.pk).update(status=DeviceStatus.REDEEMED)
    row.pk, row.device_code_hash = None, "other"
    row.save(force_insert=True)
    assert DeviceAuthorization.objects.count() == 2


# --- the app polls -----------------------------------------------------------------------------


def test_polling_before_the_user_decides_is_authorization_pending():
    response = poll(start().json()["device_code"])
    assert response.status_code == 400
    assert response.json()["error"] == "authorization_pending" and response.json()["detail"]


def test_polling_faster_than_the_interval_is_slow_down_and_the_interval_grows():
    code = start().json()["device_code"]
    assert poll(code).json()["error"] == "authorization_pending"

    fast = poll(code)
    assert fast.status_code == 400
    assert fast.json()["error"] == "slow_down" and fast.json()["interval"] == 10
    assert poll(code).json()["interval"] == 15  # still too fast: and again
    assert DeviceAuthorization.objects.get().interval == 15

    # Once the (new) interval has passed the app is answered normally again.
    DeviceAuthorization.objects.update(last_polled_at=timezone.now() - timedelta(seconds=15))
    assert poll(code).json()["error"] == "authorization_pending"


def test_a_poll_on_time_is_not_slowed_down():
    code = start().json()["device_code"]
    poll(code)
    DeviceAuthorization.objects.update(last_polled_at=timezone.now() - timedelta(seconds=5))
    assert poll(code).json()["error"] == "authorization_pending"


def test_the_interval_stops_growing_at_a_minute():
    code = start().json()["device_code"]
    for _ in range(20):
        poll(code)
    assert DeviceAuthorization.objects.get().interval == device.MAX_INTERVAL == 60


def test_an_unknown_device_code_is_invalid_grant():
    response = poll("ttd_not-a-code")
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    assert poll("").status_code == 400


def test_polls_are_throttled_per_client_address(settings):
    set_rates(settings, device_poll="3/min")
    code = start().json()["device_code"]
    assert [poll_later(code).status_code for _ in range(4)] == [400, 400, 400, 429]
    assert poll_later(code).status_code == 429
    assert poll(code, addr="10.0.0.2").status_code == 400


def test_an_expired_code_is_expired_token_and_cannot_be_approved(alice):
    body = start().json()
    DeviceAuthorization.objects.update(expires_at=timezone.now() - timedelta(seconds=1))

    assert poll(body["device_code"]).json()["error"] == "expired_token"
    response = decide(portal(alice), body["user_code"], "approve")
    assert response.status_code == 400 and "not valid" in response.content.decode()
    assert DeviceAuthorization.objects.get().status == DeviceStatus.PENDING


# --- the user decides on /device ---------------------------------------------------------------


def test_the_whole_flow_approved_yields_the_token_pair_exactly_once(alice):
    body = start().json()
    browser = portal(alice)

    page = browser.get("/device", {"code": body["user_code"]})
    assert page.status_code == 200 and f'value="{body["user_code"]}"' in page.content.decode()
    confirm = decide(browser, body["user_code"])
    assert confirm.status_code == 200
    html = confirm.content.decode()
    assert APP in html and body["user_code"] in html and "Approve" in html and "Deny" in html
    assert DeviceAuthorization.objects.get().status == DeviceStatus.PENDING  # looking is not approving

    done = decide(browser, body["user_code"], "approve")
    assert done.status_code == 200 and "is signed in" in done.content.decode()

    pair = poll(body["device_code"])
    assert pair.status_code == 200
    tokens = pair.json()
    assert set(tokens) == {"access", "refresh", "expires_in"}
    me = APIClient().get("/api/auth/me", HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")
    assert me.json() == {"id": alice.pk, "email": "alice@example.com"}
    family = TokenFamily.objects.get(user=alice)
    assert family.name == APP
    row = DeviceAuthorization.objects.get()
    assert (row.status, row.user, row.family) == (DeviceStatus.REDEEMED, alice, family)

    again = poll(body["device_code"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert TokenFamily.objects.count() == 1


def test_the_code_may_be_typed_in_any_case_without_the_dash():
    alice = make_user("typist@example.com")
    body = start().json()
    typed = " " + body["user_code"].replace("-", " ").lower() + " "
    response = decide(portal(alice), typed, "approve")
    assert response.status_code == 200
    assert DeviceAuthorization.objects.get().status == DeviceStatus.APPROVED


def test_a_denied_sign_in_is_access_denied_and_never_yields_tokens(alice):
    body = start().json()
    browser = portal(alice)
    denied = decide(browser, body["user_code"], "deny")
    assert denied.status_code == 200 and "denied" in denied.content.decode()

    response = poll(body["device_code"])
    assert response.status_code == 400 and response.json()["error"] == "access_denied"
    assert decide(browser, body["user_code"], "approve").status_code == 400  # decided once
    assert poll(body["device_code"]).json()["error"] == "access_denied"
    assert not TokenFamily.objects.exists()


def test_a_code_is_decided_once(alice, mallory):
    body = start().json()
    assert decide(portal(alice), body["user_code"], "approve").status_code == 200
    assert decide(portal(mallory), body["user_code"], "approve").status_code == 400
    assert decide(portal(alice), body["user_code"], "deny").status_code == 400
    assert DeviceAuthorization.objects.get().user == alice
    assert poll(body["device_code"]).status_code == 200


def test_a_malformed_code_is_explained_and_not_looked_up(alice):
    response = decide(portal(alice), "0O1I-L")
    assert response.status_code == 400 and "8 letters" in response.content.decode()


def test_the_page_needs_a_signed_in_user_and_keeps_the_code_through_log_in(alice):
    body = start().json()
    browser = Client()

    response = browser.get("/device", {"code": body["user_code"]})
    assert response.status_code == 302
    login_url = response["Location"]
    assert login_url.startswith("/login?next=") and body["user_code"] in login_url.replace("%2D", "-")
    form = browser.get(login_url).content.decode()
    next_page = f"/device?code={body['user_code']}"
    assert f'name="next" value="{next_page}"' in form
    assert f"/signup?next=/device%3Fcode%3D{body['user_code']}" in form

    logged_in = browser.post(
        "/login", {"username": "alice@example.com", "password": "correct horse battery staple", "next": next_page}
    )
    assert logged_in.status_code == 302 and logged_in["Location"] == next_page


def test_signing_up_from_the_page_comes_back_with_the_code(db):
    body = start().json()
    next_page = f"/device?code={body['user_code']}"
    browser = Client()
    form = browser.get("/signup", {"next": next_page}).content.decode()
    assert f'name="next" value="{next_page}"' in form

    response = browser.post(
        "/signup", {"email": "newbie@example.com", "password": "correct horse battery staple", "next": next_page}
    )
    assert response.status_code == 302 and response["Location"] == next_page
    assert browser.get(next_page).status_code == 200


def test_sign_up_ignores_a_next_page_on_another_site(db):
    response = Client().post(
        "/signup",
        {"email": "newbie@example.com", "password": "correct horse battery staple", "next": "https://evil.example/"},
    )
    assert response.status_code == 302 and response["Location"] == "/"


def test_wrong_codes_are_throttled_per_user_even_when_the_next_one_is_right(settings, alice):
    set_rates(settings, device_user_code="3/h")
    body = start().json()
    browser = portal(alice)
    for _ in range(3):
        assert decide(browser, "BBBB-BBBB", "approve").status_code == 400

    refused = decide(browser, body["user_code"], "approve")
    assert refused.status_code == 429 and "Too many wrong codes" in refused.content.decode()
    assert DeviceAuthorization.objects.get().status == DeviceStatus.PENDING
    # Someone else, elsewhere, is not held up by alice's typos.
    other = make_user("other@example.com")
    assert decide(portal(other, addr="10.0.0.10"), body["user_code"], "approve").status_code == 200


def test_wrong_codes_are_throttled_per_address_across_accounts(settings, alice, mallory):
    set_rates(settings, device_user_code="3/h")
    body = start().json()
    for user in (alice, mallory, alice):
        decide(portal(user, addr="10.6.6.6"), "BBBB-BBBB")
    fresh = make_user("sockpuppet@example.com")
    assert decide(portal(fresh, addr="10.6.6.6"), body["user_code"]).status_code == 429
    assert decide(portal(fresh, addr="10.0.0.11"), body["user_code"]).status_code == 200


def test_right_codes_never_count_as_guesses(settings, alice):
    set_rates(settings, device_user_code="2/h")
    browser = portal(alice)
    for _ in range(4):
        code = start().json()["user_code"]
        assert decide(browser, code).status_code == 200
        assert decide(browser, code, "deny").status_code == 200


def test_the_decision_needs_a_csrf_token(alice):
    body = start().json()
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    assert decide(browser, body["user_code"], "approve").status_code == 403
    assert DeviceAuthorization.objects.get().status == DeviceStatus.PENDING


# --- concurrency (PostgreSQL: real parallel requests) -------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_parallel_polls_of_an_approved_code_get_the_pair_exactly_once():
    alice = make_user("racer@example.com")
    body = start().json()
    device.device_authorization_approve(user_code=body["user_code"].replace("-", ""), user=alice)

    results = race(lambda _: poll(body["device_code"]), threads=8)

    statuses = sorted(response.status_code for response in results)
    assert statuses == [200] + [400] * 7, results
    assert {r.json()["error"] for r in results if r.status_code == 400} == {"invalid_grant"}
    assert TokenFamily.objects.filter(user=alice).count() == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_parallel_polls_of_a_pending_code_are_one_on_time_the_rest_slow_down():
    code = start().json()["device_code"]
    results = race(lambda _: poll(code), threads=6)
    errors = sorted(response.json()["error"] for response in results)
    assert errors == ["authorization_pending"] + ["slow_down"] * 5, errors
