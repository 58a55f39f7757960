"""The accounts admin: email-based users with wallets, API keys without secrets, logins revocable."""

from __future__ import annotations

import json

import pytest
from django.core.cache import cache
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import ApiKey, RefreshToken, User
from accounts.services import api_key_create, sha256_hex, token_pair_issue
from wallet.models import Wallet

PASSWORD = "another correct horse battery"


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # PBKDF2 at production strength costs ~0.3 s per hash; these tests hash dozens of passwords.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_throttles():
    cache.clear()


@pytest.fixture
def admin_client(staff):
    client = Client()
    client.force_login(staff)
    return client


def bearer_get(token, path="/api/keys"):
    return APIClient().get(path, HTTP_AUTHORIZATION=f"Bearer {token}")


def key_form(key, **changes):
    data = {
        "name": key.name,
        "scopes": key.scopes,
        "limits": json.dumps(key.limits),
        "expires_at_0": "",
        "expires_at_1": "",
        "_save": "Save",
    }
    data.update(changes)
    return data


# --- users ------------------------------------------------------------------------------------


def test_staff_add_a_user_by_email_and_the_wallet_exists_at_once(admin_client):
    response = admin_client.post(
        "/admin/accounts/user/add/",
        {"email": "Dave@Example.com", "usable_password": "true", "password1": PASSWORD, "password2": PASSWORD},
    )

    assert response.status_code == 302, response.context["adminform"].form.errors
    dave = User.objects.get(email="dave@example.com")
    assert Wallet.objects.get(user=dave).balance == 0
    login = APIClient().post("/api/auth/token", {"email": "dave@example.com", "password": PASSWORD}, format="json")
    assert login.status_code == 200


def test_the_add_form_refuses_an_email_that_exists_in_any_case(admin_client, alice):
    response = admin_client.post(
        "/admin/accounts/user/add/",
        {"email": "ALICE@example.com", "usable_password": "true", "password1": PASSWORD, "password2": PASSWORD},
    )

    assert response.status_code == 200
    assert "already exists" in str(response.context["adminform"].form.errors["email"])
    assert User.objects.filter(email__iexact="alice@example.com").count() == 1


def test_the_user_list_shows_email_flags_and_balance(admin_client, alice, bob):
    response = admin_client.get("/admin/accounts/user/")

    assert response.status_code == 200
    page = response.content.decode()
    assert "alice@example.com" in page
    assert "10.000000000" in page
    assert "0.000000000" in page
    assert "Date joined" in page


def test_a_user_without_a_wallet_is_listed_with_a_dash(admin_client, db):
    User.objects.create_user(email="legacy@example.com", password=PASSWORD)

    response = admin_client.get("/admin/accounts/user/?q=legacy")

    assert response.status_code == 200
    page = response.content.decode()
    assert "legacy@example.com" in page
    assert '<td class="field-balance">—</td>' in page


def test_staff_can_edit_a_user_and_saving_keeps_one_wallet(admin_client, alice):
    page = admin_client.get(f"/admin/accounts/user/{alice.pk}/change/")
    assert page.status_code == 200
    assert "10.000000000" in page.content.decode()

    response = admin_client.post(
        f"/admin/accounts/user/{alice.pk}/change/",
        {
            "email": "alice@example.com",
            "is_active": "on",
            "date_joined_0": "2025-01-01",
            "date_joined_1": "00:00:00",
            "_save": "Save",
        },
    )

    assert response.status_code == 302, response.context["adminform"].form.errors
    alice.refresh_from_db()
    assert alice.is_active
    assert Wallet.objects.filter(user=alice).count() == 1
    assert alice.wallet.balance == 10_000_000_000


# --- API keys ---------------------------------------------------------------------------------


def test_the_key_page_never_shows_the_secret_or_its_hash(admin_client, alice_key):
    key, secret = alice_key

    pages = [admin_client.get("/admin/accounts/apikey/"), admin_client.get(f"/admin/accounts/apikey/{key.pk}/change/")]

    for page in pages:
        assert page.status_code == 200
        body = page.content.decode()
        assert key.prefix in body
        assert secret not in body
        assert key.key_hash not in body


