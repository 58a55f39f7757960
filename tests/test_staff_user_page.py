"""The admin's per-user staff page (``/admin/tokentill/users/<id>/``): spend over time, balance,
limits, keys, recent requests and ledger entries, keyset-paginated; who may open it."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.services import api_key_create, api_key_revoke
from backoffice.staff_pages import PAGE_SIZE
from proxy.models import UsageRecord
from tests.conftest import make_user
from tests.test_admin_dashboard import usage
from wallet.services import wallet_charge


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def page_of(user) -> str:
    return reverse("staff_user", args=[user.pk])


def rows(html: str, table: str, attribute: str) -> list[str]:
    body = html.split(f'data-table="{table}"')[1].split("</table>")[0]
    return re.findall(rf'data-{attribute}="([^"]+)"', body)


def test_the_users_admin_page_links_to_the_staff_page(staff, alice):
    html = signed_in(staff).get(reverse("admin:accounts_user_change", args=[alice.pk])).content.decode()
    assert f'href="{page_of(alice)}" data-staff-page' in html


def test_staff_see_balance_spend_keys_limits_requests_and_entries_at_sub_cent_precision(staff, alice):
    key, _ = api_key_create(user=alice, name="laptop agent", limits={"rpm": 60, "daily_spend": "2.5"})
    old, _ = api_key_create(user=alice, name="old script")
    api_key_revoke(key=old)
    usage(alice, "req_cheap", cost="0.000100000", charge="0.000139", model="openai/gpt-4o-mini")
    usage(alice, "req_yesterday", cost="1.000000000", charge="1.20", model="anthropic/claude-sonnet-4", days_ago=1)
    usage(alice, "req_long_ago", cost="1.000000000", charge="3.00", model="openai/gpt-4o-mini", days_ago=45)
    wallet_charge(wallet=alice.wallet, amount=5 * 10**7, idempotency_key="charge:search", description="web search")

    html = signed_in(staff).get(page_of(alice)).content.decode()

    assert "alice@example.com" in html
    # The wallet paid 0.05 in tool charges only: usage records here were written without a debit.
    assert 'data-figure="balance" title="9.950000000">$9.95<' in html
    # Last 30 days: 0.000139 + 1.20 of usage and 0.05 of tools; the 45-day-old request is outside.
    spent = html.split('data-figure="spent"')[1].split("</div>")[0]
    assert 'title="1.250139000">$1.250139<' in spent and "2 requests" in spent
    # The request that cost $0.000139 is shown as such, never as $0.00.
    assert '<span class="money" title="0.000139000">$0.000139</span>' in html
    assert rows(html, "requests", "request") == ["req_cheap", "req_yesterday", "req_long_ago"]
    assert rows(html, "keys", "key") == [old.prefix, key.prefix]
    keys = html.split('data-table="keys"')[1].split("</table>")[0]
    assert "requests per minute: 60" in keys and "daily spend: $2.50" in keys and "revoked" in keys
    entries = html.split('data-table="entries"')[1].split("</table>")[0]
    assert "web search" in entries and "-$0.05" in entries
    # The chart: server-rendered SVG with nothing a strict CSP would block.
    chart = html.split('data-chart="spend"')[1].split("</figure>")[0]
    assert "<svg" in chart and "<polyline" in chart and "<script" not in chart and "style=" not in chart
    assert "model usage " in chart and ": 0.000139000 USD" in chart


def test_the_period_moves_the_spend_but_not_the_lists(staff, alice):
    usage(alice, "req_long_ago", cost="1.000000000", charge="3.00", model="openai/gpt-4o-mini", days_ago=45)
    client = signed_in(staff)
    month = client.get(page_of(alice), {"period": "30"}).content.decode()
    quarter = client.get(page_of(alice), {"period": "90"}).content.decode()
    assert "Nothing spent in this period." in month and "<polyline" not in month
    assert "$3.00" in quarter.split('data-figure="spent"')[1].split("</div>")[0]
    assert rows(month, "requests", "request") == rows(quarter, "requests", "request") == ["req_long_ago"]


def test_requests_are_keyset_paginated_and_a_new_request_does_not_shift_the_next_page(staff, alice):
    now = timezone.now()
    for n in range(PAGE_SIZE + 5):
        record = usage(alice, f"req_{n:02d}", cost="0.000001000", charge="0.000002", model="m")
        UsageRecord.objects.filter(pk=record.pk).update(created_at=now - timedelta(minutes=n))
    client = signed_in(staff)
    first = client.get(page_of(alice)).content.decode()
    assert rows(first, "requests", "request") == [f"req_{n:02d}" for n in range(PAGE_SIZE)]
    older = re.search(r'href="([^"]+)" rel="next" data-pager="requests-older"', first).group(1).replace("&amp;", "&")

    usage(alice, "req_newest", cost="0.000001000", charge="0.000002", model="m")  # arrives meanwhile
    second = client.get(page_of(alice) + older).content.decode()
    assert rows(second, "requests", "request") == [f"req_{n:02d}" for n in range(PAGE_SIZE, PAGE_SIZE + 5)]
    assert 'data-pager="requests-older"' not in second and 'data-pager="requests-newest"' in second


def test_ledger_entries_are_keyset_paginated_too(staff, alice):
    for n in range(PAGE_SIZE + 1):
        wallet_charge(wallet=alice.wallet, amount=10**6, idempotency_key=f"charge:{n}", description=f"tool {n}")
    client = signed_in(staff)
    first = client.get(page_of(alice)).content.decode()
    assert len(rows(first, "entries", "entry")) == PAGE_SIZE
    older = re.search(r'href="([^"]+)" rel="next" data-pager="entries-older"', first).group(1).replace("&amp;", "&")
    second = client.get(page_of(alice) + older).content.decode()
    # One charge left, then the opening credit: 27 entries in all (sign-up credit + 26).
    assert len(rows(second, "entries", "entry")) == 2
    assert set(rows(first, "entries", "entry")).isdisjoint(rows(second, "entries", "entry"))


@pytest.mark.parametrize(
    "cursor", ["requests_after=abc", "requests_after=1.2.3", "entries_after=-4", "entries_after=9" * 30]
)
def test_a_cursor_this_page_never_wrote_is_a_400_not_a_500(staff, alice, cursor):
    response = signed_in(staff).get(page_of(alice) + "?" + cursor)
    assert response.status_code == 400


def test_an_unknown_user_is_a_404(staff):
    assert signed_in(staff).get(reverse("staff_user", args=[987654])).status_code == 404


def test_people_who_are_not_staff_are_sent_to_the_admin_login(alice, bob):
    response = signed_in(bob).get(page_of(alice))
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    response = Client().get(page_of(alice))
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_staff_without_access_to_accounts_ledger_and_usage_get_403(alice):
    support = make_user("support@example.com", is_staff=True)
    support.user_permissions.add(Permission.objects.get(codename="view_user"))
    assert signed_in(support).get(page_of(alice)).status_code == 403
    support.user_permissions.add(
        Permission.objects.get(codename="view_entry"), Permission.objects.get(codename="view_usagerecord")
    )
    support = type(support).objects.get(pk=support.pk)  # Django caches permissions on the instance
    assert signed_in(support).get(page_of(alice)).status_code == 200


def test_the_page_reads_a_fixed_number_of_queries_however_many_rows(staff, alice, django_assert_max_num_queries):
    for n in range(40):
        usage(alice, f"req_{n}", cost="0.000001000", charge="0.000002", model="m", days_ago=n % 20)
    api_key_create(user=alice, name="a")
    api_key_create(user=alice, name="b")
    client = signed_in(staff)
    with django_assert_max_num_queries(20):
        assert client.get(page_of(alice)).status_code == 200


def test_requests_made_on_an_organizations_wallet_are_listed_but_not_spent_from_the_users(staff, alice):
    from orgs.services import organization_create

    acme = organization_create(user=alice, name="Acme Labs")
    usage(alice, "req_own", cost="0.100000000", charge="0.12", model="openai/gpt-4o-mini")
    on_org = usage(alice, "req_for_acme", cost="1.000000000", charge="1.20", model="openai/gpt-4o-mini")
    UsageRecord.objects.filter(pk=on_org.pk).update(organization=acme)

    html = signed_in(staff).get(page_of(alice)).content.decode()

    # Acme's wallet paid for that one: it is Acme's spend (its own page, the top spenders).
    spent = html.split('data-figure="spent"')[1].split("</div>")[0]
    assert 'title="0.120000000">$0.12<' in spent and "1 request" in spent
    assert rows(html, "requests", "request") == ["req_for_acme", "req_own"]  # newest first
