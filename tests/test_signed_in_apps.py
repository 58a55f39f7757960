"""Signed-in apps and one-time web links: /api/auth/me, /api/auth/sessions, the portal's /apps,
/api/auth/web-link and /auth/link/<token>, and /topup/<pack> where a link to buy a pack lands."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import TokenFamily, WebLink
from accounts.services import sha256_hex, token_pair_issue
from accounts.weblinks import web_link_create
from payments.models import Checkout
from tests import payments_fixtures as fx
from tests.conftest import race

pytestmark = pytest.mark.django_db
packs, payment_settings, fake_ls = fx.packs, fx.payment_settings, fx.fake_ls
fast_password_hashing = fx.fast_password_hashing
PASSWORD = "correct horse battery staple"


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def login(client_name=None):
    body = {"email": "alice@example.com", "password": PASSWORD}
    if client_name is not None:
        body["client_name"] = client_name
    return APIClient().post("/api/auth/token", body, format="json")


def portal(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def signed_in_user(client: Client):
    from django.contrib.auth import get_user

    class _Request:
        session = client.session

    return get_user(_Request())


# --- who am I ----------------------------------------------------------------------------------


def test_me_answers_the_signed_in_user_to_a_token_a_key_or_a_session(alice, alice_client, alice_key):
    expected = {"id": alice.pk, "email": "alice@example.com"}
    assert alice_client.get("/api/auth/me").json() == expected
    assert bearer(alice_key[1]).get("/api/auth/me").json() == expected
    assert portal(alice).get("/api/auth/me").json() == expected


def test_me_without_a_credential_is_401(db):
    assert APIClient().get("/api/auth/me").status_code == 401


# --- token families: names and last use ---------------------------------------------------------


def test_a_password_login_is_named_api_sign_in_unless_the_app_names_it(alice):
    assert login().status_code == 200
    assert login(client_name="Acme CLI").status_code == 200
    assert sorted(TokenFamily.objects.values_list("name", flat=True)) == ["API sign-in", "Acme CLI"]


@pytest.mark.parametrize("name", ["", "x" * 101, "two\nlines"])
def test_a_login_with_a_bad_client_name_is_refused(alice, name):
    response = login(client_name=name)
    assert response.status_code == 400 and "client_name" in response.json()
    assert not TokenFamily.objects.exists()


def test_last_used_is_written_at_sign_in_and_on_refresh_not_on_every_request(alice):
    pair = login().json()
    family = TokenFamily.objects.get()
    signed_in_at = family.last_used_at
    assert signed_in_at is not None

    for _ in range(3):
        assert bearer(pair["access"]).get("/api/wallet").status_code == 200
    family.refresh_from_db()
    assert family.last_used_at == signed_in_at

    assert APIClient().post("/api/auth/token/refresh", {"refresh": pair["refresh"]}, format="json").status_code == 200
    family.refresh_from_db()
    assert family.last_used_at > signed_in_at


# --- /api/auth/sessions -------------------------------------------------------------------------


def test_sessions_lists_the_active_logins_and_marks_the_current_one(alice, mallory):
    desktop = token_pair_issue(user=alice, name="Acme Desktop")
    cli = token_pair_issue(user=alice, name="Acme CLI")
    ended = token_pair_issue(user=alice, name="Old laptop")
    TokenFamily.objects.filter(pk=ended.family_id).update(revoked_at=timezone.now())
    token_pair_issue(user=mallory, name="Mallory's app")

    response = bearer(desktop.access).get("/api/auth/sessions")

    assert response.status_code == 200
    rows = response.json()
    assert {row["name"] for row in rows} == {"Acme Desktop", "Acme CLI"}
    assert set(rows[0]) == {"id", "name", "created_at", "last_used_at", "current"}
    assert {row["id"]: row["current"] for row in rows} == {str(desktop.family_id): True, str(cli.family_id): False}
    assert not any(row["current"] for row in portal(alice).get("/api/auth/sessions").json())


def test_signing_an_app_out_ends_its_refresh_and_access_tokens(alice):
    app = token_pair_issue(user=alice, name="Acme Desktop")
    me = token_pair_issue(user=alice, name="Acme CLI")

    response = bearer(me.access).delete(f"/api/auth/sessions/{app.family_id}")

    assert response.status_code == 204
    assert bearer(app.access).get("/api/wallet").status_code == 401
    refreshed = APIClient().post("/api/auth/token/refresh", {"refresh": app.refresh}, format="json")
    assert refreshed.status_code == 401
    assert TokenFamily.objects.get(pk=app.family_id).revoked_reason == "signed_out"
    assert bearer(me.access).get("/api/wallet").status_code == 200  # the other app is untouched
    assert bearer(me.access).delete(f"/api/auth/sessions/{app.family_id}").status_code == 404  # gone already


def test_nobody_can_sign_out_someone_elses_app(alice, mallory_client):
    app = token_pair_issue(user=alice, name="Acme Desktop")
    for bad in (str(app.family_id), "not-a-uuid"):
        response = mallory_client.delete(f"/api/auth/sessions/{bad}")
        assert response.status_code == 404 and response.json() == {"detail": "no such session"}
    assert TokenFamily.objects.get(pk=app.family_id).revoked_at is None


def test_an_api_key_cannot_list_or_end_sessions(alice, alice_key):
    app = token_pair_issue(user=alice)
    key = bearer(alice_key[1])
    assert key.get("/api/auth/sessions").status_code == 403
    assert key.delete(f"/api/auth/sessions/{app.family_id}").status_code == 403
    assert TokenFamily.objects.get(pk=app.family_id).revoked_at is None


# --- the portal's /apps -------------------------------------------------------------------------


def test_the_apps_page_lists_signed_in_apps_and_signs_one_out(alice):
    app = token_pair_issue(user=alice, name="Acme <Desktop>")
    browser = portal(alice)

    html = browser.get("/apps").content.decode()
    assert "Acme &lt;Desktop&gt;" in html and "Acme <Desktop>" not in html
    assert f"/apps/{app.family_id}/sign-out" in html

    response = browser.post(f"/apps/{app.family_id}/sign-out")
    assert response.status_code == 302 and response["Location"] == "/apps"
    assert "is signed out" in browser.get("/apps").content.decode()
    assert TokenFamily.objects.get(pk=app.family_id).revoked_at is not None
    assert bearer(app.access).get("/api/wallet").status_code == 401


def test_nobody_can_sign_out_someone_elses_app_in_the_portal(alice, mallory):
    app = token_pair_issue(user=alice)
    assert portal(mallory).post(f"/apps/{app.family_id}/sign-out").status_code == 404
    assert portal(mallory).get("/apps").content.decode().count("sign-out") == 0
    assert TokenFamily.objects.get(pk=app.family_id).revoked_at is None


def test_signing_out_in_the_portal_takes_a_post(alice):
    app = token_pair_issue(user=alice)
    assert portal(alice).get(f"/apps/{app.family_id}/sign-out").status_code == 405


# --- one-time web links -------------------------------------------------------------------------


def web_link(client, next="/topup"):
    return client.post("/api/auth/web-link", {"next": next}, format="json")


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


@pytest.mark.parametrize("next", ["/", "/topup", "/topup/pro", "/history", "/usage", "/keys"])
def test_a_web_link_signs_the_browser_in_and_lands_on_next(alice, alice_client, settings, next):
    response = web_link(alice_client, next)

    assert response.status_code == 201
    body = response.json()
    assert body["expires_in"] == 120
    assert body["url"].startswith(f"{settings.APP_URL}/auth/link/")
    assert token_of(body["url"]) not in str(list(WebLink.objects.values()))  # stored hashed

    browser = Client()
    landed = browser.get(body["url"].removeprefix(settings.APP_URL))
    assert landed.status_code == 302 and landed["Location"] == next
    assert signed_in_user(browser) == alice


def test_a_web_link_works_once(alice, alice_client, settings):
    path = web_link(alice_client).json()["url"].removeprefix(settings.APP_URL)
    assert Client().get(path).status_code == 302

    second = Client()
    response = second.get(path)
    assert response.status_code == 400 and "not valid" in response.content.decode()
    assert not signed_in_user(second).is_authenticated


def test_an_expired_or_unknown_web_link_signs_nobody_in(alice, alice_client, settings):
    path = web_link(alice_client).json()["url"].removeprefix(settings.APP_URL)
    WebLink.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    for url in (path, "/auth/link/not-a-token"):
        browser = Client()
        assert browser.get(url).status_code == 400
        assert not signed_in_user(browser).is_authenticated
    assert WebLink.objects.get().used_at is None


def test_a_link_checker_peeking_with_head_does_not_use_the_link_up(alice, alice_client, settings):
    path = web_link(alice_client).json()["url"].removeprefix(settings.APP_URL)
    assert Client().head(path).status_code == 405
    assert Client().get(path).status_code == 302


def test_a_web_link_of_a_disabled_account_signs_nobody_in(alice, alice_client, settings):
    path = web_link(alice_client).json()["url"].removeprefix(settings.APP_URL)
    alice.is_active = False
    alice.save()
    browser = Client()
    assert browser.get(path).status_code == 400
    assert not signed_in_user(browser).is_authenticated


@pytest.mark.parametrize(
    "next",
    [
        "https://evil.example",
        "//evil.example",
        "/\\evil",
        "/topup/../admin",
        "/admin/",
        "/topup/",
        "/topup?pack=pro",
        "/keys#x",
        "topup",
        "",
        " /topup",
        "/topup/pro/extra",
    ],
)
def test_a_web_link_can_only_lead_to_our_own_pages(alice_client, next):
    response = web_link(alice_client, next)
    assert response.status_code == 400
    assert "next" in response.json()
    assert not WebLink.objects.exists()


def test_only_the_user_themself_can_mint_a_web_link(alice, alice_key):
    assert web_link(bearer(alice_key[1])).status_code == 403
    assert web_link(APIClient()).status_code == 401
    assert not WebLink.objects.exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_browsers_opening_one_link_together_sign_in_exactly_once(settings):
    from tests.conftest import make_user

    user = make_user("racer@example.com")
    _, token = web_link_create(user=user, next="/")
    results = race(lambda _: Client().get(f"/auth/link/{token}").status_code, threads=6)
    assert sorted(results) == [302] + [400] * 5
    assert WebLink.objects.get(token_hash=sha256_hex(token)).used_at is not None


# --- /topup/<pack> ------------------------------------------------------------------------------


def test_a_pack_page_goes_straight_to_that_packs_checkout(alice, packs, fake_ls):
    response = portal(alice).get("/topup/pro")
    assert response.status_code == 302
    assert response["Location"].startswith("https://tokentill.lemonsqueezy.com/checkout/custom/")
    checkout = Checkout.objects.get(user=alice)
    assert checkout.pack.slug == "pro" and checkout.url == response["Location"]


def test_a_web_link_to_a_pack_lands_in_its_checkout(alice, alice_client, packs, fake_ls, settings):
    browser = Client()
    landed = browser.get(web_link(alice_client, "/topup/pro").json()["url"].removeprefix(settings.APP_URL))
    response = browser.get(landed["Location"])
    assert response.status_code == 302 and "lemonsqueezy.com/checkout" in response["Location"]


def test_an_unknown_pack_shows_the_pack_chooser_with_a_message(alice, packs, fake_ls):
    response = portal(alice).get("/topup/platinum")
    html = response.content.decode()
    assert response.status_code == 404
    assert "not on sale" in html and "Starter" in html and "Pro" in html
    assert not Checkout.objects.exists()


def test_a_pack_without_a_configured_provider_shows_the_chooser_and_why(alice, packs):
    response = portal(alice).get("/topup/pro")
    assert response.status_code == 503 and "not configured" in response.content.decode()


def test_a_pack_page_needs_a_signed_in_user(packs):
    response = Client().get("/topup/pro")
    assert response.status_code == 302 and response["Location"] == "/login?next=/topup/pro"