def test_staff_grant_the_billing_scope(admin_client, alice_key):
    key, _ = alice_key

    response = admin_client.post(f"/admin/accounts/apikey/{key.pk}/change/", key_form(key, scopes=["proxy", "billing"]))

    assert response.status_code == 302, response.context["adminform"].form.errors
    key.refresh_from_db()
    assert key.scopes == ["proxy", "billing"]
    assert "proxy, billing" in admin_client.get("/admin/accounts/apikey/").content.decode()


def test_the_admin_normalises_limits_with_the_api_rules(admin_client, alice_key):
    key, _ = alice_key

    response = admin_client.post(
        f"/admin/accounts/apikey/{key.pk}/change/", key_form(key, limits=json.dumps({"daily_spend": "2.5"}))
    )

    assert response.status_code == 302
    key.refresh_from_db()
    assert key.limits == {
        "rpm": None,
        "daily_spend": "2.500000000",
        "monthly_spend": None,
        "allowed_models": None,
        "run_max_steps": None,
        "run_max_spend": None,
        "max_parallel": None,
        "allow_fallback": None,
        "tpm": None,
        "tpd": None,
    }


def test_the_admin_refuses_invalid_limits(admin_client, alice_key):
    key, _ = alice_key

    response = admin_client.post(
        f"/admin/accounts/apikey/{key.pk}/change/", key_form(key, limits=json.dumps({"daily_spend": 3.5}))
    )

    assert response.status_code == 200
    assert "must be a decimal string" in str(response.context["adminform"].form.errors["limits"])
    key.refresh_from_db()
    assert key.limits["daily_spend"] is None


def test_the_admin_refuses_a_max_parallel_that_is_not_a_number(admin_client, alice_key):
    key, _ = alice_key

    response = admin_client.post(
        f"/admin/accounts/apikey/{key.pk}/change/", key_form(key, limits=json.dumps({"max_parallel": "four"}))
    )

    assert response.status_code == 200
    assert "max_parallel must be a positive" in str(response.context["adminform"].form.errors["limits"])


def test_staff_revoke_keys_with_the_action_and_the_key_stops_working(admin_client, alice, alice_key):
    key, secret = alice_key
    _, other_secret = api_key_create(user=alice, name="kept")

    response = admin_client.post(
        "/admin/accounts/apikey/", {"action": "revoke", "_selected_action": [key.pk], "index": 0}
    )

    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked
    assert bearer_get(secret).status_code == 401
    assert bearer_get(other_secret).status_code == 200


def test_keys_cannot_be_added_or_deleted_in_the_admin(admin_client, alice_key):
    key, _ = alice_key

    assert admin_client.get("/admin/accounts/apikey/add/").status_code == 403
    assert admin_client.post(f"/admin/accounts/apikey/{key.pk}/delete/", {"post": "yes"}).status_code == 403
    assert ApiKey.objects.filter(pk=key.pk).exists()


# --- token families ---------------------------------------------------------------------------


def test_logins_are_read_only_and_staff_can_revoke_one(admin_client, alice):
    pair = token_pair_issue(user=alice)
    other = token_pair_issue(user=alice)
    family = RefreshToken.objects.get(token_hash=sha256_hex(pair.refresh)).family

    listing = admin_client.get("/admin/accounts/tokenfamily/")
    edit = admin_client.post(f"/admin/accounts/tokenfamily/{family.pk}/change/", {"revoked_reason": "meddled"})
    revoke = admin_client.post(
        "/admin/accounts/tokenfamily/", {"action": "revoke", "_selected_action": [str(family.pk)], "index": 0}
    )

    assert listing.status_code == 200
    assert "alice@example.com" in listing.content.decode()
    assert edit.status_code == 403
    assert revoke.status_code == 302
    family.refresh_from_db()
    assert (family.revoked_reason, family.revoked_at is not None) == ("staff", True)
    assert bearer_get(pair.access).status_code == 401
    assert bearer_get(other.access).status_code == 200
    assert admin_client.get("/admin/accounts/tokenfamily/add/").status_code == 403


def test_people_who_are_not_staff_cannot_reach_the_accounts_admin(alice):
    client = Client()
    client.force_login(alice)

    response = client.get("/admin/accounts/apikey/")

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
