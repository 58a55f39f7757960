"""Top-ups into an organization's wallet: the checkout names the organization (owners and
admins only), the signed webhook credits the organization's wallet, and refunds claw back from
the wallet that was credited — never the buyer's own."""

from __future__ import annotations

import pytest

from orgs.models import Membership, Role
from orgs.services import organization_create
from payments.models import Checkout, Payment
from tests import payments_fixtures as fx
from tests.conftest import bearer_client, make_user
from tests.fake_payment_apis import ls_order, ls_refund, post_ls
from tests.payments_fixtures import NANOS
from wallet.models import Entry, EntryKind, Wallet

pytestmark = pytest.mark.django_db
packs, payment_settings, fake_ls = fx.packs, fx.payment_settings, fx.fake_ls
fast_password_hashing = fx.fast_password_hashing


@pytest.fixture
def acme(db):
    olivia, adam, mia = (make_user(f"{n}@example.com", balance="1.00") for n in ("olivia", "adam", "mia"))
    org = organization_create(user=olivia, name="Acme")
    Membership.objects.create(organization=org, user=adam, role=Role.ADMIN)
    Membership.objects.create(organization=org, user=mia, role=Role.MEMBER)
    return org, olivia, adam, mia


def test_only_owners_and_admins_may_buy_for_the_org(acme, packs, fake_ls):
    org, olivia, adam, mia = acme
    nora = make_user("nora@example.com")
    body = {"pack": "pro", "organization": org.slug}
    assert bearer_client(olivia).post("/api/checkout", body, format="json").status_code == 201
    assert (
        bearer_client(adam).post("/api/checkout", {**body, "organization": str(org.pk)}, format="json").status_code
        == 201
    )
    assert bearer_client(mia).post("/api/checkout", body, format="json").status_code == 403
    assert bearer_client(nora).post("/api/checkout", body, format="json").status_code == 404
    assert set(Checkout.objects.values_list("organization_id", flat=True)) == {org.pk}


def test_the_webhook_credits_the_org_and_a_refund_claws_back_from_it(client, acme, packs, fake_ls):
    org, olivia, _, _ = acme
    created = bearer_client(olivia).post("/api/checkout", {"pack": "pro", "organization": org.slug}, format="json")
    checkout_id = created.json()["checkout_id"]
    order = ls_order(user_id=olivia.pk, variant_id=412244, total_cents=2500, checkout_id=checkout_id)
    assert post_ls(client, order).status_code == 200
    org_wallet = Wallet.objects.get(organization=org)
    assert org_wallet.balance == 26 * NANOS
    assert Wallet.objects.get(user=olivia).balance == 1 * NANOS
    payment = Payment.objects.get()
    assert (payment.user, payment.wallet) == (olivia, org_wallet)

    refund = ls_refund(
        user_id=olivia.pk, variant_id=412244, total_cents=2500, refunded_cents=2500, checkout_id=checkout_id
    )
    assert post_ls(client, refund).status_code == 200
    org_wallet.refresh_from_db()
    assert org_wallet.balance == 0
    assert Wallet.objects.get(user=olivia).balance == 1 * NANOS
    assert Entry.objects.get(kind=EntryKind.REFUND).wallet == org_wallet


def test_a_checkout_without_an_organization_still_credits_the_buyer(client, acme, packs, fake_ls):
    _, olivia, _, _ = acme
    checkout_id = bearer_client(olivia).post("/api/checkout", {"pack": "starter"}, format="json").json()["checkout_id"]
    post_ls(client, ls_order(user_id=olivia.pk, variant_id=412233, total_cents=1000, checkout_id=checkout_id))
    assert Wallet.objects.get(user=olivia).balance == 11 * NANOS
