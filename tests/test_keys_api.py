"""/api/keys: create (secret once), list, rename, limits, revoke; ownership; who may manage keys."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import ApiKey
from accounts.services import api_key_create

NO_LIMITS = {
    "rpm": None,
    "daily_spend": None,
    "monthly_spend": None,
    "allowed_models": None,
    "run_max_steps": None,
    "run_max_spend": None,
    "max_parallel": None,
    "allow_fallback": None,
    "tpm": None,
    "tpd": None,
}


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # PBKDF2 at production strength costs ~0.3 s per hash; these tests hash dozens of passwords.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def key_client(secret):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def create(client, **body):
    return client.post("/api/keys", {"name": "laptop", **body}, format="json")


# --- create and list --------------------------------------------------------------------------


def test_creating_a_key_shows_the_secret_once_and_never_in_the_list(alice_client, alice):
    created = create(alice_client, name="ci runner")

    assert created.status_code == 201
    assert created["X-Request-Id"]
    body = created.json()
    secret = body["key"]
    assert secret.startswith("tt_")
    assert secret.startswith(body["prefix"])
    assert body["name"] == "ci runner"
    assert body["scopes"] == ["proxy"]
    assert body["limits"] == NO_LIMITS
    assert body["revoked"] is False
    assert body["expires_at"] is None
    assert body["last_used_at"] is None

    listing = alice_client.get("/api/keys")
    detail = alice_client.get(f"/api/keys/{body['id']}")

    assert listing.status_code == 200
    assert [k["id"] for k in listing.json()] == [body["id"]]
    assert set(listing.json()[0]) == {
        "id",
        "name",
        "prefix",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked",
        "scopes",
        "limits",
    }
    stored_hash = ApiKey.objects.get(pk=body["id"]).key_hash
    for response in (listing, detail):
        assert secret not in response.content.decode()
        assert stored_hash not in response.content.decode()


def test_a_new_key_works_and_records_when_it_was_used(alice_client):
    body = create(alice_client).json()

    response = key_client(body["key"]).get("/api/keys")

    assert response.status_code == 200
    assert response["X-Request-Id"]
    assert ApiKey.objects.get(pk=body["id"]).last_used_at is not None
    assert alice_client.get(f"/api/keys/{body['id']}").json()["last_used_at"] is not None


def test_keys_are_listed_newest_first(alice_client):
    first = create(alice_client, name="first").json()
    second = create(alice_client, name="second").json()

    assert [k["id"] for k in alice_client.get("/api/keys").json()] == [second["id"], first["id"]]


def test_a_key_can_be_created_with_limits_and_an_expiry(alice_client):
    expires = (timezone.now() + timedelta(days=30)).replace(microsecond=0)

    response = create(
        alice_client,
        expires_at=expires.isoformat(),
        limits={
            "rpm": 60,
            "daily_spend": "5",
            "monthly_spend": "100.5",
            "allowed_models": ["openai/gpt-4o-mini"],
            "run_max_steps": 25,
            "run_max_spend": "0.5",
            "max_parallel": 4,
            "allow_fallback": True,
            "tpm": 20000,
            "tpd": 1000000,
        },
    )

    assert response.status_code == 201
    body = response.json()
    assert body["limits"] == {
        "rpm": 60,
        "daily_spend": "5.000000000",
        "monthly_spend": "100.500000000",
        "allowed_models": ["openai/gpt-4o-mini"],
        "run_max_steps": 25,
        "run_max_spend": "0.500000000",
        "max_parallel": 4,
        "allow_fallback": True,
        "tpm": 20000,
        "tpd": 1000000,
    }
    assert ApiKey.objects.get(pk=body["id"]).expires_at == expires


def test_missing_limits_default_to_no_limit(alice_client):
    response = create(alice_client, limits={"rpm": 10})

    assert response.json()["limits"] == {**NO_LIMITS, "rpm": 10}


def test_scopes_cannot_be_set_through_the_api(alice_client):
    body = create(alice_client, scopes=["proxy", "billing"]).json()
    patched = alice_client.patch(f"/api/keys/{body['id']}", {"scopes": ["billing"]}, format="json")

    assert body["scopes"] == ["proxy"]
    assert patched.json()["scopes"] == ["proxy"]
    assert ApiKey.objects.get(pk=body["id"]).scopes == ["proxy"]


@pytest.mark.parametrize(
    ("limits", "complaint"),
    [
        ({"rps": 5}, "unknown limit(s): rps"),
        ({"rpm": 0}, "rpm must be a positive"),
        ({"rpm": "60"}, "rpm must be a positive"),
        ({"rpm": True}, "rpm must be a positive"),
        ({"rpm": 2.5}, "rpm must be a positive"),
        ({"daily_spend": 5}, "must be a decimal string"),
        ({"daily_spend": 0.1}, "must be a decimal string"),
        ({"daily_spend": "lots"}, "is not a decimal amount"),
        ({"monthly_spend": "-1"}, "cannot be negative"),
        ({"monthly_spend": "0.0000000001"}, "more than 9 decimal places"),
        ({"daily_spend": "NaN"}, "is not a decimal amount"),
        ({"allowed_models": []}, "non-empty list"),
        ({"allowed_models": "gpt-4o"}, "non-empty list"),
        ({"allowed_models": ["gpt-4o", " "]}, "non-empty strings"),
        ({"allowed_models": [7]}, "non-empty strings"),
        ({"run_max_steps": 0}, "run_max_steps must be a positive"),
        ({"run_max_steps": "10"}, "run_max_steps must be a positive"),
        ({"run_max_steps": True}, "run_max_steps must be a positive"),
        ({"run_max_steps": 1.5}, "run_max_steps must be a positive"),
        ({"run_max_spend": 1}, "must be a decimal string"),
        ({"run_max_spend": "0"}, "run_max_spend must be more than zero"),
        ({"run_max_spend": "-0.5"}, "cannot be negative"),
        ({"run_max_spend": "0.0000000001"}, "more than 9 decimal places"),
        ({"max_parallel": 0}, "max_parallel must be a positive"),
        ({"max_parallel": "2"}, "max_parallel must be a positive"),
        ({"max_parallel": 1.5}, "max_parallel must be a positive"),
        ({"max_parallel": 10**30}, "max_parallel must be a positive"),
        ({"allow_fallback": "yes"}, "allow_fallback must be true or false"),
        ({"rpm": 10**9 + 1}, "at most 1000000000"),  # absurd: a typo, not a limit
        ({"tpm": "many"}, "tpm must be a positive whole number of tokens per minute"),
        ({"tpd": -5}, "tpd must be a positive"),
        ({"tpd": 10**12 + 1}, "at most 1000000000000"),
        ({"daily_spend": "1000000.000000001"}, "at most 1000000.000000000 USD"),
        (["rpm"], "must be an object"),
    ],
)
def test_invalid_limits_are_refused_with_a_clear_message(alice_client, limits, complaint):
    response = create(alice_client, limits=limits)

    assert response.status_code == 400
    assert complaint in response.json()["limits"][0]
    assert not ApiKey.objects.exists()


def test_an_expiry_in_the_past_is_refused(alice_client):
    response = create(alice_client, expires_at=(timezone.now() - timedelta(minutes=1)).isoformat())

    assert response.status_code == 400
    assert response.json() == {"expires_at": ["expires_at must be in the future"]}


def test_a_key_needs_a_name(alice_client):
    response = alice_client.post("/api/keys", {}, format="json")

    assert response.status_code == 400
    assert "name" in response.json()


# --- update and revoke ------------------------------------------------------------------------


def test_patch_renames_a_key_and_keeps_its_limits(alice_client):
    body = create(alice_client, limits={"rpm": 5}).json()

    response = alice_client.patch(f"/api/keys/{body['id']}", {"name": "renamed"}, format="json")

    assert response.status_code == 200
    assert response.json()["name"] == "renamed"
    assert response.json()["limits"]["rpm"] == 5


def test_patch_replaces_the_whole_limits_object(alice_client):
    body = create(alice_client, limits={"rpm": 5, "daily_spend": "1.00"}).json()

    replaced = alice_client.patch(f"/api/keys/{body['id']}", {"limits": {"monthly_spend": "20"}}, format="json")
    cleared = alice_client.patch(f"/api/keys/{body['id']}", {"limits": None}, format="json")

    assert replaced.json()["limits"] == {**NO_LIMITS, "monthly_spend": "20.000000000"}
    assert cleared.status_code == 200
    assert cleared.json()["limits"] == NO_LIMITS
    assert ApiKey.objects.get(pk=body["id"]).limits == NO_LIMITS


def test_patch_refuses_invalid_limits_and_changes_nothing(alice_client):
    body = create(alice_client, name="keep", limits={"rpm": 5}).json()

    response = alice_client.patch(f"/api/keys/{body['id']}", {"name": "changed", "limits": {"rpm": -1}}, format="json")

    assert response.status_code == 400
    key = ApiKey.objects.get(pk=body["id"])
    assert (key.name, key.limits["rpm"]) == ("keep", 5)


def test_deleting_a_key_revokes_it_and_keeps_it_listed(alice_client):
    body = create(alice_client).json()

    response = alice_client.delete(f"/api/keys/{body['id']}")

    assert response.status_code == 204
    assert response["X-Request-Id"]
    assert [(k["id"], k["revoked"]) for k in alice_client.get("/api/keys").json()] == [(body["id"], True)]
    assert alice_client.delete(f"/api/keys/{body['id']}").status_code == 204  # idempotent


def test_a_revoked_key_is_refused_with_401(alice_client):
    body = create(alice_client).json()
    alice_client.delete(f"/api/keys/{body['id']}")

    response = key_client(body["key"]).get("/api/keys")

    assert response.status_code == 401
    assert response.json() == {"detail": "this API key has been revoked"}
    assert response["X-Request-Id"]


def test_an_expired_key_is_refused_with_401(alice):
    key, secret = api_key_create(user=alice, name="short-lived", expires_at=timezone.now() + timedelta(hours=1))
    assert key_client(secret).get("/api/keys").status_code == 200
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    response = key_client(secret).get("/api/keys")

    assert response.status_code == 401
    assert response.json() == {"detail": "this API key has expired"}


def test_an_unknown_key_and_no_credential_are_refused_with_401(db):
    assert key_client("tt_notarealkeyatall").get("/api/keys").status_code == 401
    assert APIClient().get("/api/keys").status_code == 401


# --- ownership and blast radius ---------------------------------------------------------------


def test_mallory_cannot_see_change_or_revoke_alices_keys(alice_client, mallory_client):
    body = create(alice_client, name="alice's").json()
    url = f"/api/keys/{body['id']}"

    assert mallory_client.get("/api/keys").json() == []
    assert mallory_client.get(url).status_code == 404
    assert mallory_client.patch(url, {"name": "pwned"}, format="json").status_code == 404
    assert mallory_client.delete(url).status_code == 404
    key = ApiKey.objects.get(pk=body["id"])
    assert (key.name, key.revoked) == ("alice's", False)


def test_an_api_key_can_list_keys_but_not_manage_them(alice_client, alice_key):
    _, secret = alice_key
    other = create(alice_client, name="other").json()
    as_key = key_client(secret)

    listing = as_key.get("/api/keys")
    created = as_key.post("/api/keys", {"name": "minted by a leaked key"}, format="json")
    patched = as_key.patch(f"/api/keys/{other['id']}", {"name": "x"}, format="json")
    deleted = as_key.delete(f"/api/keys/{other['id']}")

    assert listing.status_code == 200
    assert [created.status_code, patched.status_code, deleted.status_code] == [403, 403, 403]
    assert "API keys can list keys but not" in created.json()["detail"]
    assert ApiKey.objects.filter(user=alice_key[0].user).count() == 2
    assert not ApiKey.objects.get(pk=other["id"]).revoked


def test_a_portal_session_can_manage_keys(alice):
    client = APIClient()
    client.force_login(alice)

    created = client.post("/api/keys", {"name": "from the portal"}, format="json")

    assert created.status_code == 201
    assert client.delete(f"/api/keys/{created.json()['id']}").status_code == 204


def test_a_session_write_without_a_csrf_token_is_refused(alice):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(alice)

    response = client.post("/api/keys", {"name": "cross-site"}, format="json")

    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert not ApiKey.objects.exists()
