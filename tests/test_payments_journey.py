"""The whole money-in journey as a user lives it: checkout, a signed webhook credits the wallet,
the open WebSocket hears of it within a second, and a refund claws it back (and is heard too)."""

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from accounts.services import token_pair_issue
from config.asgi import application
from tests import payments_fixtures as fx
from tests.fake_payment_apis import ls_order, ls_refund, post_ls
from tests.payments_fixtures import NANOS, balance_of

pytestmark = pytest.mark.django_db(transaction=True)
packs, payment_settings, fake_ls = fx.packs, fx.payment_settings, fx.fake_ls
fast_password_hashing = fx.fast_password_hashing


async def test_checkout_to_credit_to_live_balance_to_refund(alice, packs, fake_ls):
    access = await database_sync_to_async(lambda: token_pair_issue(user=alice).access)()
    ws = WebsocketCommunicator(application, "/ws/events", headers=[(b"authorization", f"Bearer {access}".encode())])
    assert (await ws.connect())[0]
    assert (await ws.receive_json_from(timeout=1))["reason"] == "snapshot"

    def checkout():
        client = Client(HTTP_AUTHORIZATION=f"Bearer {access}")
        return client.post("/api/checkout", {"pack": "starter"}, content_type="application/json")

    started = await database_sync_to_async(checkout)()
    assert started.status_code == 201, started.content
    checkout_id = started.json()["checkout_id"]
    assert started.json()["url"].startswith("https://")

    # The buyer pays on Lemon Squeezy's page; its signed webhook is what credits the wallet.
    paid = ls_order(user_id=alice.pk, checkout_id=checkout_id, variant_id=412233, total_cents=1000)
    response = await database_sync_to_async(lambda: post_ls(Client(), paid))()
    assert response.status_code == 200
    event = await ws.receive_json_from(timeout=1)
    assert (event["reason"], event["balance"]) == ("top_up", "20.000000000")
    assert await database_sync_to_async(balance_of)(alice) == 20 * NANOS

    refunded = ls_refund(user_id=alice.pk, checkout_id=checkout_id, refunded_cents=1000, status="refunded")
    response = await database_sync_to_async(lambda: post_ls(Client(), refunded))()
    assert response.status_code == 200
    event = await ws.receive_json_from(timeout=1)
    assert (event["reason"], event["balance"]) == ("refund", "10.000000000")
    assert await database_sync_to_async(balance_of)(alice) == 10 * NANOS
    await ws.disconnect()
