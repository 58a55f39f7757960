"""The failed sign-in policy, the same on all three sign-in surfaces: the portal's ``/login``, the
admin's ``/admin/login/`` and ``/api/auth/token``.

Failures count per client address and per (account, address), in buckets the three share. The
account-wide count only slows a distributed guesser down — each address that has failed for an
account under attack loses its further attempts — and never blocks an address that has not
itself failed, so nobody can lock an owner out by failing from rotating addresses.
"""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.test import Client
from rest_framework.test import APIClient

from accounts.forms import THROTTLED
from tests.conftest import make_user

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # PBKDF2 at production strength costs ~0.3 s per hash; these tests hash dozens of passwords.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _three_failures_per_minute(settings):
    cache.clear()
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "login": "3/min"},
    }
    yield
    cache.clear()


@pytest.fixture
def owner(db):
    # Staff, so that the admin's sign-in accepts the right password too.
    return make_user("owner@example.com", is_staff=True)


def api(email: str, password: str, addr: str) -> str:
    response = APIClient().post(
        "/api/auth/token", {"email": email, "password": password}, format="json", REMOTE_ADDR=addr
    )
    return {200: "signed in", 401: "refused", 429: "throttled"}[response.status_code]


def _form(path: str, email: str, password: str, addr: str) -> str:
    client = Client(REMOTE_ADDR=addr)
    response = client.post(path, {"username": email, "password": password})
    if response.status_code == 302:
        return "signed in"
    text = response.content.decode()
    if response.status_code == 429:
        assert THROTTLED in text
        return "throttled"
    assert response.status_code == 200 and THROTTLED not in text
    return "refused"


def portal(email: str, password: str, addr: str) -> str:
    return _form("/login", email, password, addr)


def staff_admin(email: str, password: str, addr: str) -> str:
    return _form("/admin/login/", email, password, addr)


SURFACES = [pytest.param(api, id="api"), pytest.param(portal, id="portal"), pytest.param(staff_admin, id="admin")]


def test_staff_sign_in_is_throttled_even_when_the_next_password_is_right(owner):
    client = Client(REMOTE_ADDR="203.0.113.5")
    for _ in range(3):
        wrong = client.post("/admin/login/", {"username": "owner@example.com", "password": "guess"})
        assert wrong.status_code == 200 and "Please enter the correct" in wrong.content.decode()

    response = client.post("/admin/login/", {"username": "owner@example.com", "password": PASSWORD})

    assert response.status_code == 429
    page = response.content.decode()
    assert THROTTLED in page and 'id="login-form"' in page  # the admin's own page, with the reason
    assert client.get("/admin/").status_code == 302  # not signed in


@pytest.mark.parametrize("first", SURFACES)
@pytest.mark.parametrize("then", SURFACES)
def test_failures_on_any_sign_in_surface_count_on_every_other(owner, first, then):
    others = [surface for surface in (api, portal, staff_admin) if surface is not first][:2]
    for surface in (first, *others):
        assert surface("owner@example.com", "guess", "198.51.100.4") == "refused"

    assert then("owner@example.com", PASSWORD, "198.51.100.4") == "throttled"
    assert then("owner@example.com", PASSWORD, "198.51.100.5") == "signed in"


@pytest.mark.parametrize("surface", SURFACES)
def test_failures_from_rotating_addresses_never_lock_the_owner_out(owner, surface):
    # Twice the limit, each from a fresh address: the per-account count is long past full.
    for n in range(6):
        assert surface("owner@example.com", "guess", f"10.9.0.{n}") == "refused"

    assert surface("owner@example.com", PASSWORD, "192.0.2.10") == "signed in"


@pytest.mark.parametrize("surface", SURFACES)
def test_an_account_under_attack_gives_an_address_that_failed_for_it_no_further_attempt(owner, surface):
    for n in range(3):
        assert surface("owner@example.com", "guess", f"10.9.1.{n}") == "refused"

    # Under attack: the addresses that failed get nothing more, even the right password…
    assert surface("owner@example.com", PASSWORD, "10.9.1.0") == "throttled"
    # …and each new address gets one guess, then joins them.
    assert surface("owner@example.com", "guess", "10.9.1.7") == "refused"
    assert surface("owner@example.com", "guess", "10.9.1.7") == "throttled"


def test_an_address_that_failed_only_for_other_accounts_is_not_held_back(owner):
    make_user("colleague@example.com")
    assert api("colleague@example.com", "typo", "192.0.2.20") == "refused"
    for n in range(3):
        assert api("owner@example.com", "guess", f"10.9.2.{n}") == "refused"

    assert api("owner@example.com", PASSWORD, "192.0.2.20") == "signed in"


def test_an_address_held_back_is_told_when_to_retry(owner):
    for n in range(3):
        api("owner@example.com", "guess", f"10.9.3.{n}")

    response = APIClient().post(
        "/api/auth/token", {"email": "owner@example.com", "password": PASSWORD}, format="json", REMOTE_ADDR="10.9.3.0"
    )

    assert response.status_code == 429
    assert 0 < int(response["Retry-After"]) <= 60


def test_a_right_password_of_someone_not_staff_at_the_admin_is_no_failure(db):
    make_user("user@example.com")
    for _ in range(4):
        assert staff_admin("user@example.com", PASSWORD, "192.0.2.30") == "refused"

    assert api("user@example.com", PASSWORD, "192.0.2.30") == "signed in"
