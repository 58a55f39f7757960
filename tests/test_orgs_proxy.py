"""Which wallet pays on /v1, through the live ASGI app against the fake upstream: an
organization's key bills the organization; a member's own credential bills them unless the
request names the organization (``X-Tokentill-Org``); the usage record and the ledger entry keep
both; a member's limits apply; removing a member refuses their very next request; and, on
PostgreSQL, a crowd of members' requests never overspends the shared wallet."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from __future__ import annotations

import asyncio
import os
from decimal import Decimal

import httpx
import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from accounts.services import api_key_create, operator_key_create, token_pair_issue
from core.money import format_usd
from infra import adb
from notify.models import Event
from orgs.models import Membership, Role
from orgs.services import membership_remove, org_key_create, organization_create
from proxy.models import ModelPrice, UsageRecord, UsageStatus
from tests.conftest import make_user
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    MODEL,
    Reply,
    call,
    completion,
    fake_upstream,
    fake_upstream_server,
    price,
    usage,
)
from tests.test_proxy_live import server  # noqa: F401  (the live server fixture)
from wallet.models import Entry, EntryKind, Hold, HoldStatus, Wallet
from wallet.services import wallet_credit

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
HELLO = {"model": MODEL, "messages": [{"role": "user", "content": "Say pong"}]}
CHARGE = 71_640  # 0.0000597 × 1.2, nanodollars


def _reply():
    return Reply(body=completion(u=usage(412, 37, cost="0.0000597")))


@pytest.fixture
def acme(db, price):
    """Acme with $5: olivia owns it, mia is a member; both have $10 of their own."""
    olivia = make_user("olivia@example.com", balance="10.00")
    mia = make_user("mia@example.com", balance="10.00")
    org = organization_create(user=olivia, name="Acme")
    Membership.objects.create(organization=org, user=mia, role=Role.MEMBER)
    wallet_credit(wallet=org.wallet, amount=5 * 10**9, kind=EntryKind.TOP_UP, idempotency_key="acme:opening")
    return org, olivia, mia


def _balance(**owner) -> int:
    return Wallet.objects.get(**owner).balance


def test_an_org_key_bills_the_org_and_keeps_who_made_the_request(fake_upstream, acme):
    org, olivia, _ = acme
    owners_membership = Membership.objects.get(user=olivia)
    _, secret = org_key_create(actor=owners_membership, name="prod")
    fake_upstream.script("chat", _reply())
    response = call(CHAT, HELLO, token=secret)
    assert response.status == 200
    assert response.headers["x-tokentill-balance"] == "4.999928360"
    assert _balance(organization=org) == 5 * 10**9 - CHARGE
    assert _balance(user=olivia) == 10 * 10**9
    record = UsageRecord.objects.get()
    assert (record.organization_id, record.user_id, record.charge) == (org.pk, olivia.pk, CHARGE)
    entry = Entry.objects.get(kind=EntryKind.USAGE)
    assert (entry.wallet.organization_id, entry.member_id, entry.amount) == (org.pk, olivia.pk, -CHARGE)


@pytest.mark.parametrize("naming", ["slug", "id"])
def test_a_members_own_credential_bills_the_org_it_names(fake_upstream, acme, naming):
    org, _, mia = acme
    access = token_pair_issue(user=mia).access
    fake_upstream.script("chat", _reply(), _reply())
    header = org.slug if naming == "slug" else str(org.pk)
    assert call(CHAT, HELLO, token=access, headers={"X-Tokentill-Org": header}).status == 200
    assert _balance(organization=org) == 5 * 10**9 - CHARGE
    assert call(CHAT, HELLO, token=access).status == 200  # no header: her own wallet
    assert _balance(user=mia) == 10 * 10**9 - CHARGE
    org_record, own_record = UsageRecord.objects.order_by("id")
    assert (org_record.organization_id, org_record.user_id) == (org.pk, mia.pk)
    assert own_record.organization_id is None
    assert Entry.objects.get(wallet__organization=org, kind=EntryKind.USAGE).member_id == mia.pk
    assert Entry.objects.get(wallet__user=mia, kind=EntryKind.USAGE).member_id is None


def test_naming_an_org_you_are_not_in_is_refused_and_charges_nobody(fake_upstream, acme):
    org, _, _ = acme
    nora = make_user("nora@example.com", balance="1.00")
    _, secret = api_key_create(user=nora, name="k")
    for named in (org.slug, str(org.pk), "no-such-org"):
        response = call(CHAT, HELLO, token=secret, headers={"X-Tokentill-Org": named})
        assert response.status == 403
        assert response.error["code"] == "organization_forbidden"
    assert not fake_upstream.calls("chat")
    assert _balance(organization=org) == 5 * 10**9 and _balance(user=nora) == 10**9
    assert set(UsageRecord.objects.values_list("status", flat=True)) == {UsageStatus.REFUSED}


def test_an_org_key_naming_another_org_is_refused(fake_upstream, acme):
    org, olivia, _ = acme
    other = organization_create(user=olivia, name="Other")
    _, secret = org_key_create(actor=Membership.objects.get(user=olivia, organization=org), name="prod")
    response = call(CHAT, HELLO, token=secret, headers={"X-Tokentill-Org": other.slug})
    assert response.status == 403 and response.error["code"] == "organization_forbidden"


def test_removing_a_member_refuses_their_very_next_request(fake_upstream, acme):
    org, olivia, mia = acme
    _, secret = api_key_create(user=mia, name="k")
    fake_upstream.script("chat", _reply())
    headers = {"X-Tokentill-Org": org.slug}
    assert call(CHAT, HELLO, token=secret, headers=headers).status == 200
    membership_remove(actor=Membership.objects.get(user=olivia), membership=Membership.objects.get(user=mia))
    refused = call(CHAT, HELLO, token=secret, headers=headers)
    assert refused.status == 403 and refused.error["code"] == "organization_forbidden"
    assert len(fake_upstream.calls("chat")) == 1


def test_a_disabled_org_refuses_its_keys_and_its_header_but_not_its_members_own_wallets(fake_upstream, acme):
    org, olivia, mia = acme
    _, org_secret = org_key_create(actor=Membership.objects.get(user=olivia), name="prod")
    mia_access = token_pair_issue(user=mia).access
    root = make_user("root@example.com", is_staff=True, is_superuser=True)
    operator = APIClient()
    operator.credentials(HTTP_AUTHORIZATION=f"Bearer {operator_key_create(user=root, name='ops', minted_by=root)[1]}")
    disabled = operator.post(f"/api/admin/orgs/{org.pk}/disable")
    assert disabled.status_code == 200 and disabled.json() == {
        "id": org.pk,
        "name": "Acme",
        "is_active": False,
        "changed": True,
    }
    assert operator.post(f"/api/admin/orgs/{org.pk}/disable").json()["changed"] is False
    fake_upstream.script("chat", _reply(), _reply())
    for token, headers in ((org_secret, {}), (mia_access, {"X-Tokentill-Org": org.slug})):
        refused = call(CHAT, HELLO, token=token, headers=headers)
        assert refused.status == 403 and refused.error["code"] == "organization_disabled"
        assert refused.error["type"] == "permission_error"
    # An outsider naming it still learns only that they are not a member.
    nora = make_user("nora@example.com", balance="1.00")
    outsider = call(CHAT, HELLO, token=token_pair_issue(user=nora).access, headers={"X-Tokentill-Org": org.slug})
    assert outsider.error["code"] == "organization_forbidden"
    assert not fake_upstream.calls("chat") and _balance(organization=org) == 5 * 10**9
    assert call(CHAT, HELLO, token=mia_access).status == 200  # her own wallet is not the org's
    assert _balance(user=mia) == 10 * 10**9 - CHARGE
    assert operator.post(f"/api/admin/orgs/{org.pk}/enable").json()["is_active"] is True
    assert call(CHAT, HELLO, token=org_secret).status == 200
    assert _balance(organization=org) == 5 * 10**9 - CHARGE


def test_a_members_allowed_models_apply_inside_the_org_only(fake_upstream, acme):
    org, _, mia = acme
    Membership.objects.filter(user=mia).update(allowed_models=["someone/else"])
    _, secret = api_key_create(user=mia, name="k")
    refused = call(CHAT, HELLO, token=secret, headers={"X-Tokentill-Org": org.slug})
    assert refused.status == 403 and refused.error["code"] == "model_not_allowed"
    fake_upstream.script("chat", _reply())
    assert call(CHAT, HELLO, token=secret).status == 200  # her own wallet: no such limit


def test_a_members_daily_limit_counts_what_was_spent_and_the_next_hold(fake_upstream, acme):
    org, _, mia = acme
    key, secret = api_key_create(user=mia, name="k")
    headers = {"X-Tokentill-Org": org.slug}
    fake_upstream.script("chat", _reply(), _reply())
    assert call(CHAT, HELLO, token=secret, headers=headers).status == 200
    hold = UsageRecord.objects.get().hold_amount
    # Spent so far plus the next request's hold, less one nanodollar: refused.
    Membership.objects.filter(user=mia).update(daily_spend=CHARGE + hold - 1)
    refused = call(CHAT, HELLO, token=secret, headers=headers | {"X-Tokentill-Run": "nightly"})
    assert refused.status == 429 and refused.error["code"] == "member_spend_limit"
    assert refused.headers["retry-after"]
    # Announced like any full cap: once per cap and window, however often it refuses.
    assert call(CHAT, HELLO, token=secret, headers=headers).status == 429
    (event,) = Event.objects.filter(type="usage.cap_reached")
    assert event.user == mia
    assert {
        name: event.data[name] for name in ("code", "scope", "unit", "limit", "api_key", "run", "organization")
    } == {
        "code": "member_spend_limit",
        "scope": "member",
        "unit": "usd",
        "limit": format_usd(CHARGE + hold - 1),
        "api_key": {"id": key.pk, "prefix": key.prefix},
        "run": "nightly",
        "organization": {"id": org.pk},
    }
    assert event.data["message"] == refused.error["message"] and event.data["retry_after"] > 0
    Membership.objects.filter(user=mia).update(daily_spend=CHARGE + hold)
    assert call(CHAT, HELLO, token=secret, headers=headers).status == 200
    assert _balance(organization=org) == 5 * 10**9 - 2 * CHARGE


def test_verify_ledger_covers_org_wallets(fake_upstream, acme):
    org, _, mia = acme
    _, secret = api_key_create(user=mia, name="k")
    fake_upstream.script("chat", _reply())
    call(CHAT, HELLO, token=secret, headers={"X-Tokentill-Org": org.slug})
    call_command("verify_ledger", stdout=open(os.devnull, "w"))  # raises CommandError on any discrepancy
    Wallet.objects.filter(organization=org).update(balance=1)  # around the services: caught
    from io import StringIO

    from django.core.management.base import CommandError

    said = StringIO()
    with pytest.raises(CommandError):
        call_command("verify_ledger", stdout=said, stderr=said)
    assert f"wallet {org.wallet.pk} (organization acme): balance 0.000000001" in said.getvalue()


def _charge(client, amount: str, key: str, **headers):
    return client.post(
        "/v1/user/charge",
        {"amount": amount, "description": "tool"},
        content_type="application/json",
        headers={"Idempotency-Key": key, **headers},
    )


def test_an_org_keys_balance_and_tool_charges_are_the_orgs(acme):
    org, olivia, _ = acme
    from django.test import Client

    _, secret = org_key_create(actor=Membership.objects.get(user=olivia), name="prod")
    client = Client(headers={"Authorization": f"Bearer {secret}"})
    assert client.get("/v1/user/balance").json()["balance"] == "5.000000000"
    charged = _charge(client, "0.01", "t1")
    assert charged.status_code == 200 and charged.json()["balance"] == "4.990000000"
    entry = Entry.objects.get(kind=EntryKind.CHARGE)
    assert (entry.wallet.organization_id, entry.member_id) == (org.pk, olivia.pk)
    assert _balance(user=olivia) == 10 * 10**9


def test_a_members_tool_charge_names_the_org_and_counts_against_her_limit(acme):
    org, _, mia = acme
    from django.test import Client

    Membership.objects.filter(user=mia).update(daily_spend=15_000_000)  # $0.015
    client = Client(headers={"Authorization": f"Bearer {api_key_create(user=mia, name='k')[1]}"})
    header = {"X-Tokentill-Org": org.slug}
    assert _charge(client, "0.01", "c1", **header).status_code == 200
    assert _charge(client, "0.01", "c1", **header).status_code == 200  # a replay: no second charge
    over = _charge(client, "0.01", "c2", **header)
    assert over.status_code == 429 and over.json()["error"]["code"] == "member_spend_limit"
    assert _charge(client, "0.01", "c3").status_code == 200  # her own wallet: no such limit
    assert client.get("/v1/user/balance", headers=header).json()["balance"] == "4.990000000"
    assert client.get("/v1/user/balance").json()["balance"] == "9.990000000"
    assert _balance(organization=org) == 5 * 10**9 - 10_000_000
    assert _balance(user=mia) == 10 * 10**9 - 10_000_000
    assert Entry.objects.get(wallet__organization=org, kind=EntryKind.CHARGE).member_id == mia.pk
    stranger = Client(
        headers={"Authorization": f"Bearer {api_key_create(user=make_user('x@example.com'), name='k')[1]}"}
    )
    refused = _charge(stranger, "0.01", "s1", **header)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "organization_forbidden"
    assert stranger.get("/v1/user/balance", headers=header).status_code == 403


# --- PostgreSQL: a crowd of members on one shared wallet -------------------------------------


@pytest.mark.postgres
def test_members_racing_on_the_shared_wallet_never_overspend_it(server, fake_upstream):
    k = 5
    # 256 output tokens at $390.625/M with no markup is exactly $0.10 — hold and charge alike.
    ModelPrice.objects.create(model="conc/model", completion=Decimal("390.625"), markup=Decimal("0"))
    owner = make_user("owner@example.com", balance="10.00")
    org = organization_create(user=owner, name="Crowd")
    wallet_credit(wallet=org.wallet, amount=k * 10**8, kind=EntryKind.TOP_UP, idempotency_key="crowd:opening")
    secrets = []
    for n in range(4):  # four members, each with their own key, and one org key
        member = make_user(f"m{n}@example.com", balance="10.00")
        Membership.objects.create(organization=org, user=member)
        secrets.append((api_key_create(user=member, name="k")[1], {"X-Tokentill-Org": org.slug}))
    secrets.append((org_key_create(actor=Membership.objects.get(user=owner), name="prod")[1], {}))
    reply = completion("ok", u=usage(3, 256), model="conc/model")
    fake_upstream.script("chat", *[Reply(body=reply, delay=0.2) for _ in range(4 * k)])
    body = {"model": "conc/model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 256}

    async def crowd():
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            requests = []
            for n in range(4 * k):
                secret, headers = secrets[n % len(secrets)]
                requests.append(client.post(CHAT, json=body, headers={"Authorization": f"Bearer {secret}", **headers}))
            return await asyncio.gather(*requests)

    statuses = sorted(r.status_code for r in asyncio.run(crowd()))
    assert statuses == [200] * k + [402] * (3 * k)
    assert len(fake_upstream.calls("chat")) == k
    wallet = Wallet.objects.get(organization=org)
    assert (wallet.balance, wallet.held) == (0, 0)
    assert Entry.objects.filter(wallet=wallet, kind="usage").count() == k
    assert not Entry.objects.filter(wallet__user__isnull=False, kind="usage").exists()  # no member paid
    assert not Hold.objects.filter(status=HoldStatus.ACTIVE).exists()
    assert UsageRecord.objects.filter(organization=org, status=UsageStatus.REFUSED, http_status=402).count() == 3 * k
    call_command("verify_ledger", stdout=open(os.devnull, "w"))  # raises CommandError on any discrepancy


@pytest.mark.postgres
def test_a_members_limit_counts_requests_in_flight(server, fake_upstream):
    # $0.10 a request, hold and charge alike; mia may spend $0.20 a day: of four requests sent
    # at once, two are admitted while the others find the limit taken by holds in flight.
    ModelPrice.objects.create(model="conc/model", completion=Decimal("390.625"), markup=Decimal("0"))
    owner = make_user("owner@example.com", balance="10.00")
    org = organization_create(user=owner, name="Limits")
    wallet_credit(wallet=org.wallet, amount=10**9, kind=EntryKind.TOP_UP, idempotency_key="limits:opening")
    mia = make_user("mia@example.com", balance="10.00")
    Membership.objects.create(organization=org, user=mia, daily_spend=2 * 10**8)
    secret = api_key_create(user=mia, name="k")[1]
    reply = completion("ok", u=usage(3, 256), model="conc/model")
    fake_upstream.script("chat", *[Reply(body=reply, delay=0.5) for _ in range(4)])
    body = {"model": "conc/model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 256}

    async def crowd():
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            headers = {"Authorization": f"Bearer {secret}", "X-Tokentill-Org": org.slug}
            return await asyncio.gather(*[client.post(CHAT, json=body, headers=headers) for _ in range(4)])

    responses = asyncio.run(crowd())
    assert sorted(r.status_code for r in responses) == [200, 200, 429, 429]
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {"member_spend_limit"}
    assert Wallet.objects.get(organization=org).balance == 10**9 - 2 * 10**8


# --- crash recovery charges the wallet the request was billed to -----------------------------


def _org_begin(org, member, request_id: str):
    from datetime import timedelta

    from django.utils import timezone

    from proxy.services import RequestMeta, arequest_begin
    from tests.fake_upstream import run_async

    meta = RequestMeta(
        request_id=request_id,
        user=member,
        api_key=None,
        endpoint="chat.completions",
        model=MODEL,
        organization=org,
        wallet=Wallet.objects.get(organization=org),
        membership=Membership.objects.get(user=member, organization=org),
    )
    begun = run_async(arequest_begin, meta=meta, prompt_chars=4000, requested_output=100)
    return begun, lambda: Hold.objects.filter(pk=begun.hold.pk).update(expires_at=timezone.now() - timedelta(seconds=1))


def _reconcile() -> str:
    from io import StringIO

    out = StringIO()
    call_command("reconcile_holds", "--backoff", "0.01", stdout=out)
    return out.getvalue()


def test_an_expired_org_hold_is_settled_on_the_org_wallet_for_the_member(fake_upstream, acme):
    org, _, mia = acme
    _, expire = _org_begin(org, mia, "req_org_lost")
    expire()
    assert "req_org_lost: settled at an estimate" in _reconcile()
    entry = Entry.objects.get(kind=EntryKind.USAGE)
    assert (entry.wallet.organization_id, entry.member_id) == (org.pk, mia.pk)
    assert _balance(user=mia) == 10 * 10**9
    call_command("verify_ledger", stdout=open(os.devnull, "w"))


def test_a_settled_org_estimate_is_corrected_on_the_org_wallet(fake_upstream, acme):
    from datetime import timedelta

    from django.utils import timezone

    from proxy.services import Outcome, arequest_settle
    from tests.fake_upstream import run_async

    org, _, mia = acme
    begun, _ = _org_begin(org, mia, "req_org_cut")
    outcome = Outcome(status=UsageStatus.CANCELLED, generation_id="gen-cut", output_chars=400, trust_upstream_cost=True)
    record = run_async(arequest_settle, begun=begun, outcome=outcome)
    UsageRecord.objects.filter(pk=record.pk).update(settled_at=timezone.now() - timedelta(seconds=60))
    found = {"data": {"id": "gen-cut", "total_cost": 0.002, "native_tokens_prompt": 1000, "cancelled": True}}
    fake_upstream.script("generation", Reply(body=found))
    assert "req_org_cut: estimate" in _reconcile()
    assert _balance(organization=org) == 5 * 10**9 - 2_400_000  # 0.002 × 1.2
    assert _balance(user=mia) == 10 * 10**9
    call_command("verify_ledger", stdout=open(os.devnull, "w"))


# --- PostgreSQL: the role rules hold under concurrency ------------------------------------------


@pytest.mark.postgres
def test_racing_accepts_of_one_invitation_let_exactly_one_in():
    from orgs.services import OrgError, invitation_accept, invitation_create
    from tests.conftest import race

    owner = make_user("owner@example.com")
    org = organization_create(user=owner, name="Race")
    _, token = invitation_create(actor=Membership.objects.get(user=owner), email="zed@example.com")
    zed = make_user("zed@example.com")

    def worker(index: int):
        try:
            return invitation_accept(token=token, user=zed).pk
        except OrgError as refused:
            return refused.status

    results = race(worker, 8)
    assert not [r for r in results if isinstance(r, BaseException)]
    assert sorted(results, key=str).count(404) == 7
    assert Membership.objects.filter(organization=org, user=zed).count() == 1


@pytest.mark.postgres
def test_two_owners_demoting_each_other_at_once_leave_one_owner():
    from orgs.services import OrgError, membership_update
    from tests.conftest import race

    olivia, oscar = make_user("olivia@example.com"), make_user("oscar@example.com")
    org = organization_create(user=olivia, name="Race")
    Membership.objects.create(organization=org, user=oscar, role=Role.OWNER)
    pairs = [(olivia, oscar), (oscar, olivia)]

    def worker(index: int):
        actor_user, target_user = pairs[index]
        actor = Membership.objects.get(organization=org, user=actor_user)
        target = Membership.objects.get(organization=org, user=target_user)
        try:
            membership_update(actor=actor, membership=target, role=Role.MEMBER)
            return "demoted"
        except OrgError as refused:
            return refused.status

    results = race(worker, 2)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert Membership.objects.filter(organization=org, role=Role.OWNER).count() >= 1


def test_an_owner_demoted_a_moment_ago_cannot_still_demote_another(db):
    from orgs.services import OrgError, membership_update

    a, b, c = (make_user(f"{n}@example.com") for n in "abc")
    org = organization_create(user=a, name="Three owners")
    for user in (b, c):
        Membership.objects.create(organization=org, user=user, role=Role.OWNER)
    stale_b = Membership.objects.get(user=b)  # b's request began while b was an owner...
    membership_update(actor=Membership.objects.get(user=a), membership=Membership.objects.get(user=b), role="member")
    with pytest.raises(OrgError) as refused:  # ...and ends after a demoted b: b acts as a member now
        membership_update(actor=stale_b, membership=Membership.objects.get(user=c), role="member")
    assert refused.value.status == 403
    assert Membership.objects.get(user=c).role == Role.OWNER


def test_naming_the_org_costs_one_lookup_and_no_more_statements(fake_upstream, acme, settings):
    """On PostgreSQL the request's own statements stay two (the hold with its record, the
    settlement with the record's update); naming the organization adds one ORM query — the
    membership with its organization and wallet — and nothing for a request that names none."""
    from proxy.selectors import price_cache_clear, price_current
    from tests.test_proxy_stream import orm_queries_in_any_thread

    settings.PROXY_PRICE_CACHE_SECONDS = 60  # the price from the process's cache, as in production
    price_cache_clear()
    price_current(MODEL)
    org, _, mia = acme
    _, secret = api_key_create(user=mia, name="k")
    fake_upstream.script("chat", *[_reply() for _ in range(3)])
    headers = {"X-Tokentill-Org": org.slug}
    assert call(CHAT, HELLO, token=secret, headers=headers).status == 200  # stamps last_used_at
    assert call(CHAT, HELLO, token=secret, headers=headers).status == 200  # (PostgreSQL: remembered)
    sent: list[str] = []
    with orm_queries_in_any_thread() as orm, adb.observe(sent.append):
        assert call(CHAT, HELLO, token=secret, headers=headers).status == 200
    lookups = [sql for sql in orm if "orgs_membership" in sql]
    assert len(lookups) == 1 and "wallet_wallet" in lookups[0]
    if adb.native():
        assert len(orm) == 1 and len(sent) == 2
    price_cache_clear()
