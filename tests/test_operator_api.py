"""The operator API (``/api/admin/…``): who may call it (the role matrix over every endpoint),
what each endpoint does, idempotent grants and corrections, and the audit log of every call."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.db.utils import DatabaseError
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import ApiKey, Scope, TokenFamily
from accounts.services import api_key_create, api_key_revoke, operator_key_create, token_pair_issue
from backoffice.models import AppendOnlyError, AuditEntry
from core.money import parse_usd
from orgs.models import Membership, Organization
from orgs.selectors import org_wallet
from orgs.services import org_key_create, organization_create
from tests.conftest import make_user
from tests.test_admin_dashboard import payment, usage
from tests.test_ws_events import CLOSE_WAIT, access_token, bearer, expect_refusal, listening, still_listening
from wallet.models import Entry
from wallet.services import wallet_charge, wallet_credit

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def root(db):
    return make_user("root@example.com", is_staff=True, is_superuser=True)


@pytest.fixture
def ops(db):
    """A staff member (not a superuser) who runs the back office."""
    return make_user("ops@example.com", is_staff=True)


@pytest.fixture
def operator_secret(ops, root):
    _, secret = operator_key_create(user=ops, name="back office", minted_by=root)
    return secret


def client_with(secret: str | None) -> APIClient:
    client = APIClient()
    if secret is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


@pytest.fixture
def operator(operator_secret) -> APIClient:
    return client_with(operator_secret)


@pytest.fixture
def alice_login(alice):
    return token_pair_issue(user=alice, name="alice desktop")


def balance_of(user) -> int:
    user.wallet.refresh_from_db()
    return user.wallet.balance


# --- the role matrix --------------------------------------------------------------------------


@pytest.fixture
def acme(alice):
    """(organization, its API key): alice's organization, with a key of its own."""
    org = organization_create(user=alice, name="Acme Labs")
    key, _ = org_key_create(actor=Membership.objects.get(organization=org, user=alice), name="acme ci")
    return org, key


def endpoints(alice, alice_key, alice_login, acme):
    """(method, path, body, headers, status an operator gets) for every operator endpoint."""
    user = f"/api/admin/users/{alice.pk}"
    org = f"/api/admin/orgs/{acme[0].pk}"
    key = f"{user}/keys/{alice_key[0].pk}"
    return [
        ("get", "/api/admin/users?q=alice", None, {}, 200),
        ("get", user, None, {}, 200),
        ("get", f"{user}/entries", None, {}, 200),
        ("get", f"{user}/usage", None, {}, 200),
        ("patch", key, {"limits": {"rpm": 5}}, {}, 200),
        ("post", f"{key}/revoke", None, {}, 200),
        ("post", f"{user}/sessions/{alice_login.family_id}/revoke", None, {}, 200),
        ("post", f"{user}/sign-out", None, {}, 200),
        ("post", f"{user}/grants", {"amount": "1.00", "reason": "goodwill"}, {"HTTP_IDEMPOTENCY_KEY": "g-1"}, 201),
        ("post", f"{user}/corrections", {"amount": "-0.50", "reason": "fix"}, {"HTTP_IDEMPOTENCY_KEY": "c-1"}, 201),
        ("post", f"{user}/disable", None, {}, 200),
        ("post", f"{user}/enable", None, {}, 200),
        ("get", "/api/admin/orgs?q=acme", None, {}, 200),
        ("get", org, None, {}, 200),
        ("get", f"{org}/entries", None, {}, 200),
        ("get", f"{org}/usage", None, {}, 200),
        ("post", f"{org}/keys/{acme[1].pk}/revoke", None, {}, 200),
        ("patch", f"{org}/members/{alice.pk}", {"daily_spend": "3.00"}, {}, 200),
        ("post", f"{org}/disable", None, {}, 200),
        ("post", f"{org}/enable", None, {}, 200),
        ("post", f"{org}/grants", {"amount": "1.00", "reason": "goodwill"}, {"HTTP_IDEMPOTENCY_KEY": "g-1"}, 201),
        ("post", f"{org}/corrections", {"amount": "-0.50", "reason": "fix"}, {"HTTP_IDEMPOTENCY_KEY": "c-1"}, 201),
        ("get", "/api/admin/reports/money?group_by=week", None, {}, 200),
        ("get", "/api/admin/reports/usage?group_by=user", None, {}, 200),
        ("get", "/api/admin/reports/top-spenders", None, {}, 200),
        ("get", "/api/admin/reports/liabilities", None, {}, 200),
    ]


def call(client, method, path, body, headers):
    return getattr(client, method)(path, body, format="json", **headers)


