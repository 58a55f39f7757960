"""The web portal through Django's test client: who sees which page, forms, CSRF, and isolation."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.auth import AuthFailed, authenticate_bearer
from accounts.models import ApiKey, User
from accounts.services import api_key_create, token_pair_issue
from payments.models import Checkout, CreditPack
from proxy.models import UsageRecord, UsageStatus
from tests.fake_payment_apis import FakeLemonSqueezy
from wallet.models import Entry, EntryKind
from wallet.services import wallet_credit


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # The default PBKDF2 work factor costs ~0.3 s per persona; it protects nothing in a test.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


PASSWORD = "correct horse battery staple"
PAGES = ["home", "keys", "history", "history_csv", "usage", "topup", "topup_done", "device", "apps"]


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def page_text(response) -> str:
    return response.content.decode()


def usage_record(user, request_id: str, *, model="openai/gpt-4o-mini", charge=3_600_000, **fields):
    return UsageRecord.objects.create(
        request_id=request_id,
        user=user,
        model=model,
        status=UsageStatus.OK,
        prompt_tokens=1200,
        completion_tokens=300,
        upstream_cost=Decimal("0.003"),
        charge=charge,
        **fields,
    )


# --- access --------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("name", PAGES)
def test_every_account_page_sends_anonymous_visitors_to_log_in(name):
    url = reverse(f"portal:{name}")
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('portal:login')}?next={url}"


@pytest.mark.parametrize("name", [n for n in PAGES if n != "history_csv"])
def test_every_account_page_renders_for_its_owner_and_is_not_cached(alice, name):
    response = logged_in(alice).get(reverse(f"portal:{name}"))
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]
    assert "alice@example.com" in page_text(response)


@pytest.mark.django_db
def test_the_topup_link_the_proxy_hands_out_is_the_portal_topup_page(settings):
    assert reverse("portal:topup") == "/topup"
    assert reverse("portal:topup_done") == "/topup/done"


# --- log in, sign up, log out ---------------------------------------------------------------------


def test_logging_in_by_email_lands_on_the_home_page(alice):
    client = Client()
    response = client.post(reverse("portal:login"), {"username": "Alice@Example.com", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == reverse("portal:home")
    assert client.get(reverse("portal:home")).status_code == 200


def test_a_wrong_password_shows_the_form_again_without_logging_in(alice):
    client = Client()
    response = client.post(reverse("portal:login"), {"username": "alice@example.com", "password": "nope"})
    assert response.status_code == 200
    assert "Please enter a correct" in page_text(response)
    assert client.get(reverse("portal:home")).status_code == 302


def test_repeated_wrong_passwords_are_throttled_even_when_the_next_one_is_right(alice, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"login": "3/min", "signup": "9/h"}}
    client = Client(REMOTE_ADDR="203.0.113.7")
    for _ in range(3):
        client.post(reverse("portal:login"), {"username": "alice@example.com", "password": "guess"})
    response = client.post(reverse("portal:login"), {"username": "alice@example.com", "password": PASSWORD})
    assert response.status_code == 429
    assert "Too many attempts" in page_text(response)
    assert client.get(reverse("portal:home")).status_code == 302


def test_signing_up_logs_in_and_shows_the_trial_credit(db, settings):
    settings.SIGNUP_TRIAL_CREDIT = Decimal("0.50")
    client = Client()
    response = client.post(reverse("portal:signup"), {"email": "Newbie@Example.com", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == reverse("portal:home")
    user = User.objects.get(email="newbie@example.com")
    assert Entry.objects.get(wallet__user=user).kind == EntryKind.TRIAL
    home = page_text(client.get(reverse("portal:home")))
    assert "$0.50" in home and "Sign-up trial credit" in home


def test_signing_up_twice_with_one_email_is_refused(alice):
    response = Client().post(reverse("portal:signup"), {"email": "ALICE@example.com", "password": PASSWORD})
    assert response.status_code == 200
    assert "already exists" in page_text(response)
    assert User.objects.filter(email__iexact="alice@example.com").count() == 1


def test_a_weak_password_is_refused_at_sign_up(db):
    response = Client().post(reverse("portal:signup"), {"email": "weak@example.com", "password": "password"})
    assert response.status_code == 200
    assert "too common" in page_text(response)
    assert not User.objects.filter(email="weak@example.com").exists()


def test_a_weak_password_is_answered_alike_whether_or_not_the_address_has_an_account(alice):
    def errors(email: str) -> tuple[int, list[str]]:
        response = Client().post(reverse("portal:signup"), {"email": email, "password": "password"})
        return response.status_code, re.findall(r'class="error"[^>]*>([^<]*)<', page_text(response))

    taken, free = errors("alice@example.com"), errors("nobody@example.com")

    assert taken == free
    assert taken[0] == 200 and "This password is too common." in taken[1][0]


def test_sign_ups_are_throttled_per_address(db, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"login": "9/min", "signup": "2/h"}}
    client = Client(REMOTE_ADDR="198.51.100.9")
    for n in range(2):
        assert client.post(reverse("portal:signup"), {"email": f"u{n}@example.com", "password": PASSWORD}).status_code
        client.logout()
    response = client.post(reverse("portal:signup"), {"email": "u9@example.com", "password": PASSWORD})
    assert response.status_code == 429
    assert not User.objects.filter(email="u9@example.com").exists()


def test_logging_out_takes_a_post_and_ends_the_session(alice):
    client = logged_in(alice)
    assert client.get(reverse("portal:logout")).status_code == 405  # a link cannot log you out
    response = client.post(reverse("portal:logout"))
    assert response.status_code == 302 and response["Location"] == reverse("portal:login")
    assert client.get(reverse("portal:home")).status_code == 302


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("signup", {"email": "x@example.com", "password": PASSWORD}),
        ("keys", {"name": "k"}),
        ("logout", {}),
        ("device", {"code": "BBBB-BBBB"}),
    ],
)
def test_every_form_needs_its_csrf_token(alice, name, data):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.post(reverse(f"portal:{name}"), data).status_code == 403


def test_every_form_on_the_pages_carries_a_csrf_token(alice):
    api_key_create(user=alice, name="laptop")
    token_pair_issue(user=alice, name="Acme Desktop")
    client = logged_in(alice)
    for name in ["keys", "topup", "home", "history", "apps", "device"]:
        html = page_text(client.get(reverse(f"portal:{name}")))
        for form in re.findall(r"<form[^>]*method=\"post\".*?</form>", html, flags=re.S):
            assert "csrfmiddlewaretoken" in form


# --- home ----------------------------------------------------------------------------------------


def test_home_shows_balance_held_available_and_recent_activity_to_six_places(alice):
    wallet_credit(
        wallet=alice.wallet, amount=1_234_567_891, kind=EntryKind.BONUS, idempotency_key="b", description="Welcome"
    )
    html = page_text(logged_in(alice).get(reverse("portal:home")))
    assert "$11.234568" in html  # 11.234567891 rounded half-up to six places for display
    assert 'title="11.234567891"' in html  # the exact amount is one hover away
    assert "Welcome" in html and "opening balance" in html
    assert "data-low-notice" in html and re.search(r"data-low-notice[^>]*hidden", html)


def test_home_warns_when_the_balance_is_too_low_to_use(bob):
    html = page_text(logged_in(bob).get(reverse("portal:home")))
    notice = re.search(r"<p class=\"notice blocked\"[^>]*>(.*?)</p>", html, flags=re.S)
    assert notice and "too low for new requests" in notice.group(1)
    assert 'href="/topup"' in notice.group(1)


def test_home_never_shows_another_users_entries(alice, mallory):
    wallet_credit(wallet=mallory.wallet, amount=10**9, kind=EntryKind.BONUS, idempotency_key="m", description="MALLORY")
    assert "MALLORY" not in page_text(logged_in(alice).get(reverse("portal:home")))


# --- API keys ------------------------------------------------------------------------------------


def test_a_new_key_is_shown_once_and_works(alice):
    client = logged_in(alice)
    response = client.post(reverse("portal:keys"), {"name": "build server"})
    assert response.status_code == 200 and response["Cache-Control"].startswith("max-age=0")
    secret = re.search(r'value="(tt_[^"]+)"', page_text(response)).group(1)
    assert authenticate_bearer(secret).user == alice
    listing = page_text(client.get(reverse("portal:keys")))
    assert "build server" in listing and secret not in listing
    assert secret[: ApiKey.PREFIX_LENGTH] in listing  # the prefix identifies it


def test_a_key_without_a_name_is_refused(alice):
    response = logged_in(alice).post(reverse("portal:keys"), {"name": "  "})
    assert response.status_code == 400
    assert not ApiKey.objects.filter(user=alice).exists()


def test_a_key_can_be_renamed_and_revoked(alice, alice_key):
    key, secret = alice_key
    client = logged_in(alice)
    assert client.post(reverse("portal:key_rename", args=[key.pk]), {"name": "old laptop"}).status_code == 302
    key.refresh_from_db()
    assert key.name == "old laptop"
    assert client.post(reverse("portal:key_revoke", args=[key.pk])).status_code == 302
    with pytest.raises(AuthFailed):
        authenticate_bearer(secret)
    listing = page_text(client.get(reverse("portal:keys")))
    assert "Revoked" in listing and f'action="/keys/{key.pk}/revoke"' not in listing


def test_nobody_can_rename_or_revoke_someone_elses_key(alice_key, mallory):
    key, _ = alice_key
    client = logged_in(mallory)
    assert client.post(reverse("portal:key_rename", args=[key.pk]), {"name": "pwned"}).status_code == 404
    assert client.post(reverse("portal:key_revoke", args=[key.pk])).status_code == 404
    key.refresh_from_db()
    assert key.name == "alice laptop" and key.revoked_at is None
    assert "alice laptop" not in page_text(client.get(reverse("portal:keys")))


# --- history -------------------------------------------------------------------------------------


def test_history_lists_and_filters_the_users_own_entries(alice, mallory):
    wallet_credit(wallet=alice.wallet, amount=10**9, kind=EntryKind.BONUS, idempotency_key="b", description="Promo")
    client = logged_in(alice)
    everything = page_text(client.get(reverse("portal:history")))
    assert "Promo" in everything and "opening balance" in everything
    assert "mallory" not in everything.lower()
    bonuses = page_text(client.get(reverse("portal:history"), {"kind": "bonus"}))
    assert "Promo" in bonuses and "opening balance" not in bonuses
    tomorrow = (timezone.now() + timedelta(days=1)).date().isoformat()
    assert "Promo" not in page_text(client.get(reverse("portal:history"), {"since": tomorrow}))
    assert "?kind=bonus" in bonuses  # the CSV link keeps the filter


def test_the_history_csv_has_exact_amounts_and_only_the_users_own_entries(alice, mallory):
    response = logged_in(alice).get(reverse("portal:history_csv"), {"kind": "top_up"})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert lines[0].startswith("id,created_at,kind,amount,balance_after")
    assert len(lines) == 2 and ",top_up,10.000000000,10.000000000,opening balance" in lines[1]


def test_a_csv_export_with_a_bad_filter_is_refused_rather_than_widened(alice):
    assert logged_in(alice).get(reverse("portal:history_csv"), {"since": "yesterday"}).status_code == 400


# --- usage ---------------------------------------------------------------------------------------


def test_usage_lists_the_users_requests_and_a_per_day_summary(alice, mallory):
    usage_record(alice, "req_alice_1", charge=1_234_000_000)
    usage_record(alice, "req_alice_2", model="anthropic/claude-sonnet-4", charge=2_000_000_000)
    usage_record(mallory, "req_mallory_1", charge=5_550_000_000)
    client = logged_in(alice)
    html = page_text(client.get(reverse("portal:usage")))
    assert "req_alice_1" in html and "req_alice_2" in html and "req_mallory_1" not in html
    assert timezone.now().date().isoformat() in html
    assert "$3.234" in html  # today's total: 1.234 + 2.000, not rounded to cents
    assert "$5.55" not in html
    filtered = page_text(client.get(reverse("portal:usage"), {"model": "anthropic/claude-sonnet-4"}))
    assert "req_alice_2" in filtered and "req_alice_1" not in filtered


# --- top-up --------------------------------------------------------------------------------------


def test_topup_lists_the_packs_and_says_when_payments_are_not_configured(alice):
    html = page_text(logged_in(alice).get(reverse("portal:topup")))
    for pack in CreditPack.objects.filter(active=True):
        assert pack.name in html
    assert "not configured" in html
    assert "<button" not in html.split('class="packs"')[1]  # no dead Buy buttons


def test_buying_a_pack_without_a_configured_provider_explains_instead_of_failing(alice, settings):
    settings.STRIPE_API_KEY = "sk_test_fake"  # configured, but no pack has a Stripe price
    response = logged_in(alice).post(reverse("portal:topup"), {"pack": "starter"})
    assert response.status_code == 503
    assert "not configured" in page_text(response)


def test_buying_a_pack_redirects_to_the_providers_hosted_checkout(alice, settings):
    CreditPack.objects.filter(slug="starter").update(lemonsqueezy_variant_id="424242")
    with FakeLemonSqueezy() as fake:
        settings.LEMONSQUEEZY_API_KEY, settings.LEMONSQUEEZY_STORE_ID = "ls_test_key", "777"
        settings.LEMONSQUEEZY_API_URL = fake.url
        response = logged_in(alice).post(reverse("portal:topup"), {"pack": "starter"})
    assert response.status_code == 302
    assert response["Location"].startswith("https://tokentill.lemonsqueezy.com/checkout/custom/")
    checkout = Checkout.objects.get(user=alice)
    assert checkout.pack.slug == "starter" and checkout.url == response["Location"]


def test_an_unknown_pack_is_a_clear_error(alice):
    response = logged_in(alice).post(reverse("portal:topup"), {"pack": "platinum"})
    assert response.status_code == 400 and "not on sale" in page_text(response)


def test_the_thank_you_page_shows_the_balance_and_subscribes_to_live_updates(alice):
    html = page_text(logged_in(alice).get(reverse("portal:topup_done"), {"checkout": "ck_x"}))
    assert "$10.00" in html and "data-live-balance" in html and "portal.js" in html


def test_pages_render_for_a_user_made_outside_sign_up(db):
    # createsuperuser makes no wallet; the portal treats that as an empty one.
    admin = User.objects.create_superuser(email="root@example.com", password=PASSWORD)
    client = logged_in(admin)
    assert "$0.00" in page_text(client.get(reverse("portal:home")))
    assert client.get(reverse("portal:topup_done")).status_code == 200


def _link(html: str, rel: str) -> str | None:
    found = re.search(rf'<a href="(\?[^"]*)" rel="{rel}"', html)
    return found.group(1).replace("&amp;", "&") if found else None


def _request_ids(html: str) -> list[str]:
    return re.findall(r'<code class="rid">(req_\d+)</code>', html)


def test_usage_pages_by_keyset_and_rows_arriving_meanwhile_shift_nothing(alice):
    start = timezone.now() - timedelta(hours=1)
    for n in range(55):
        usage_record(alice, f"req_{n:03d}", created_at=start + timedelta(seconds=n // 2))  # ties on time
    client = logged_in(alice)
    first = page_text(client.get(reverse("portal:usage")))
    assert _request_ids(first) == [f"req_{n:03d}" for n in range(54, 4, -1)]
    assert "Page 1" not in first and _link(first, "prev") is None
    for n in range(55, 60):  # five new requests land on top between the two page loads
        usage_record(alice, f"req_{n:03d}")
    older = page_text(client.get(reverse("portal:usage") + _link(first, "next")))
    assert _request_ids(older) == ["req_004", "req_003", "req_002", "req_001", "req_000"]
    assert _link(older, "next") is None
    newer = page_text(client.get(reverse("portal:usage") + _link(older, "prev")))
    assert _request_ids(newer) == [f"req_{n:03d}" for n in range(54, 4, -1)]
    top = page_text(client.get(reverse("portal:usage") + _link(newer, "prev")))  # up to the top: page one again
    assert _request_ids(top) == [f"req_{n:03d}" for n in range(59, 9, -1)]
    assert logged_in(alice).get(reverse("portal:usage"), {"after": "1.2.3"}).status_code == 400


def test_history_pages_by_keyset_within_its_filter(alice):
    for n in range(60):
        wallet_credit(wallet=alice.wallet, amount=1_000 + n, kind=EntryKind.BONUS, idempotency_key=f"b{n}")
    client = logged_in(alice)
    first = page_text(client.get(reverse("portal:history"), {"kind": "bonus"}))
    older_link = _link(first, "next")
    assert older_link.startswith("?kind=bonus&after=")
    older = page_text(client.get(reverse("portal:history") + older_link))
    shown = re.findall(r'title="\$?0\.0000010(\d\d)"', first + older)
    assert sorted(int(n) for n in shown) == list(range(60))  # every bonus once, no top-up
    assert _link(older, "next") is None
    assert client.get(reverse("portal:history"), {"before": "x"}).status_code == 400
