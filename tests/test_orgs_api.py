"""``/api/orgs``: organizations, members, invitations, keys, wallet, entries and usage — and the
whole role × endpoint matrix: owner, admin, member and non-member (404 for every id)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.mail.backends.base import BaseEmailBackend
from django.utils import timezone

from accounts.models import ApiKey
from orgs.models import Invitation, Membership, Organization, Role
from orgs.services import invitation_create, organization_create
from tests.conftest import bearer_client, make_user
from wallet.models import EntryKind, Wallet
from wallet.services import wallet_credit

pytestmark = pytest.mark.django_db


@pytest.fixture
def team(db):
    """Acme: olivia owns it, adam is an admin, mia a member; nora is in no organization."""
    people = {name: make_user(f"{name}@example.com") for name in ("olivia", "adam", "mia", "nora")}
    org = organization_create(user=people["olivia"], name="Acme")
    Membership.objects.create(organization=org, user=people["adam"], role=Role.ADMIN)
    Membership.objects.create(organization=org, user=people["mia"], role=Role.MEMBER)
    wallet_credit(wallet=org.wallet, amount=5_000_000_000, kind=EntryKind.TOP_UP, idempotency_key="acme:opening")
    return org, people


def _members(org):
    return {m.user.email.split("@")[0]: m for m in Membership.objects.filter(organization=org).select_related("user")}


# Each row: (method, path template, body, expected status for owner, admin, member, non-member).
# {org}: the organization's id; {mia}: mia's membership id; {inv}: a pending invitation; {key}: an org key.
MATRIX = [
    ("get", "/api/orgs/{org}", None, (200, 200, 200, 404)),
    ("patch", "/api/orgs/{org}", {"name": "Acme Inc"}, (200, 200, 403, 404)),
    ("get", "/api/orgs/{org}/members", None, (200, 200, 200, 404)),
    ("get", "/api/orgs/{org}/members/{mia}", None, (200, 200, 200, 404)),
    ("patch", "/api/orgs/{org}/members/{mia}", {"limits": {"daily_spend": "1.50"}}, (200, 200, 403, 404)),
    ("delete", "/api/orgs/{org}/members/{mia}", None, (204, 204, 204, 404)),  # mia may leave
    ("get", "/api/orgs/{org}/invitations", None, (200, 200, 403, 404)),
    ("post", "/api/orgs/{org}/invitations", {"email": "new@example.com"}, (201, 201, 403, 404)),
    ("delete", "/api/orgs/{org}/invitations/{inv}", None, (204, 204, 403, 404)),
    ("get", "/api/orgs/{org}/keys", None, (200, 200, 403, 404)),
    ("post", "/api/orgs/{org}/keys", {"name": "ci"}, (201, 201, 403, 404)),
    ("delete", "/api/orgs/{org}/keys/{key}", None, (204, 204, 403, 404)),
    ("get", "/api/orgs/{org}/wallet", None, (200, 200, 200, 404)),
    ("get", "/api/orgs/{org}/entries", None, (200, 200, 200, 404)),
    ("get", "/api/orgs/{org}/usage", None, (200, 200, 200, 404)),
    ("get", "/api/orgs/{org}/usage/summary?by=member", None, (200, 200, 200, 404)),
]
ROLES = ["olivia", "adam", "mia", "nora"]


@pytest.mark.parametrize("who", range(4), ids=ROLES)
@pytest.mark.parametrize(("method", "path", "body", "expected"), MATRIX, ids=[f"{r[0]} {r[1]}" for r in MATRIX])
def test_the_role_matrix(team, who, method, path, body, expected):
    org, people = team
    invitation, _ = invitation_create(actor=_members(org)["olivia"], email="pending@example.com")
    from orgs.services import org_key_create

    key, _ = org_key_create(actor=_members(org)["olivia"], name="prod")
    url = path.format(org=org.pk, mia=_members(org)["mia"].pk, inv=invitation.pk, key=key.pk)
    client = bearer_client(people[ROLES[who]])
    response = getattr(client, method)(url, body, format="json") if body else getattr(client, method)(url)
    assert response.status_code == expected[who], response.content
    if expected[who] == 404:
        assert response.json() == {"detail": "no such organization"}


def test_an_unknown_organization_id_is_the_same_404_as_someone_elses(team):
    org, people = team
    client = bearer_client(people["nora"])
    assert client.get(f"/api/orgs/{org.pk}").json() == client.get("/api/orgs/999999").json()


def test_creating_an_organization_makes_its_owner_and_an_empty_wallet(db):
    nora = make_user("nora@example.com")
    client = bearer_client(nora)
    response = client.post("/api/orgs", {"name": "Nora's Lab"}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["role"] == "owner" and body["slug"] == "noras-lab"
    assert Wallet.objects.get(organization_id=body["id"]).balance == 0
    assert client.get("/api/orgs").json() == [body]
    assert client.get(f"/api/orgs/{body['id']}/wallet").json()["balance"] == "0.000000000"


def test_a_blank_name_is_a_400(db):
    client = bearer_client(make_user("nora@example.com"))
    assert client.post("/api/orgs", {"name": "  "}, format="json").status_code == 400


def test_invite_accept_once_and_only_by_the_invited_address(team):
    org, people = team
    olivia = bearer_client(people["olivia"])
    created = olivia.post(
        f"/api/orgs/{org.pk}/invitations", {"email": "Zed@Example.com", "role": "admin"}, format="json"
    )
    assert created.status_code == 201
    token = created.json()["token"]
    assert created.json()["url"].endswith(f"/orgs/join/{token}")
    assert Invitation.objects.get().token_hash != token  # only its hash is stored
    listed = olivia.get(f"/api/orgs/{org.pk}/invitations").json()
    assert listed[0]["status"] == "pending" and "token" not in listed[0]

    nora = bearer_client(people["nora"])
    refused = nora.post("/api/orgs/invitations/accept", {"token": token}, format="json")
    assert refused.status_code == 403  # not the invited address
    zed = bearer_client(make_user("zed@example.com"))
    accepted = zed.post("/api/orgs/invitations/accept", {"token": token}, format="json")
    assert accepted.status_code == 200 and accepted.json()["role"] == "admin"
    again = zed.post("/api/orgs/invitations/accept", {"token": token}, format="json")
    assert again.status_code == 404  # single use


def test_an_invitation_through_the_api_emails_its_link_once_committed(
    team, mailoutbox, django_capture_on_commit_callbacks, caplog
):
    org, people = team
    olivia = bearer_client(people["olivia"])
    with django_capture_on_commit_callbacks(execute=False) as pending:
        created = olivia.post(f"/api/orgs/{org.pk}/invitations", {"email": "Zed@Example.com"}, format="json")
        assert created.status_code == 201
        assert mailoutbox == []  # nothing leaves before the invitation is committed
    assert len(pending) == 1
    for callback in pending:
        callback()
    url = created.json()["url"]  # the inviter still sees the link once
    (mail,) = mailoutbox
    assert mail.to == ["zed@example.com"] and "Acme" in mail.subject
    assert url in mail.body and "olivia@example.com" in mail.body and "as member" in mail.body
    html, kind = mail.alternatives[0]
    assert kind == "text/html" and f'href="{url}"' in html
    assert created.json()["token"] not in caplog.text


def test_a_refused_invitation_sends_no_email(team, mailoutbox, django_capture_on_commit_callbacks):
    org, people = team
    with django_capture_on_commit_callbacks(execute=True):
        bad = bearer_client(people["olivia"]).post(f"/api/orgs/{org.pk}/invitations", {"email": "nope"}, format="json")
        member = bearer_client(people["mia"]).post(
            f"/api/orgs/{org.pk}/invitations", {"email": "x@example.com"}, format="json"
        )
    assert (bad.status_code, member.status_code) == (400, 403)
    assert mailoutbox == []


def test_a_failed_send_keeps_the_invitation_and_logs_no_token(
    team, settings, django_capture_on_commit_callbacks, caplog
):
    settings.EMAIL_BACKEND = "tests.test_orgs_api.BrokenEmailBackend"
    org, people = team
    with django_capture_on_commit_callbacks(execute=True):
        created = bearer_client(people["olivia"]).post(
            f"/api/orgs/{org.pk}/invitations", {"email": "zed@example.com"}, format="json"
        )
    assert created.status_code == 201 and Invitation.objects.filter(email="zed@example.com").exists()
    assert "could not be sent" in caplog.text and created.json()["token"] not in caplog.text


class BrokenEmailBackend(BaseEmailBackend):
    def send_messages(self, email_messages):
        raise OSError("the mail server is down")


def test_an_invitation_from_the_portal_form_emails_its_link(
    team, client, mailoutbox, django_capture_on_commit_callbacks
):
    org, people = team
    client.force_login(people["adam"])
    with django_capture_on_commit_callbacks(execute=True):
        page = client.post(f"/orgs/{org.pk}/invitations", {"email": "friend@example.com", "role": "admin"})
    assert page.status_code == 200
    (mail,) = mailoutbox
    assert mail.to == ["friend@example.com"] and "as admin" in mail.body
    link = mail.body.split("first):\n", 1)[1].split("\n", 1)[0]
    assert "/orgs/join/" in link and link in page.content.decode()  # the inviter is shown the same link


def test_expired_and_revoked_invitations_cannot_be_accepted(team):
    org, people = team
    actor = _members(org)["olivia"]
    late, late_token = invitation_create(actor=actor, email="nora@example.com")
    Invitation.objects.filter(pk=late.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    nora = bearer_client(people["nora"])
    assert nora.post("/api/orgs/invitations/accept", {"token": late_token}, format="json").status_code == 404
    revoked, revoked_token = invitation_create(actor=actor, email="nora@example.com")
    bearer_client(people["adam"]).delete(f"/api/orgs/{org.pk}/invitations/{revoked.pk}")
    assert nora.post("/api/orgs/invitations/accept", {"token": revoked_token}, format="json").status_code == 404
    assert not Membership.objects.filter(user=people["nora"]).exists()


def test_admins_cannot_touch_owners_and_the_last_owner_stays(team):
    org, people = team
    members = _members(org)
    adam, olivia = bearer_client(people["adam"]), bearer_client(people["olivia"])
    owner_url = f"/api/orgs/{org.pk}/members/{members['olivia'].pk}"
    assert adam.patch(owner_url, {"role": "member"}, format="json").status_code == 403
    assert adam.delete(owner_url).status_code == 403
    assert (
        adam.patch(f"/api/orgs/{org.pk}/members/{members['mia'].pk}", {"role": "owner"}, format="json").status_code
        == 403
    )
    assert olivia.patch(owner_url, {"role": "admin"}, format="json").status_code == 409  # the only owner
    assert olivia.delete(owner_url).status_code == 409
    assert (
        olivia.patch(f"/api/orgs/{org.pk}/members/{members['adam'].pk}", {"role": "owner"}, format="json").status_code
        == 200
    )
    assert olivia.patch(owner_url, {"role": "member"}, format="json").status_code == 200


def test_limits_are_money_strings_and_bad_ones_are_400(team):
    org, people = team
    url = f"/api/orgs/{org.pk}/members/{_members(org)['mia'].pk}"
    adam = bearer_client(people["adam"])
    body = {"limits": {"daily_spend": "1.5", "monthly_spend": "20", "allowed_models": ["openai/gpt-4o-mini"]}}
    limits = adam.patch(url, body, format="json").json()["limits"]
    assert limits == {
        "daily_spend": "1.500000000",
        "monthly_spend": "20.000000000",
        "allowed_models": ["openai/gpt-4o-mini"],
    }
    assert adam.patch(url, {"limits": {"daily_spend": "-1"}}, format="json").status_code == 400
    assert adam.patch(url, {"limits": {"daily_spend": "lots"}}, format="json").status_code == 400
    assert adam.patch(url, {"limits": {"daily_spend": 0.1}}, format="json").status_code == 400
    assert adam.patch(url, {"role": "emperor"}, format="json").status_code == 400


def test_members_see_their_own_limits_not_their_peers(team):
    org, people = team
    rows = {row["user"]["email"]: row for row in bearer_client(people["mia"]).get(f"/api/orgs/{org.pk}/members").json()}
    assert rows["mia@example.com"]["limits"] is not None
    assert rows["adam@example.com"]["limits"] is None and rows["adam@example.com"]["spend"] is None


def test_org_keys_bill_the_org_are_listed_there_and_not_among_the_makers_own(team):
    org, people = team
    adam = bearer_client(people["adam"])
    created = adam.post(f"/api/orgs/{org.pk}/keys", {"name": "ci"}, format="json").json()
    assert created["key"].startswith("tt_")
    assert ApiKey.objects.get(pk=created["id"]).organization_id == org.pk
    assert [k["id"] for k in adam.get(f"/api/orgs/{org.pk}/keys").json()] == [created["id"]]
    assert adam.get("/api/keys").json() == []
    # The organization's key works on /v1 only: on /api it is refused, it is nobody's account.
    from rest_framework.test import APIClient

    with_key = APIClient()
    with_key.credentials(HTTP_AUTHORIZATION=f"Bearer {created['key']}")
    assert with_key.get("/api/wallet").status_code == 401
    assert with_key.get(f"/api/orgs/{org.pk}").status_code == 401


def test_an_api_key_may_read_an_organization_but_not_change_it(team):
    org, people = team
    from rest_framework.test import APIClient

    from accounts.services import api_key_create

    _, secret = api_key_create(user=people["olivia"], name="script")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert client.get(f"/api/orgs/{org.pk}/members").status_code == 200
    assert client.post(f"/api/orgs/{org.pk}/keys", {"name": "x"}, format="json").status_code == 403
    assert client.post(f"/api/orgs/{org.pk}/invitations", {"email": "x@example.com"}, format="json").status_code == 403


def test_removing_a_member_revokes_the_org_keys_they_made(team):
    org, people = team
    adam = bearer_client(people["adam"])
    made = adam.post(f"/api/orgs/{org.pk}/keys", {"name": "adam's ci"}, format="json").json()
    olivia = bearer_client(people["olivia"])
    assert olivia.delete(f"/api/orgs/{org.pk}/members/{_members(org)['adam'].pk}").status_code == 204
    assert ApiKey.objects.get(pk=made["id"]).revoked_at is not None
    assert adam.get(f"/api/orgs/{org.pk}").status_code == 404


def test_the_wallet_and_entries_of_the_org(team):
    org, people = team
    wallet = bearer_client(people["mia"]).get(f"/api/orgs/{org.pk}/wallet").json()
    assert wallet["balance"] == "5.000000000"
    entries = bearer_client(people["olivia"]).get(f"/api/orgs/{org.pk}/entries").json()["results"]
    assert [(e["kind"], e["amount"], e["member"]) for e in entries] == [("top_up", "5.000000000", None)]
    # A member sees only their own entries (a top-up is nobody's).
    assert bearer_client(people["mia"]).get(f"/api/orgs/{org.pk}/entries").json()["results"] == []
    bad = bearer_client(people["olivia"]).get(f"/api/orgs/{org.pk}/entries?kind=nope")
    assert bad.status_code == 400
    assert bearer_client(people["olivia"]).get(f"/api/orgs/{org.pk}/usage?member=abc").status_code == 400
    assert bearer_client(people["olivia"]).get(f"/api/orgs/{org.pk}/usage/summary?by=planet").status_code == 400


def test_a_slug_never_reads_as_an_id(db):
    org = organization_create(user=make_user("a@example.com"), name="2024")
    assert org.slug == "org-2024"
    assert Organization.objects.count() == 1


def test_staff_see_organizations_and_their_wallets_in_the_admin(team, client):
    org, _ = team
    client.force_login(make_user("staff@example.com", is_staff=True, is_superuser=True))
    assert client.get("/admin/orgs/organization/").status_code == 200
    page = client.get(f"/admin/orgs/organization/{org.pk}/change/").content.decode()
    assert "mia@example.com" in page
    assert "Acme" in client.get("/admin/wallet/wallet/").content.decode()
    assert client.get(f"/admin/wallet/wallet/{org.wallet.pk}/change/").status_code == 200
    assert "Acme" in client.get("/admin/wallet/entry/").content.decode()
    invitation_create(actor=_members(org)["olivia"], email="x@example.com")
    listing = client.get("/admin/orgs/invitation/").content.decode()
    assert "x@example.com" in listing
    detail = client.get(f"/admin/orgs/invitation/{Invitation.objects.get().pk}/change/").content.decode()
    assert Invitation.objects.get().token_hash not in detail


def test_the_database_refuses_a_wallet_of_both_or_of_nobody(team):
    from django.db import IntegrityError, transaction

    org, people = team
    nora_wallet = Wallet.objects.get(user=people["nora"])
    with pytest.raises(IntegrityError), transaction.atomic():
        Wallet.objects.filter(pk=nora_wallet.pk).update(organization=org)  # around the model: refused
    with pytest.raises(IntegrityError), transaction.atomic():
        Wallet.objects.filter(pk=nora_wallet.pk).update(user=None)


def test_the_dashboard_names_an_overdrawn_org_wallet(team, client):
    from wallet.services import wallet_correct

    org, _ = team
    staff = make_user("staff@example.com", is_staff=True, is_superuser=True)
    wallet_correct(wallet=org.wallet, amount=-6_000_000_000, reason="test overdraft", staff_user=staff)
    client.force_login(staff)
    page = client.get("/admin/").content.decode()
    assert "<td>Acme</td>" in page


def test_the_schema_documents_the_org_endpoints_without_warnings(client, db):
    from drf_spectacular.drainage import GENERATOR_STATS

    GENERATOR_STATS.reset()
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    paths = schema["paths"]
    assert set(paths["/api/orgs"]) == {"get", "post"}
    assert set(paths["/api/orgs/{org_id}/members/{member_id}"]) == {"get", "patch", "delete"}
    assert set(paths["/api/orgs/{org_id}/usage/summary"]) == {"get"}
    assert set(paths["/api/orgs/invitations/accept"]) == {"post"}
    assert "organization" in schema["components"]["schemas"]["Input"]["properties"]  # POST /api/checkout
    assert [*GENERATOR_STATS._warn_cache, *GENERATOR_STATS._error_cache] == []


# --- the portal's organization pages: the same rules --------------------------------------------


def test_portal_pages_are_404_for_non_members_and_read_only_for_members(team, client):
    org, people = team
    client.force_login(people["nora"])
    assert client.get(f"/orgs/{org.pk}").status_code == 404
    assert client.post(f"/orgs/{org.pk}/keys", {"name": "x"}).status_code == 404
    client.force_login(people["mia"])
    page = client.get(f"/orgs/{org.pk}").content.decode()
    assert "Organization API keys" not in page and "Invite" not in page
    client.post(f"/orgs/{org.pk}/keys", {"name": "sneaky"})
    client.post(f"/orgs/{org.pk}/invitations", {"email": "friend@example.com"})
    client.post(f"/orgs/{org.pk}/members/{_members(org)['mia'].pk}", {"role": "owner", "daily_spend": ""})
    assert not ApiKey.objects.filter(organization=org).exists()
    assert not Invitation.objects.exists()
    assert _members(org)["mia"].role == Role.MEMBER
    final = client.get(f"/orgs/{org.pk}").content.decode()
    assert "only the organization&#x27;s owners and admins may do this" in final


def test_portal_limits_parse_money_strictly(team, client):
    org, people = team
    client.force_login(people["adam"])
    url = f"/orgs/{org.pk}/members/{_members(org)['mia'].pk}"
    client.post(url, {"role": "member", "daily_spend": "2.5", "monthly_spend": "", "allowed_models": "a/b, c/d"})
    mia = _members(org)["mia"]
    assert (mia.daily_spend, mia.monthly_spend, mia.allowed_models) == (2_500_000_000, None, ["a/b", "c/d"])
    client.post(url, {"role": "member", "daily_spend": "lots"})
    assert _members(org)["mia"].daily_spend == 2_500_000_000
    assert "Spend limits are USD amounts" in client.get(f"/orgs/{org.pk}").content.decode()


def test_the_switcher_lists_me_and_my_organizations(team, client):
    org, people = team
    client.force_login(people["mia"])
    page = client.get("/").content.decode()
    assert f'href="/orgs/{org.pk}"' in page and "Me (mia@example.com)" in page


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/orgs", {"name": "Evil\x00Corp"}),
        ("/orgs/{org}/keys", {"name": "k\x00"}),
        ("/orgs/{org}/invitations", {"email": "a\x00@example.com"}),
        ("/orgs/{org}/invitations", {"email": "not an address"}),
        ("/orgs/{org}/members/{mia}", {"role": "member", "allowed_models": "a/b, c\x00"}),
    ],
)
def test_portal_forms_refuse_bad_text_with_a_message_not_an_error(team, client, path, body):
    org, people = team
    client.force_login(people["olivia"])
    response = client.post(path.format(org=org.pk, mia=_members(org)["mia"].pk), body, follow=True)
    assert response.status_code in (200, 400)
    assert Organization.objects.count() == 1 and not Invitation.objects.exists()
    assert not ApiKey.objects.filter(organization=org).exists()
    assert _members(org)["mia"].allowed_models is None


@pytest.mark.parametrize("header", ["acme\x00", "x" * 300, "a b", "../acme", "-1", "0"])
def test_an_org_header_that_is_no_id_or_slug_is_simply_no_membership(team, header):
    from orgs.selectors import membership_for

    org, people = team
    assert membership_for(user=people["olivia"], org=header) is None
    assert membership_for(user=people["olivia"], org=org.slug).organization == org