def credential(kind: str, *, alice, alice_key, ops, root) -> str | None:
    if kind == "none":
        return None
    if kind == "customer key":
        return alice_key[1]
    if kind == "customer token":
        return token_pair_issue(user=alice).access
    if kind == "staff key without the admin scope":
        return api_key_create(user=ops, name="ops proxy key")[1]
    if kind == "staff token":
        return token_pair_issue(user=root).access
    key, secret = operator_key_create(user=ops, name="soon revoked", minted_by=root)
    if kind == "revoked operator key":
        api_key_revoke(key=key)
    elif kind == "operator key of former staff":
        ops.is_staff = False
        ops.save(update_fields=["is_staff"])
    return secret


REFUSED = [
    ("none", 401, None),
    ("customer key", 403, "operator_key_required"),
    ("customer token", 403, "operator_key_required"),
    ("staff key without the admin scope", 403, "operator_key_required"),
    ("staff token", 403, "operator_key_required"),
    ("revoked operator key", 401, None),
    ("operator key of former staff", 403, "not_staff"),
]


@pytest.mark.parametrize(("kind", "status", "code"), REFUSED, ids=[row[0] for row in REFUSED])
def test_only_an_operator_key_of_active_staff_opens_any_endpoint(
    kind, status, code, alice, alice_key, alice_login, acme, ops, root
):
    secret = credential(kind, alice=alice, alice_key=alice_key, ops=ops, root=root)
    before = balance_of(alice)
    for method, path, body, headers, _ in endpoints(alice, alice_key, alice_login, acme):
        response = call(client_with(secret), method, path, body, headers)
        assert response.status_code == status, (method, path, response.content)
        if code:
            assert response.json()["code"] == code
    # Nothing was done: no money moved, nothing revoked or disabled.
    assert balance_of(alice) == before
    alice.refresh_from_db()
    assert alice.is_active
    assert ApiKey.objects.get(pk=alice_key[0].pk).revoked_at is None
    assert TokenFamily.objects.get(pk=alice_login.family_id).revoked_at is None
    assert ApiKey.objects.get(pk=acme[1].pk).revoked_at is None
    assert not Entry.objects.filter(wallet__organization=acme[0]).exists()
    assert Membership.objects.get(organization=acme[0], user=alice).daily_spend is None
    assert Organization.objects.get(pk=acme[0].pk).is_active
    # A refusal of a credential we know is audited, under its owner; no credential is not.
    audited = AuditEntry.objects.filter(outcome="refused", status_code=status)
    assert audited.count() == (len(endpoints(alice, alice_key, alice_login, acme)) if code else 0)


def test_an_operator_key_opens_every_endpoint_and_every_call_is_audited(
    operator, alice, alice_key, alice_login, acme, ops
):
    for method, path, body, headers, status in endpoints(alice, alice_key, alice_login, acme):
        response = call(operator, method, path, body, headers)
        assert response.status_code == status, (method, path, response.content)
    audit = list(AuditEntry.objects.order_by("id"))
    assert [(a.method.lower(), a.path, a.status_code) for a in audit] == [
        (m, p.split("?")[0], s) for m, p, _, _, s in endpoints(alice, alice_key, alice_login, acme)
    ]
    assert {a.actor_id for a in audit} == {ops.pk} and {a.outcome for a in audit} == {"ok"}
    assert all(a.key_prefix.startswith("tt_") and a.operation.startswith("admin_") for a in audit)


def test_an_operator_key_works_nowhere_else(operator_secret):
    client = client_with(operator_secret)
    assert client.get("/api/wallet").status_code == 401
    assert client.get("/api/keys").status_code == 401
    response = client.get("/v1/user/balance")
    assert response.status_code == 401
    assert "operator API" in response.json()["error"]["message"]


def test_a_portal_session_of_a_superuser_is_not_an_operator_credential(root):
    client = APIClient()
    client.force_login(root)
    assert client.get("/api/admin/users").status_code == 401


# --- users: search and show -------------------------------------------------------------------


def test_search_by_part_of_the_email_or_by_id_newest_first_in_pages(operator, alice, bob, mallory):
    assert [
        row["email"] for row in operator.get("/api/admin/users?q=EXAMPLE.com&is_staff=false").json()["results"]
    ] == [
        "mallory@example.com",
        "bob@example.com",
        "alice@example.com",
    ]
    assert [row["id"] for row in operator.get(f"/api/admin/users?q={bob.pk}").json()["results"]] == [bob.pk]
    first = operator.get("/api/admin/users?q=example.com&is_staff=false&limit=2").json()
    assert len(first["results"]) == 2 and first["next"]
    second = operator.get(first["next"]).json()
    assert [row["email"] for row in second["results"]] == ["alice@example.com"] and second["next"] is None
    assert first["results"][1]["balance"] == "0.000000000"  # bob
    assert operator.get("/api/admin/users?cursor=nonsense").status_code == 400
    assert operator.get("/api/admin/users?is_active=perhaps").status_code == 400


