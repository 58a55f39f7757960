"""``watch_balance()``: live balance events, a fresh snapshot after every reconnect — through a
server crash and restart — and a refreshed token when the socket is closed with 4401."""

import asyncio
import contextlib
import json
from decimal import Decimal

import pytest
from tokentill import SignedOut, Tokentill

from accounts.models import TokenFamily
from accounts.services import token_family_revoke
from core.money import parse_usd
from tests.client.conftest import server_env, sign_in
from tests.conftest import make_user
from tests.live import crash, free_port, live_server
from wallet.models import EntryKind
from wallet.services import wallet_credit

pytestmark = pytest.mark.django_db(transaction=True)

EVENT_TIMEOUT = 15  # seconds: generous, the tests wait for events rather than sleep


async def next_event(watcher):
    return await asyncio.wait_for(anext(watcher), EVENT_TIMEOUT)


def test_a_snapshot_first_then_each_change(client_for):
    client = client_for(make_user("alice@example.com", balance="2.00"))

    async def watch():
        watcher = client.watch_balance()
        try:
            snapshot = await next_event(watcher)
            await asyncio.to_thread(client.charge, "0.50", "a tool")
            return snapshot, await next_event(watcher)
        finally:
            await watcher.aclose()

    snapshot, charged = asyncio.run(watch())
    assert (snapshot.reason, snapshot.balance) == ("snapshot", Decimal("2"))
    assert (charged.reason, charged.balance, charged.available) == ("charge", Decimal("1.5"), Decimal("1.5"))


def test_a_socket_closed_with_4401_comes_back_with_a_refreshed_token(server, client_for, memory_keyring):
    client_for(make_user("alice@example.com", balance="1.00"))
    key = (f"tokentill {server}", "alice@example.com")
    tokens = json.loads(memory_keyring.entries[key])
    memory_keyring.entries[key] = json.dumps({**tokens, "access": "refused-by-the-server"})
    client = client_for()  # starts from the refused token

    async def first():
        watcher = client.watch_balance()
        try:
            return await next_event(watcher)
        finally:
            await watcher.aclose()

    assert asyncio.run(first()).reason == "snapshot"
    assert json.loads(memory_keyring.entries[key])["refresh"] != tokens["refresh"]


def test_a_revoked_sign_in_ends_the_watch_with_signed_out(client_for):
    client = client_for(make_user("alice@example.com"))
    token_family_revoke(family=TokenFamily.objects.get(), reason="portal")

    async def watch():
        async for _ in client.watch_balance(initial_backoff=0.05):
            pass

    with pytest.raises(SignedOut):
        asyncio.run(asyncio.wait_for(watch(), EVENT_TIMEOUT))


def test_the_watch_survives_a_server_crash_and_resumes_with_a_snapshot(fake_upstream_server, memory_keyring):
    """The server dies (SIGKILL), money arrives while it is down, a new server starts on the same
    port: the watcher reconnects by itself and its first event is the new balance."""
    alice = make_user("alice@example.com", balance="1.00")
    port = free_port()
    env = server_env(fake_upstream_server, port)

    async def watch(client, url):
        watcher = client.watch_balance(initial_backoff=0.2, max_backoff=1.0)
        try:
            before = await next_event(watcher)
            crash(url)

            def credit_and_restart():
                wallet_credit(
                    wallet=alice.wallet,
                    amount=parse_usd("5.00"),
                    kind=EntryKind.TOP_UP,
                    idempotency_key="test:while-down",
                    description="paid while the server was down",
                )
                restarted.enter_context(live_server(port=port, **env))

            with contextlib.ExitStack() as restarted:
                # Started in a thread: the watcher keeps retrying on the loop meanwhile.
                await asyncio.to_thread(credit_and_restart)
                after = await next_event(watcher)
            return before, after
        finally:
            await watcher.aclose()

    with live_server(port=port, **env) as url:
        sign_in(url, alice, memory_keyring)
        client = Tokentill(url, keyring_backend=memory_keyring)
        before, after = asyncio.run(watch(client, url))
        client.close()
    assert (before.reason, before.balance) == ("snapshot", Decimal("1"))
    assert (after.reason, after.balance) == ("snapshot", Decimal("6"))
