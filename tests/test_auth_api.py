"""/api/auth/*: sign-up, login, refresh-token rotation and reuse detection, logout, throttling."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from django.core import signing
from django.core.cache import cache
from rest_framework.test import APIClient

from accounts.models import TokenFamily, User
from accounts.services import ACCESS_SALT
from wallet.models import Entry, EntryKind
from wallet.services import wallet_credit

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # PBKDF2 at production strength costs ~0.3 s per hash; these tests hash dozens of passwords.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_throttles():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def client():
    return APIClient()


def set_rates(settings, **rates):
    # Replacing REST_FRAMEWORK fires setting_changed, which makes DRF reload api_settings.
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], **rates},
    }


def signup(client, email="carol@example.com", password=PASSWORD, addr="10.0.0.1", **extra):
    body = {"email": email, "password": password}
    return client.post("/api/auth/signup", body, format="json", REMOTE_ADDR=addr, **extra)


def login(client, email="alice@example.com", password=PASSWORD, addr="10.0.0.1"):
    return client.post("/api/auth/token", {"email": email, "password": password}, format="json", REMOTE_ADDR=addr)


def refresh(client, token, **extra):
    return client.post("/api/auth/token/refresh", {"refresh": token}, format="json", **extra)


def keys_with(client, access):
    return client.get("/api/keys", HTTP_AUTHORIZATION=f"Bearer {access}")


# --- sign-up ----------------------------------------------------------------------------------


def test_signup_creates_the_account_and_logs_it_in(client, db):
    response = signup(client, email="Carol@Example.COM")

    assert response.status_code == 201
    assert response["X-Request-Id"]
    body = response.json()
    user = User.objects.get(pk=body["user"]["id"])
    assert body["user"] == {"id": user.pk, "email": "carol@example.com"}
    assert user.check_password(PASSWORD)
    assert user.wallet.balance == 0
    assert keys_with(client, body["access"]).status_code == 200
    assert refresh(client, body["refresh"]).status_code == 200


def test_signup_without_a_trial_credit_leaves_the_wallet_empty(client, db, settings):
    settings.SIGNUP_TRIAL_CREDIT = Decimal("0")

    user = User.objects.get(pk=signup(client).json()["user"]["id"])

    assert user.wallet.balance == 0
    assert not Entry.objects.filter(wallet=user.wallet).exists()


def test_signup_grants_the_trial_credit_exactly_once(client, db, settings):
    settings.SIGNUP_TRIAL_CREDIT = Decimal("1.50")

    user = User.objects.get(pk=signup(client).json()["user"]["id"])
    # Re-running the sign-up credit for the same user id (a retried job, a second code path)
    # must be a replay, not a second trial.
    replay = wallet_credit(
        wallet=user.wallet,
        amount=1_500_000_000,
        kind=EntryKind.TRIAL,
        idempotency_key=f"trial:signup:{user.pk}",
        description="Sign-up trial credit",
    )

    user.wallet.refresh_from_db()
    assert replay.replayed is True
    assert user.wallet.balance == 1_500_000_000
    assert Entry.objects.filter(wallet=user.wallet, kind=EntryKind.TRIAL).count() == 1


def test_signup_refuses_an_email_that_exists_in_any_case(client, alice):
    response = signup(client, email="ALICE@example.com")

    assert response.status_code == 400
    assert "already exists" in response.json()["email"][0]
    assert User.objects.filter(email__iexact="alice@example.com").count() == 1


@pytest.mark.parametrize(
    ("password", "complaint"),
    [
        ("short", "too short"),
        ("password123", "too common"),
        ("8412957301", "entirely numeric"),
        ("carol@example", "too similar"),
    ],
)
def test_signup_applies_the_password_validators(client, db, password, complaint):
    response = signup(client, password=password)

    assert response.status_code == 400
    assert complaint in " ".join(response.json()["password"])
    assert not User.objects.filter(email="carol@example.com").exists()


@pytest.mark.parametrize("password", ["password", "short", "8412957301"])
def test_a_weak_password_is_answered_alike_whether_or_not_the_address_has_an_account(client, alice, password):
    taken = signup(client, email="alice@example.com", password=password)
    free = signup(client, email="nobody@example.com", password=password)

    assert (taken.status_code, taken.json()) == (free.status_code, free.json())
    assert list(taken.json()) == ["password"]


def test_signup_refuses_a_malformed_email(client, db):
    response = signup(client, email="not-an-email")

    assert response.status_code == 400
    assert "email" in response.json()


def test_signups_are_throttled_per_client_address(client, db, settings):
    set_rates(settings, signup="2/h")

    assert signup(client, email="a@example.com", addr="10.0.0.1").status_code == 201
    assert signup(client, email="bad", addr="10.0.0.1").status_code == 400  # failures count too
    throttled = signup(client, email="b@example.com", addr="10.0.0.1")
    elsewhere = signup(client, email="c@example.com", addr="10.0.0.2")

    assert throttled.status_code == 429
    assert 0 < int(throttled["Retry-After"]) <= 3600
    assert throttled["X-Request-Id"]
    assert "detail" in throttled.json()
    assert not User.objects.filter(email="b@example.com").exists()
    assert elsewhere.status_code == 201


def test_a_forged_x_forwarded_for_buys_no_fresh_signup_allowance(client, db, settings):
    # The server decides the client address (uvicorn trusts X-Forwarded-For only from
    # FORWARDED_ALLOW_IPS and puts the result in REMOTE_ADDR); the throttle must not re-read the
    # header, which any client can write.
    set_rates(settings, signup="1/h")

    first = signup(client, email="a@example.com", HTTP_X_FORWARDED_FOR="198.51.100.1")
    forged = signup(client, email="b@example.com", HTTP_X_FORWARDED_FOR="198.51.100.2")

    assert (first.status_code, forged.status_code) == (201, 429)


# --- login ------------------------------------------------------------------------------------


def test_token_returns_a_pair_for_correct_credentials(client, alice, settings):
    response = login(client, email=" Alice@Example.com ")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access", "refresh", "expires_in"}
    assert body["expires_in"] == settings.ACCESS_TOKEN_TTL
    assert keys_with(client, body["access"]).status_code == 200


def test_token_refuses_a_wrong_password_with_401(client, alice):
    response = login(client, password="not the password")

    assert response.status_code == 401
    assert response.json() == {"detail": "invalid email or password"}
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert response["X-Request-Id"]


def test_token_refuses_an_unknown_email_and_a_disabled_account_alike(client, alice):
    alice.is_active = False
    alice.save()

    assert login(client).status_code == 401
    assert login(client, email="nobody@example.com").status_code == 401


def test_failed_logins_are_throttled_per_address_but_a_fresh_address_still_logs_in(client, alice, settings):
    set_rates(settings, login="3/min")
    for email in ("x@example.com", "y@example.com", "z@example.com"):  # spraying accounts
        assert login(client, email=email, password="guess", addr="10.6.6.6").status_code == 401

    blocked = login(client, addr="10.6.6.6")  # even the right password: the address is blocked
    fresh = login(client, addr="10.0.0.9")

    assert blocked.status_code == 429
    assert 0 < int(blocked["Retry-After"]) <= 60
    assert blocked.json()["detail"].startswith("Too many failed logins. Expected available in")
    assert fresh.status_code == 200


# Failures spread over many addresses against one account: tests/test_login_throttle.py, which
# holds the policy for all three sign-in surfaces.


def test_successful_logins_are_never_throttled(client, alice, settings):
    set_rates(settings, login="2/min")

    statuses = [login(client).status_code for _ in range(5)]

    assert statuses == [200] * 5


def test_a_missing_field_is_a_400_not_a_401(client, db):
    response = client.post("/api/auth/token", {"email": "alice@example.com"}, format="json")

    assert response.status_code == 400
    assert "password" in response.json()


# --- refresh, reuse, logout -------------------------------------------------------------------


def test_refresh_rotates_the_pair_and_the_old_refresh_token_stops_working(client, alice):
    first = login(client).json()

    second = refresh(client, first["refresh"])

    assert second.status_code == 200
    pair = second.json()
    assert set(pair) == {"access", "refresh", "expires_in"}
    assert pair["refresh"] != first["refresh"]
    assert keys_with(client, pair["access"]).status_code == 200
    assert refresh(client, pair["refresh"]).status_code == 200


def test_reusing_a_refresh_token_revokes_the_whole_login(client, alice):
    first = login(client).json()
    other_device = login(client).json()
    second = refresh(client, first["refresh"]).json()

    reuse = refresh(client, first["refresh"])  # a thief (or the owner) replays the old token

    assert reuse.status_code == 401
    assert "reuse" in reuse.json()["detail"]
    # Everything descended from that login is dead: the rotated pair and the first access token.
    assert keys_with(client, second["access"]).status_code == 401
    assert keys_with(client, first["access"]).status_code == 401
    assert refresh(client, second["refresh"]).status_code == 401
    # Another login of the same user is a different family and carries on.
    assert keys_with(client, other_device["access"]).status_code == 200
    assert TokenFamily.objects.filter(user=alice, revoked_reason="refresh_token_reuse").count() == 1


def test_refresh_refuses_an_unknown_token(client, db):
    response = refresh(client, "ttr_not-a-real-token")

    assert response.status_code == 401
    assert response.json() == {"detail": "unknown refresh token"}


def test_refresh_ignores_a_stale_authorization_header(client, alice):
    pair = login(client).json()

    response = refresh(client, pair["refresh"], HTTP_AUTHORIZATION="Bearer expired-or-garbage")

    assert response.status_code == 200


def test_logout_revokes_the_refresh_token_and_its_access_tokens(client, alice):
    pair = login(client).json()

    response = client.post("/api/auth/logout", {"refresh": pair["refresh"]}, format="json")

    assert response.status_code == 204
    assert response["X-Request-Id"]
    assert refresh(client, pair["refresh"]).status_code == 401
    assert keys_with(client, pair["access"]).status_code == 401


def test_logout_refuses_an_unknown_refresh_token(client, db):
    response = client.post("/api/auth/logout", {"refresh": "ttr_nope"}, format="json")

    assert response.status_code == 401


def test_an_expired_access_token_is_refused(client, alice):
    family = TokenFamily.objects.create(user=alice)

    class SignedAnHourAgo(signing.TimestampSigner):
        def timestamp(self):
            return signing.b62_encode(int(time.time()) - 3600)

    stale = SignedAnHourAgo(salt=ACCESS_SALT).sign_object({"f": str(family.pk)}, compress=False)
    fresh = signing.dumps({"f": str(family.pk)}, salt=ACCESS_SALT, compress=False)

    response = keys_with(client, stale)

    assert response.status_code == 401
    assert response.json() == {"detail": "access token expired"}
    assert keys_with(client, fresh).status_code == 200


def test_access_tokens_expire_after_the_configured_ttl(client, alice, settings):
    access = login(client).json()["access"]

    settings.ACCESS_TOKEN_TTL = -1  # every token is now older than its lifetime

    assert keys_with(client, access).status_code == 401