def test_show_has_the_wallet_the_keys_with_their_limits_the_logins_and_the_last_activity(
    operator, alice, alice_key, alice_login
):
    body = operator.get(f"/api/admin/users/{alice.pk}").json()
    assert body["email"] == "alice@example.com" and body["is_active"] is True
    assert body["wallet"]["balance"] == "10.000000000" and body["wallet"]["status"] == "ok"
    assert [key["prefix"] for key in body["keys"]] == [alice_key[0].prefix]
    assert body["keys"][0]["limits"]["rpm"] is None and "key" not in body["keys"][0]
    assert [s["id"] for s in body["sessions"]] == [str(alice_login.family_id)]
    assert body["activity"]["last_activity"] is not None  # the login, the opening top-up
    assert operator.get("/api/admin/users/999999").status_code == 404
    assert operator.get(f"/api/admin/users/{2**70}").status_code == 404


# --- changes ----------------------------------------------------------------------------------


def test_disable_stops_every_credential_and_enable_brings_the_account_back(operator, alice, alice_key):
    token = token_pair_issue(user=alice).access
    assert operator.post(f"/api/admin/users/{alice.pk}/disable").json() == {
        "id": alice.pk,
        "email": "alice@example.com",
        "is_active": False,
        "changed": True,
    }
    assert client_with(alice_key[1]).get("/api/wallet").status_code == 401
    assert client_with(token).get("/api/wallet").status_code == 401
    assert operator.post(f"/api/admin/users/{alice.pk}/disable").json()["changed"] is False
    assert operator.post(f"/api/admin/users/{alice.pk}/enable").json()["is_active"] is True
    assert client_with(alice_key[1]).get("/api/wallet").status_code == 200


def test_staff_accounts_can_be_read_but_not_changed(operator, ops, root):
    assert operator.get(f"/api/admin/users/{root.pk}").status_code == 200
    for path in ("disable", "sign-out"):
        response = operator.post(f"/api/admin/users/{root.pk}/{path}")
        assert response.status_code == 403 and response.json()["code"] == "staff_account"
    grant = operator.post(
        f"/api/admin/users/{ops.pk}/grants", {"amount": "5", "reason": "me"}, format="json", HTTP_IDEMPOTENCY_KEY="x"
    )
    assert grant.status_code == 403
    root.refresh_from_db()
    assert root.is_active and not Entry.objects.filter(wallet__user=ops).exists()


def test_set_limits_follows_the_keys_own_rules(operator, alice, alice_key):
    path = f"/api/admin/users/{alice.pk}/keys/{alice_key[0].pk}"
    response = operator.patch(path, {"limits": {"rpm": 30, "daily_spend": "2.5"}}, format="json")
    assert response.status_code == 200
    assert response.json()["limits"]["daily_spend"] == "2.500000000"
    assert ApiKey.objects.get(pk=alice_key[0].pk).limits["rpm"] == 30
    for bad in ({"daily_spend": 2.5}, {"rpm": 0}, {"colour": "red"}, "none"):
        assert operator.patch(path, {"limits": bad}, format="json").status_code == 400, bad
    assert operator.patch(path, {"limits": None}, format="json").json()["limits"]["rpm"] is None
    assert (
        operator.patch(f"/api/admin/users/{alice.pk}/keys/999999", {"limits": None}, format="json").status_code == 404
    )


def test_someone_elses_key_or_login_is_not_found_under_this_user(operator, alice, bob, alice_key, alice_login):
    assert operator.post(f"/api/admin/users/{bob.pk}/keys/{alice_key[0].pk}/revoke").status_code == 404
    assert operator.post(f"/api/admin/users/{bob.pk}/sessions/{alice_login.family_id}/revoke").status_code == 404
    assert operator.post(f"/api/admin/users/{bob.pk}/sessions/not-a-uuid/revoke").status_code == 404
    assert ApiKey.objects.get(pk=alice_key[0].pk).revoked_at is None


def test_revoking_a_key_or_a_login_or_signing_out_everywhere(operator, alice, alice_key, alice_login):
    other = token_pair_issue(user=alice, name="laptop")
    revoked = operator.post(f"/api/admin/users/{alice.pk}/keys/{alice_key[0].pk}/revoke").json()
    assert revoked["revoked"] is True and revoked["revoked_at"]
    assert client_with(alice_key[1]).get("/api/wallet").status_code == 401
    assert operator.post(f"/api/admin/users/{alice.pk}/keys/{alice_key[0].pk}/revoke").status_code == 200

    ended = operator.post(f"/api/admin/users/{alice.pk}/sessions/{alice_login.family_id}/revoke").json()
    assert ended["revoked_reason"] == "operator"
    assert client_with(alice_login.access).get("/api/wallet").status_code == 401
    assert client_with(other.access).get("/api/wallet").status_code == 200

    assert operator.post(f"/api/admin/users/{alice.pk}/sign-out").json() == {"signed_out": 1}
    assert client_with(other.access).get("/api/wallet").status_code == 401


