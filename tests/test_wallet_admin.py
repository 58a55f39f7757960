"""The wallet admin: read-only views, and the correction form as the one way staff move money."""

from __future__ import annotations

import re

import pytest
from django.contrib.admin.models import LogEntry

from core.money import parse_usd
from tests.conftest import make_user
from wallet.models import Entry, EntryKind, Hold
from wallet.services import hold_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


def _correct_url(wallet) -> str:
    return f"/admin/wallet/wallet/{wallet.pk}/correct/"


def _token(page) -> str:
    return re.search(r'name="token" value="([0-9a-f-]+)"', page.content.decode()).group(1)


def test_the_wallet_page_is_read_only_with_formatted_amounts_and_a_correction_link(staff_client, alice):
    hold_create(wallet=alice.wallet, amount=parse_usd("0.5"), request_id="req-adm-1")
    page = staff_client.get(f"/admin/wallet/wallet/{alice.wallet.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "10.000000000" in html and "0.500000000" in html and "9.500000000" in html
    assert "req-adm-1" in html
    assert _correct_url(alice.wallet) in html
    assert 'name="_save"' not in html
    # A POST to the change page cannot write the wallet row.
    assert staff_client.post(f"/admin/wallet/wallet/{alice.wallet.pk}/change/", {"balance": "1"}).status_code == 403
    assert staff_client.get("/admin/wallet/wallet/").status_code == 200


def test_staff_post_a_correction_through_the_form(staff_client, staff, alice):
    form = staff_client.get(_correct_url(alice.wallet))
    assert form.status_code == 200
    response = staff_client.post(
        _correct_url(alice.wallet),
        {"amount": "-1.250000001", "reason": "double-charged tool call", "token": _token(form)},
        follow=True,
    )
    assert response.status_code == 200
    assert "Posted a correction of -1.250000001 USD" in response.content.decode()
    entry = Entry.objects.get(kind=EntryKind.CORRECTION)
    assert entry.amount == -1_250_000_001
    assert entry.created_by == staff
    assert entry.description == "double-charged tool call"
    alice.wallet.refresh_from_db()
    assert alice.wallet.balance == parse_usd("8.749999999")
    assert LogEntry.objects.filter(object_id=str(alice.wallet.pk)).exists()


def test_submitting_the_same_form_twice_posts_one_correction(staff_client, alice):
    token = _token(staff_client.get(_correct_url(alice.wallet)))
    data = {"amount": "2", "reason": "goodwill", "token": token}
    staff_client.post(_correct_url(alice.wallet), data)
    again = staff_client.post(_correct_url(alice.wallet), data, follow=True)
    assert "already recorded" in again.content.decode()
    assert Entry.objects.filter(kind=EntryKind.CORRECTION).count() == 1


@pytest.mark.parametrize(
    ("amount", "reason", "error"),
    [
        ("0", "typo", "A correction cannot be zero."),
        ("1.5", "   ", "This field is required."),
        ("0.1", "", "This field is required."),
        ("abc", "x", "is not a decimal amount"),
        ("0.0000000001", "x", "more than 9 decimal places"),
    ],
)
def test_the_form_refuses_bad_corrections(staff_client, alice, amount, reason, error):
    token = _token(staff_client.get(_correct_url(alice.wallet)))
    response = staff_client.post(_correct_url(alice.wallet), {"amount": amount, "reason": reason, "token": token})
    assert response.status_code == 200
    assert error in response.content.decode()
    assert not Entry.objects.filter(kind=EntryKind.CORRECTION).exists()


def test_non_staff_cannot_reach_the_correction_form(client, alice, mallory):
    client.force_login(mallory)
    response = client.post(_correct_url(alice.wallet), {"amount": "100", "reason": "mine now", "token": "x"})
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
    assert not Entry.objects.filter(kind=EntryKind.CORRECTION).exists()


def test_staff_without_the_change_permission_cannot_correct(client, alice):
    viewer = make_user("viewer@example.com", is_staff=True)
    from django.contrib.auth.models import Permission

    viewer.user_permissions.add(Permission.objects.get(codename="view_wallet"))
    client.force_login(viewer)
    assert client.get(f"/admin/wallet/wallet/{alice.wallet.pk}/change/").status_code == 200
    assert client.get(_correct_url(alice.wallet)).status_code == 403


def test_entries_cannot_be_added_changed_or_deleted_in_the_admin(staff_client, alice):
    entry = alice.wallet.entries.get()
    listing = staff_client.get("/admin/wallet/entry/?kind__exact=top_up&q=alice")
    assert listing.status_code == 200
    assert "alice@example.com" in listing.content.decode()
    assert "delete_selected" not in listing.content.decode()
    page = staff_client.get(f"/admin/wallet/entry/{entry.pk}/change/")
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    assert staff_client.post(f"/admin/wallet/entry/{entry.pk}/change/", {"amount": "1"}).status_code == 403
    assert staff_client.post(f"/admin/wallet/entry/{entry.pk}/delete/", {"post": "yes"}).status_code == 403
    assert staff_client.get("/admin/wallet/entry/add/").status_code == 403
    assert staff_client.post(
        "/admin/wallet/entry/", {"action": "delete_selected", "_selected_action": [entry.pk], "post": "yes"}
    ).status_code in (200, 302)
    assert Entry.objects.filter(pk=entry.pk, amount=parse_usd("10")).exists()


def test_holds_are_read_only_in_the_admin(staff_client, alice):
    hold = hold_create(wallet=alice.wallet, amount=parse_usd("1"), request_id="req-adm-2")
    assert "req-adm-2" in staff_client.get("/admin/wallet/hold/?status__exact=active").content.decode()
    assert staff_client.post(f"/admin/wallet/hold/{hold.pk}/change/", {"status": "released"}).status_code == 403
    assert staff_client.post(f"/admin/wallet/hold/{hold.pk}/delete/", {"post": "yes"}).status_code == 403
    assert Hold.objects.get(pk=hold.pk).status == "active"
