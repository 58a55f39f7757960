"""The admin's per-organization staff page (``/admin/tokentill/orgs/<id>/``): the per-user page's
counterpart — spend over time, balance, members with roles and limits, keys, the requests billed
to it with who made each, ledger entries, keyset-paginated — and the dashboard's top
organizations."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.services import api_key_revoke
from core.money import parse_usd
from orgs.models import Membership
from orgs.selectors import org_wallet
from orgs.services import org_key_create, organization_create
from proxy.models import UsageRecord
from tests.conftest import make_user
from tests.test_admin_dashboard import usage
from tests.test_staff_user_page import fast_password_hashing, rows, signed_in  # noqa: F401 (a fixture)
from wallet.services import wallet_charge, wallet_credit


def page_of(org) -> str:
    return reverse("staff_org", args=[org.pk])


def billed(org, user, request_id: str, **fields) -> UsageRecord:
    """A request ``user`` made on the organization's wallet."""
    record = usage(user, request_id, **fields)
    UsageRecord.objects.filter(pk=record.pk).update(organization=org)
    record.organization = org
    return record


@pytest.fixture
def acme(alice, bob):
    org = organization_create(user=alice, name="Acme Labs")
    Membership.objects.create(
        organization=org, user=bob, role="member", daily_spend=parse_usd("2.5"), allowed_models=["openai/gpt-4o-mini"]
    )
    wallet_credit(wallet=org_wallet(organization=org), amount=parse_usd("20"), kind="grant", idempotency_key=None)
    return org


def test_the_organizations_admin_page_links_to_the_staff_page(staff, acme):
    html = signed_in(staff).get(reverse("admin:orgs_organization_change", args=[acme.pk])).content.decode()
    assert f'href="{page_of(acme)}" data-staff-page' in html


def test_staff_see_the_wallet_spend_members_keys_requests_and_entries_at_sub_cent_precision(staff, alice, bob, acme):
    owner = Membership.objects.get(organization=acme, user=alice)
    key, _ = org_key_create(actor=owner, name="acme ci", limits={"rpm": 30})
    old, _ = org_key_create(actor=owner, name="old ci")
    api_key_revoke(key=old)
    billed(acme, bob, "req_cheap", cost="0.000100000", charge="0.000139", model="openai/gpt-4o-mini")
    billed(acme, alice, "req_yesterday", cost="1.000000000", charge="1.20", model="m", days_ago=1)
    billed(acme, alice, "req_long_ago", cost="1.000000000", charge="3.00", model="m", days_ago=45)
    usage(alice, "req_her_own", cost="0.100000000", charge="0.50", model="m")  # alice's wallet, not acme's
    wallet_charge(
        wallet=org_wallet(organization=acme),
        amount=5 * 10**7,
        idempotency_key=None,
        description="web search",
        member_id=bob.pk,
    )

    html = signed_in(staff).get(page_of(acme)).content.decode()

    assert "Acme Labs" in html and acme.slug in html
    assert 'data-figure="balance" title="19.950000000">$19.95<' in html
    spent = html.split('data-figure="spent"')[1].split("</div>")[0]
    assert 'title="1.250139000">$1.250139<' in spent and "2 requests" in spent
    assert '<span class="money" title="0.000139000">$0.000139</span>' in html
    assert rows(html, "members", "member") == ["alice@example.com", "bob@example.com"]
    members = html.split('data-table="members"')[1].split("</table>")[0]
    assert "Owner" in members and "daily spend: $2.50" in members and "models: openai/gpt-4o-mini" in members
    assert f'href="{reverse("staff_user", args=[bob.pk])}"' in members
    assert rows(html, "keys", "key") == [old.prefix, key.prefix]
    assert "requests per minute: 30" in html.split('data-table="keys"')[1].split("</table>")[0]
    assert rows(html, "requests", "request") == ["req_cheap", "req_yesterday", "req_long_ago"]
    requests = html.split('data-table="requests"')[1].split("</table>")[0]
    assert '<th scope="col">Member</th>' in requests and "<td>bob@example.com</td>" in requests
    entries = html.split('data-table="entries"')[1].split("</table>")[0]
    assert "web search" in entries and "-$0.05" in entries and "<td>bob@example.com</td>" in entries
    chart = html.split('data-chart="spend"')[1].split("</figure>")[0]
    assert "<svg" in chart and "<polyline" in chart and "<script" not in chart and "style=" not in chart


def test_requests_are_keyset_paginated(staff, bob, acme):
    from backoffice.staff_pages import PAGE_SIZE

    now = timezone.now()
    for n in range(PAGE_SIZE + 3):
        record = billed(acme, bob, f"req_{n:02d}", cost="0.000001000", charge="0.000002", model="m")
        UsageRecord.objects.filter(pk=record.pk).update(created_at=now - timedelta(minutes=n))
    client = signed_in(staff)
    first = client.get(page_of(acme)).content.decode()
    assert rows(first, "requests", "request") == [f"req_{n:02d}" for n in range(PAGE_SIZE)]
    older = re.search(r'href="([^"]+)" rel="next" data-pager="requests-older"', first).group(1).replace("&amp;", "&")
    billed(acme, bob, "req_newest", cost="0.000001000", charge="0.000002", model="m")  # arrives meanwhile
    second = client.get(page_of(acme) + older).content.decode()
    assert rows(second, "requests", "request") == [f"req_{n:02d}" for n in range(PAGE_SIZE, PAGE_SIZE + 3)]
    assert client.get(page_of(acme) + "?requests_after=abc").status_code == 400


def test_who_may_open_it(alice, acme):
    assert Client().get(page_of(acme)).status_code == 302
    assert signed_in(alice).get(page_of(acme)).status_code == 302  # the owner is not staff
    support = make_user("support@example.com", is_staff=True)
    codenames = ["view_user", "view_entry", "view_usagerecord"]
    support.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    assert signed_in(support).get(page_of(acme)).status_code == 403
    support.user_permissions.add(Permission.objects.get(codename="view_organization"))
    support = type(support).objects.get(pk=support.pk)  # Django caches permissions on the instance
    assert signed_in(support).get(page_of(acme)).status_code == 200
    assert signed_in(support).get(reverse("staff_org", args=[987654])).status_code == 404


def test_the_page_reads_a_fixed_number_of_queries_however_many_rows(staff, bob, acme, django_assert_max_num_queries):
    for n in range(40):
        billed(acme, bob, f"req_{n}", cost="0.000001000", charge="0.000002", model="m", days_ago=n % 20)
    client = signed_in(staff)
    with django_assert_max_num_queries(20):
        assert client.get(page_of(acme)).status_code == 200


def test_the_dashboard_shows_top_organizations_each_linking_to_its_staff_page(staff, bob, acme):
    other = organization_create(user=bob, name="Umbrella")
    billed(acme, bob, "r1", cost="0.100000000", charge="0.40", model="m")
    billed(other, bob, "r2", cost="0.100000000", charge="1.40", model="m")
    html = signed_in(staff).get("/admin/", {"period": "30"}).content.decode()
    chart = html.split('data-chart="top-orgs"')[1].split("</figure>")[0]
    texts = [text for text in re.findall(r"<text[^>]*>([^<]*)</text>", chart) if text]
    assert texts[:4] == ["Umbrella", "$1.40", "Acme Labs", "$0.40"]
    assert f'<a href="{page_of(acme)}"><text' in chart
    # Requests billed to an organization are its spending, not the member's.
    spenders = html.split('data-chart="top-spenders"')[1].split("</figure>")[0]
    assert "bob@example.com" not in spenders