# --- grants and corrections -------------------------------------------------------------------


def grant(operator, user, body, key="grant-7f3a"):
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return operator.post(f"/api/admin/users/{user.pk}/grants", body, format="json", **headers)


def test_a_grant_is_idempotent_and_a_replay_answers_the_first_result(operator, alice, ops):
    first = grant(operator, alice, {"amount": "2.50", "reason": "outage credit"})
    assert first.status_code == 201 and "Idempotent-Replayed" not in first
    body = first.json()
    assert body["user"] == alice.pk and body["balance"] == "12.500000000"
    assert body["entry"]["kind"] == "bonus" and body["entry"]["amount"] == "2.500000000"
    assert body["entry"]["description"] == "outage credit"

    # Money moves on after the grant; the replay still answers the grant's own result.
    grant(operator, alice, {"amount": "1", "reason": "other"}, key="another")
    replay = grant(operator, alice, {"amount": "2.50", "reason": "outage credit"})
    assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true"
    assert replay.json() == body
    assert balance_of(alice) == parse_usd("13.50")
    entry = Entry.objects.get(pk=body["entry"]["id"])
    assert entry.created_by == ops and entry.metadata["staff"] == "ops@example.com"

    conflict = grant(operator, alice, {"amount": "3.00", "reason": "outage credit"})
    assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_conflict"
    assert [a.detail for a in AuditEntry.objects.filter(operation="admin_users_grant").order_by("id")] == [
        f"posted entry {body['entry']['id']}",
        f"posted entry {body['entry']['id'] + 1}",
        f"replayed entry {body['entry']['id']}",
        "idempotency_conflict: this Idempotency-Key was already used for a different change to this user",
    ]


@pytest.mark.parametrize(
    ("body", "key", "field"),
    [
        ({"amount": "1.00"}, "k", "reason"),
        ({"amount": "1.00", "reason": "   "}, "k", "reason"),
        ({"amount": 1.0, "reason": "r"}, "k", "amount"),
        ({"amount": "-1", "reason": "r"}, "k", "amount"),
        ({"amount": "0.0000000001", "reason": "r"}, "k", "amount"),
        ({"amount": "1000000.01", "reason": "r"}, "k", "amount"),
        ({"amount": "1", "reason": "r", "kind": "top_up"}, "k", "kind"),
        ({"amount": "1", "reason": "r"}, None, "code"),
        ({"amount": "1", "reason": "r"}, "x" * 129, "code"),
    ],
)
def test_a_grant_needs_a_reason_a_decimal_string_and_an_idempotency_key(operator, alice, body, key, field):
    response = grant(operator, alice, body, key=key)
    assert response.status_code == 400 and field in response.json()
    assert balance_of(alice) == parse_usd("10")


def test_a_correction_may_take_money_away_and_is_idempotent_too(operator, alice):
    path = f"/api/admin/users/{alice.pk}/corrections"
    body = {"amount": "-12.00", "reason": "chargeback"}
    first = operator.post(path, body, format="json", HTTP_IDEMPOTENCY_KEY="cb-1")
    assert first.status_code == 201 and first.json()["balance"] == "-2.000000000"
    assert first.json()["entry"]["kind"] == "correction"
    replay = operator.post(path, body, format="json", HTTP_IDEMPOTENCY_KEY="cb-1")
    assert replay.json() == first.json() and replay["Idempotent-Replayed"] == "true"
    assert balance_of(alice) == parse_usd("-2")
    # A grant and a correction keep their keys apart: the same key is a new grant.
    assert grant(operator, alice, {"amount": "2", "reason": "r"}, key="cb-1").status_code == 201
    zero = operator.post(path, {"amount": "0", "reason": "r"}, format="json", HTTP_IDEMPOTENCY_KEY="z")
    assert zero.status_code == 400


def test_entries_and_usage_lists_page_by_cursor(operator, alice):
    for n in range(3):
        grant(operator, alice, {"amount": "1", "reason": f"r{n}"}, key=f"k{n}")
    page = operator.get(f"/api/admin/users/{alice.pk}/entries?limit=2").json()
    assert [e["description"] for e in page["results"]] == ["r2", "r1"]
    assert [e["description"] for e in operator.get(page["next"]).json()["results"]] == ["r0", "opening balance"]
    assert operator.get(f"/api/admin/users/{alice.pk}/usage").json() == {"results": [], "next": None}


# --- organizations ------------------------------------------------------------------------------


def test_orgs_are_searched_by_name_slug_or_id_in_pages(operator, alice, bob):
    acme = organization_create(user=alice, name="Acme Labs")
    umbrella = organization_create(user=bob, name="Umbrella")
    page = operator.get("/api/admin/orgs?limit=1").json()
    assert [o["name"] for o in page["results"]] == ["Umbrella"]
    assert [o["name"] for o in operator.get(page["next"]).json()["results"]] == ["Acme Labs"]
    assert [o["id"] for o in operator.get("/api/admin/orgs?q=ACME").json()["results"]] == [acme.pk]
    assert [o["id"] for o in operator.get(f"/api/admin/orgs?q={umbrella.slug}").json()["results"]] == [umbrella.pk]
    assert [o["id"] for o in operator.get(f"/api/admin/orgs?q={umbrella.pk}").json()["results"]] == [umbrella.pk]
    assert operator.get("/api/admin/orgs/999999").status_code == 404
    assert operator.get(f"/api/admin/orgs/{2**63}").status_code == 404


def test_an_org_shows_its_wallet_members_with_roles_and_limits_keys_and_activity(operator, alice, bob, acme):
    org, key = acme
    Membership.objects.create(organization=org, user=bob, role="member", daily_spend=parse_usd("2"))
    body = operator.get(f"/api/admin/orgs/{org.pk}").json()
    assert body["name"] == "Acme Labs" and body["slug"] == org.slug and body["is_active"] is True
    assert body["wallet"]["balance"] == "0.000000000" and body["wallet"]["held"] == "0.000000000"
    assert [(m["email"], m["role"], m["daily_spend"], m["monthly_spend"]) for m in body["members"]] == [
        ("alice@example.com", "owner", None, None),
        ("bob@example.com", "member", "2.000000000", None),
    ]
    assert [k["id"] for k in body["keys"]] == [key.pk]
    assert body["activity"]["last_entry"] is None


def test_an_operator_sets_a_members_limits_by_the_org_admins_own_rules(operator, alice, bob, acme):
    org, _ = acme
    Membership.objects.create(organization=org, user=bob, role="member", monthly_spend=parse_usd("9"))
    path = f"/api/admin/orgs/{org.pk}/members/{bob.pk}"
    done = operator.patch(path, {"daily_spend": "2.50", "allowed_models": ["gpt-4o-mini"]}, format="json")
    assert done.status_code == 200, done.content
    body = done.json()
    assert (body["user"], body["role"], body["daily_spend"]) == (bob.pk, "member", "2.500000000")
    assert body["monthly_spend"] == "9.000000000" and body["allowed_models"] == ["gpt-4o-mini"]  # untouched
    bob_member = Membership.objects.get(organization=org, user=bob)
    assert (bob_member.daily_spend, bob_member.allowed_models) == (parse_usd("2.5"), ["gpt-4o-mini"])
    cleared = operator.patch(path, {"monthly_spend": None, "allowed_models": None}, format="json").json()
    assert (cleared["daily_spend"], cleared["monthly_spend"], cleared["allowed_models"]) == ("2.500000000", None, None)
    # The same validation as PATCH /api/orgs/{id}/members/{mid}: decimal strings, not negative.
    for bad in ({"daily_spend": 2.5}, {"daily_spend": "-1"}, {"daily_spend": "lots"}, {"allowed_models": "x"}):
        refused = operator.patch(path, bad, format="json")
        assert refused.status_code == 400, (bad, refused.content)
    assert operator.patch(path, {"allowed_models": ["  "]}, format="json").status_code == 400
    assert Membership.objects.get(organization=org, user=bob).daily_spend == parse_usd("2.5")
    # Not a member, or no such organization: 404.
    mallory = make_user("mallory2@example.com")
    assert operator.patch(f"/api/admin/orgs/{org.pk}/members/{mallory.pk}", {}, format="json").status_code == 404
    assert operator.patch(f"/api/admin/orgs/999999/members/{bob.pk}", {}, format="json").status_code == 404
    audit = AuditEntry.objects.filter(operation="admin_orgs_members_limits").order_by("id")
    assert audit[0].detail == f"limits of member {bob.pk} set (allowed_models, daily_spend)"
    assert audit[0].target == f"org:{org.pk} user:{bob.pk}"
    assert [a.status_code for a in audit] == [200, 200, 400, 400, 400, 400, 400, 404, 404]


def test_an_org_grant_and_correction_credit_its_wallet_idempotently(operator, alice, acme, ops):
    org, _ = acme
    path = f"/api/admin/orgs/{org.pk}/grants"
    body = {"amount": "5.00", "reason": "launch credit"}
    first = operator.post(path, body, format="json", HTTP_IDEMPOTENCY_KEY="launch")
    assert first.status_code == 201 and "Idempotent-Replayed" not in first
    posted = first.json()
    assert posted["organization"] == org.pk and posted["user"] is None and posted["balance"] == "5.000000000"
    replay = operator.post(path, body, format="json", HTTP_IDEMPOTENCY_KEY="launch")
    assert replay.json() == posted and replay["Idempotent-Replayed"] == "true"
    conflict = operator.post(path, {**body, "amount": "6"}, format="json", HTTP_IDEMPOTENCY_KEY="launch")
    assert conflict.status_code == 409 and "this organization" in conflict.json()["detail"]
    assert operator.post(path, {"amount": "1"}, format="json", HTTP_IDEMPOTENCY_KEY="x").status_code == 400
    assert operator.post(path, body, format="json").json()["code"] == "idempotency_key_required"
    fix = operator.post(
        f"/api/admin/orgs/{org.pk}/corrections",
        {"amount": "-7.00", "reason": "chargeback"},
        format="json",
        HTTP_IDEMPOTENCY_KEY="launch",  # keys are kept apart per kind, as for users
    )
    assert fix.status_code == 201 and fix.json()["balance"] == "-2.000000000"
    assert operator.get(f"/api/admin/orgs/{org.pk}").json()["wallet"]["balance"] == "-2.000000000"
    assert balance_of(alice) == parse_usd("10")  # the owner's own wallet is untouched
    entry = Entry.objects.get(pk=posted["entry"]["id"])
    assert entry.wallet.organization_id == org.pk and entry.created_by == ops
    page = operator.get(f"/api/admin/orgs/{org.pk}/entries?limit=1").json()
    assert [e["description"] for e in page["results"]] == ["chargeback"]
    assert [e["description"] for e in operator.get(page["next"]).json()["results"]] == ["launch credit"]
    assert operator.get(f"/api/admin/orgs/{org.pk}/usage").json() == {"results": [], "next": None}
    assert (
        list(AuditEntry.objects.filter(operation="admin_orgs_grant").values_list("target", flat=True))
        == [f"org:{org.pk}"] * 5
    )


def test_an_org_key_is_revoked_only_under_its_own_org(operator, alice, bob, acme, alice_key):
    org, key = acme
    other = organization_create(user=bob, name="Umbrella")
    assert operator.post(f"/api/admin/orgs/{other.pk}/keys/{key.pk}/revoke").status_code == 404
    assert operator.post(f"/api/admin/orgs/{org.pk}/keys/{alice_key[0].pk}/revoke").status_code == 404
    revoked = operator.post(f"/api/admin/orgs/{org.pk}/keys/{key.pk}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert ApiKey.objects.get(pk=key.pk).revoked
    again = operator.post(f"/api/admin/orgs/{org.pk}/keys/{key.pk}/revoke")
    assert again.status_code == 200
    assert AuditEntry.objects.filter(operation="admin_orgs_keys_revoke").latest("id").detail == "already revoked"


# --- reports ----------------------------------------------------------------------------------


def test_reports_add_up_money_usage_top_spenders_and_liabilities(operator, alice, bob):
    payment(1, gross="10.00", fee="1.00", user=alice)
    payment(2, gross="99.00", fee="0", test_mode=True)  # test-mode money is not revenue
    usage(alice, "r1", cost="0.000100000", charge="0.000139", model="=cmd|' /C calc'!A0")
    usage(bob, "r2", cost="1.000000000", charge="1.20", model="openai/gpt-4o-mini", days_ago=40)
    grant(operator, bob, {"amount": "1", "reason": "r"})

    money = operator.get("/api/admin/reports/money?group_by=month").json()
    assert money["totals"]["revenue"] == "10.000000000" and money["totals"]["fees"] == "1.000000000"
    assert money["totals"]["charged"] == "1.200139000" and money["totals"]["upstream_cost"] == "1.000100000"
    assert money["totals"]["margin"] == "0.200039000" and money["totals"]["requests"] == 2
    assert [row["period"] for row in money["results"]] == sorted(row["period"] for row in money["results"])
    recent = operator.get("/api/admin/reports/money?group_by=day&since=" + (timezone.now().date().isoformat())).json()
    assert recent["totals"]["charged"] == "0.000139000"
    assert operator.get("/api/admin/reports/money?group_by=year").status_code == 400

    by_user = operator.get("/api/admin/reports/usage?group_by=user").json()["results"]
    assert [(row["key"], row["charged"], row["margin"]) for row in by_user] == [
        ("bob@example.com", "1.200000000", "0.200000000"),
        ("alice@example.com", "0.000139000", "0.000039000"),
    ]
    csv_text = operator.get("/api/admin/reports/usage?group_by=model&format=csv").content.decode()
    assert csv_text.splitlines()[0] == "key,requests,prompt_tokens,completion_tokens,charged,upstream_cost,margin"
    assert "'=cmd" in csv_text  # a formula-looking model id is quoted for spreadsheets

    top = operator.get("/api/admin/reports/top-spenders?limit=1").json()["results"]
    assert top == [
        {
            "user": bob.pk,
            "email": "bob@example.com",
            "usage": "1.200000000",
            "tools": "0.000000000",
            "spent": "1.200000000",
        }
    ]
    owed = operator.get("/api/admin/reports/liabilities").json()
    assert owed["owed_to_users"] == "11.000000000" and owed["wallets_in_credit"] == 2  # alice 10 + bob's grant


def test_reports_by_organization_count_what_its_wallet_paid_not_its_members(operator, alice, bob, acme):
    org, _ = acme
    record = usage(alice, "r-org", cost="0.500000000", charge="0.75", model="openai/gpt-4o-mini")
    record.organization = org
    record.save(update_fields=["organization"])
    usage(alice, "r-own", cost="0.100000000", charge="0.25", model="openai/gpt-4o-mini")
    usage(bob, "r-bob", cost="0.100000000", charge="0.30", model="openai/gpt-4o-mini")
    wallet_credit(wallet=org_wallet(organization=org), amount=parse_usd("5"), kind="grant", idempotency_key=None)
    wallet_charge(wallet=org_wallet(organization=org), amount=parse_usd("0.05"), idempotency_key=None)

    by_org = operator.get("/api/admin/reports/usage?group_by=organization").json()["results"]
    assert [(row["key"], row["requests"], row["charged"], row["margin"]) for row in by_org] == [
        (org.slug, 1, "0.750000000", "0.250000000"),
        ("", 2, "0.550000000", "0.350000000"),  # paid from users' own wallets
    ]
    orgs_top = operator.get("/api/admin/reports/top-spenders?kind=organization").json()["results"]
    assert orgs_top == [
        {
            "organization": org.pk,
            "name": "Acme Labs",
            "slug": org.slug,
            "usage": "0.750000000",
            "tools": "0.050000000",
            "spent": "0.800000000",
        }
    ]
    # A member's requests billed to the organization are the organization's spending, not hers.
    users_top = operator.get("/api/admin/reports/top-spenders").json()["results"]
    assert [(row["email"], row["spent"]) for row in users_top] == [
        ("bob@example.com", "0.300000000"),
        ("alice@example.com", "0.250000000"),
    ]
    csv_text = operator.get("/api/admin/reports/top-spenders?kind=organization&format=csv").content.decode()
    assert csv_text.splitlines() == [
        "organization,name,slug,usage,tools,spent",
        f"{org.pk},Acme Labs,{org.slug},0.750000000,0.050000000,0.800000000",
    ]
    assert operator.get("/api/admin/reports/top-spenders?kind=team").status_code == 400
    # The organization's own lists: the request billed to it, not its owner's own one.
    requests = operator.get(f"/api/admin/orgs/{org.pk}/usage").json()["results"]
    assert [row["request_id"] for row in requests] == ["r-org"]
    shown = operator.get(f"/api/admin/orgs/{org.pk}").json()
    assert shown["wallet"]["balance"] == "4.950000000" and shown["activity"]["last_request"] is not None


# --- the audit log ----------------------------------------------------------------------------


def test_the_audit_log_keeps_storable_text_and_no_secrets(operator, alice):
    body = {"amount": "1", "reason": "nul\x00 and \ud800 surrogate", "password": "hunter2", "x": "y" * 900}
    raw = json.dumps(body)  # ASCII, with the lone surrogate escaped: the wire form a client can send
    path = f"/api/admin/users/{alice.pk}/grants"
    response = operator.generic("POST", path, raw, "application/json", HTTP_IDEMPOTENCY_KEY="a\x00b")
    assert response.status_code == 400  # the key is not printable; still audited
    entry = AuditEntry.objects.get()
    assert entry.request_data["body"]["reason"] == "nul and \ufffd surrogate"
    assert entry.request_data["body"]["password"] == "[masked]"
    assert len(entry.request_data["body"]["x"]) == 500
    assert entry.idempotency_key == "ab" and entry.target == f"user:{alice.pk}"
    assert "hunter2" not in str(entry.__dict__)
    assert entry.outcome == "refused" and entry.detail.startswith("invalid_idempotency_key")


def test_the_audit_log_cannot_be_rewritten(operator, alice):
    operator.get(f"/api/admin/users/{alice.pk}")
    entry = AuditEntry.objects.get()
    with pytest.raises(AppendOnlyError):
        entry.save()
    with pytest.raises(AppendOnlyError):
        entry.delete()
    for sql in ("UPDATE backoffice_auditentry SET status_code = 200", "DELETE FROM backoffice_auditentry"):
        with pytest.raises(DatabaseError), connection.cursor() as cursor:
            from django.db import transaction

            with transaction.atomic():
                cursor.execute(sql)


def test_the_audit_log_is_read_only_in_the_admin(operator, alice, root):
    operator.get(f"/api/admin/users/{alice.pk}")
    entry = AuditEntry.objects.get()
    admin = Client()
    admin.force_login(root)
    listing = admin.get("/admin/backoffice/auditentry/")
    assert listing.status_code == 200 and "ops@example.com" in listing.content.decode()
    page = admin.get(f"/admin/backoffice/auditentry/{entry.pk}/change/")
    assert page.status_code == 200 and 'name="_save"' not in page.content.decode()
    assert admin.get("/admin/backoffice/auditentry/add/").status_code == 403
    assert admin.post(f"/admin/backoffice/auditentry/{entry.pk}/delete/").status_code == 403


# --- minting operator keys --------------------------------------------------------------------


def test_a_superuser_mints_an_operator_key_in_the_admin_and_sees_it_once(root, ops):
    admin = Client()
    admin.force_login(root)
    assert "Mint an operator key" in admin.get("/admin/accounts/apikey/").content.decode()
    page = admin.post("/admin/accounts/apikey/mint-operator-key/", {"user": ops.pk, "name": "back office"})
    assert page.status_code == 200
    key = ApiKey.objects.get(user=ops)
    assert key.scopes == [Scope.ADMIN]
    secret = page.content.decode().split("data-operator-key>")[1].split("<")[0]
    assert client_with(secret).get("/api/admin/users").status_code == 200
    assert secret not in admin.get(f"/admin/accounts/apikey/{key.pk}/change/").content.decode()


def test_only_a_superuser_may_mint_and_only_for_active_staff(root, ops, alice):
    staff_client = Client()
    staff_client.force_login(make_user("helper@example.com", is_staff=True))
    assert staff_client.get("/admin/accounts/apikey/mint-operator-key/").status_code == 403
    admin = Client()
    admin.force_login(root)
    refused = admin.post("/admin/accounts/apikey/mint-operator-key/", {"user": alice.pk, "name": "x"})
    assert refused.status_code == 200
    assert [key.scopes for key in ApiKey.objects.filter(user=alice)] == []


def test_the_admin_scope_cannot_be_ticked_onto_an_existing_key(root, alice_key):
    admin = Client()
    admin.force_login(root)
    key = alice_key[0]
    form = {"name": key.name, "scopes": ["proxy", "admin"], "limits": "{}", "expires_at_0": "", "expires_at_1": ""}
    response = admin.post(f"/admin/accounts/apikey/{key.pk}/change/", form)
    assert response.status_code == 200  # the form refuses the unknown choice
    key.refresh_from_db()
    assert key.scopes == [Scope.PROXY]


def test_the_schema_lists_the_operator_api(client):
    paths = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()["paths"]
    ours = {path for path in paths if path.startswith("/api/admin/")}
    assert len(ours) == 26
    assert paths["/api/admin/orgs/{org_id}/grants"]["post"]["security"] == [{"operatorKey": []}]
    assert paths["/api/admin/users/{user_id}/grants"]["post"]["security"] == [{"operatorKey": []}]
    member = paths["/api/admin/orgs/{org_id}/members/{user_id}"]
    assert set(member) == {"patch"} and member["patch"]["operationId"] == "admin_orgs_members_limits"


# --- live sockets close as with every other revocation ------------------------------------------


@database_sync_to_async
def operator_call(secret: str, path: str) -> int:
    return client_with(secret).post(path).status_code


@pytest.mark.django_db(transaction=True)
async def test_disabling_or_revoking_through_the_operator_api_closes_the_live_sockets():
    alice = await database_sync_to_async(make_user)("alice@example.com", balance="10.00")
    mallory = await database_sync_to_async(make_user)("mallory@example.com", balance="1.00")
    ops = await database_sync_to_async(make_user)("ops@example.com", is_staff=True)
    root = await database_sync_to_async(make_user)("root@example.com", is_staff=True, is_superuser=True)
    _, secret = await database_sync_to_async(operator_key_create)(user=ops, name="bo", minted_by=root)
    key, key_secret = await database_sync_to_async(api_key_create)(user=alice, name="agent")
    _, mallory_secret = await database_sync_to_async(api_key_create)(user=mallory, name="agent")
    by_key = await listening(bearer(key_secret))
    mallorys_key = await listening(bearer(mallory_secret))

    assert await operator_call(secret, f"/api/admin/users/{mallory.pk}/keys/{key.pk}/revoke") == 404
    assert await operator_call(secret, f"/api/admin/users/{alice.pk}/keys/{key.pk}/revoke") == 200
    await expect_refusal(by_key, timeout=CLOSE_WAIT)

    by_token = await listening(bearer(await access_token(alice)))
    assert await operator_call(secret, f"/api/admin/users/{alice.pk}/disable") == 200
    await expect_refusal(by_token, timeout=CLOSE_WAIT)
    await still_listening(mallory, mallorys_key)
