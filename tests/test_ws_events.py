"""``/ws/events``: who may listen, what they hear, and that it works across server processes."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta

import httpx
import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db import transaction
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from accounts import consumers, fanout
from accounts.models import ApiKey, RefreshToken
from accounts.services import api_key_create, api_key_revoke, operator_key_create, sha256_hex, token_pair_issue
from config.asgi import application
from tests.conftest import make_user
from tests.live import MiniWebSocket, WebSocketClosed, live_server, live_servers
from wallet import events
from wallet.models import EntryKind
from wallet.services import wallet_credit


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # The default PBKDF2 work factor costs ~0.3 s per persona; it protects nothing in a test.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


pytestmark = pytest.mark.django_db(transaction=True)


def communicator(*headers: tuple[bytes, bytes]) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, "/ws/events", headers=list(headers))


@database_sync_to_async
def persona(email: str, balance: str = "0"):
    return make_user(email, balance=balance)


@database_sync_to_async
def access_token(user) -> str:
    return token_pair_issue(user=user).access


@database_sync_to_async
def credit(user, amount: int, key: str | None = None):
    return wallet_credit(
        wallet=user.wallet, amount=amount, kind=EntryKind.BONUS, idempotency_key=key or uuid.uuid4().hex
    ).entry


@database_sync_to_async
def credit_then_roll_back(user, amount: int):
    with pytest.raises(RuntimeError), transaction.atomic():
        wallet_credit(wallet=user.wallet, amount=amount, kind=EntryKind.BONUS, idempotency_key="rolled-back")
        raise RuntimeError("the caller's transaction fails after the credit")


@database_sync_to_async
def session_cookie(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


async def connected_with_header(token: str) -> WebsocketCommunicator:
    ws = communicator((b"authorization", f"Bearer {token}".encode()))
    connected, _ = await ws.connect()
    assert connected
    return ws


async def expect_refusal(ws: WebsocketCommunicator, timeout: float = 1) -> dict:
    error = await ws.receive_json_from(timeout)
    assert error["type"] == "error" and error["code"] == "unauthenticated"
    closed = await ws.receive_output(timeout)
    assert closed == {"type": "websocket.close", "code": 4401, "reason": closed["reason"]}
    return error


async def test_a_desktop_token_in_the_header_gets_a_balance_snapshot():
    alice = await persona("alice@example.com", "10.00")
    ws = await connected_with_header(await access_token(alice))
    assert await ws.receive_json_from() == {
        "type": "balance",
        "balance": "10.000000000",
        "held": "0.000000000",
        "available": "10.000000000",
        "reason": "snapshot",
    }
    await ws.disconnect()


async def test_an_api_key_in_the_header_authenticates_too():
    alice = await persona("alice@example.com", "2.50")
    _, secret = await database_sync_to_async(api_key_create)(user=alice, name="agent")
    ws = await connected_with_header(secret)
    snapshot = await ws.receive_json_from()
    assert (snapshot["reason"], snapshot["balance"]) == ("snapshot", "2.500000000")
    await ws.disconnect()


async def test_a_token_in_the_first_message_authenticates_a_connection_without_headers():
    alice = await persona("alice@example.com", "1.00")
    ws = communicator()
    assert (await ws.connect())[0]
    assert await ws.receive_nothing(0.1)  # nothing is said before authentication
    await ws.send_json_to({"type": "auth", "token": await access_token(alice)})
    assert (await ws.receive_json_from())["balance"] == "1.000000000"
    await ws.send_json_to({"type": "ping"})
    assert await ws.receive_json_from() == {"type": "pong"}
    await ws.disconnect()


async def test_a_connection_that_never_authenticates_is_closed_with_4401(monkeypatch):
    monkeypatch.setattr(consumers, "AUTH_TIMEOUT_SECONDS", 0.2)
    ws = communicator()
    assert (await ws.connect())[0]
    error = await expect_refusal(ws)
    assert "auth" in error["message"]


async def test_a_first_message_that_is_not_auth_is_refused():
    ws = communicator()
    assert (await ws.connect())[0]
    await ws.send_json_to({"type": "subscribe"})
    await expect_refusal(ws)


async def test_a_message_that_is_not_json_closes_with_4400():
    ws = communicator()
    assert (await ws.connect())[0]
    await ws.send_to(text_data="hello")
    assert (await ws.receive_json_from())["code"] == "bad_message"
    assert (await ws.receive_output(1))["code"] == 4400


async def test_a_bad_token_is_refused():
    ws = await connected_with_header("not-a-real-token")
    error = await expect_refusal(ws)
    assert error["message"] == "invalid access token"


async def test_a_revoked_api_key_is_refused_in_the_first_message_too():
    alice = await persona("alice@example.com", "1.00")
    key, secret = await database_sync_to_async(api_key_create)(user=alice, name="old")
    await database_sync_to_async(api_key_revoke)(key=key)
    ws = communicator()
    assert (await ws.connect())[0]
    await ws.send_json_to({"type": "auth", "token": secret})
    assert (await expect_refusal(ws))["message"] == "this API key has been revoked"


@pytest.mark.parametrize("where", ["header", "first message"])
async def test_an_operator_key_is_refused_like_a_revoked_key_as_on_api_and_v1(where):
    root = await database_sync_to_async(make_user)("root@example.com", is_staff=True, is_superuser=True)
    ops = await database_sync_to_async(make_user)("ops@example.com", balance="5.00", is_staff=True)
    _, secret = await database_sync_to_async(operator_key_create)(user=ops, name="back office", minted_by=root)
    if where == "header":
        ws = await connected_with_header(secret)
    else:
        ws = communicator()
        assert (await ws.connect())[0]
        await ws.send_json_to({"type": "auth", "token": secret})
    error = await expect_refusal(ws)  # no balance snapshot first: the refusal is the first word
    assert error["message"] == "an operator key works only on the operator API (/api/admin/)"


async def test_a_committed_credit_reaches_the_socket_within_a_second():
    alice = await persona("alice@example.com", "10.00")
    ws = await connected_with_header(await access_token(alice))
    await ws.receive_json_from()
    await credit(alice, 1_500_000_000)
    event = await ws.receive_json_from(timeout=1)
    assert event == {
        "type": "balance",
        "balance": "11.500000000",
        "held": "0.000000000",
        "available": "11.500000000",
        "reason": "bonus",
    }
    await ws.disconnect()


async def test_a_rolled_back_credit_is_never_sent():
    alice = await persona("alice@example.com", "10.00")
    ws = await connected_with_header(await access_token(alice))
    await ws.receive_json_from()
    await credit_then_roll_back(alice, 5_000_000_000)
    assert await ws.receive_nothing(0.3)
    await ws.disconnect()


async def test_other_users_events_are_not_delivered():
    alice = await persona("alice@example.com", "10.00")
    mallory = await persona("mallory@example.com", "1.00")
    alice_ws = await connected_with_header(await access_token(alice))
    mallory_ws = await connected_with_header(await access_token(mallory))
    await alice_ws.receive_json_from()
    await mallory_ws.receive_json_from()
    await credit(alice, 1_000_000_000)
    assert (await alice_ws.receive_json_from())["balance"] == "11.000000000"
    assert await mallory_ws.receive_nothing(0.3)
    await alice_ws.disconnect()
    await mallory_ws.disconnect()


async def test_a_process_joins_a_users_group_once_for_all_of_their_sockets():
    # Thousands of idle sockets per process: one layer channel and one membership per user
    # (accounts.fanout), not one per socket — the in-memory layer scans every channel per receive.
    alice = await persona("alice@example.com", "10.00")
    token = await access_token(alice)
    sockets = [await listening(bearer(token)) for _ in range(3)]
    layer = get_channel_layer()
    group = events.group_for_user(alice.pk)
    assert len(layer.groups[group]) == 1
    await credit(alice, 1_000_000_000)
    for ws in sockets:
        assert (await ws.receive_json_from())["balance"] == "11.000000000"
    for ws in sockets[:2]:
        await ws.disconnect()
    assert len(layer.groups[group]) == 1
    await credit(alice, 1)
    assert (await sockets[2].receive_json_from())["balance"] == "11.000000001"
    await sockets[2].disconnect()
    assert group not in layer.groups  # the last socket gone, the process left the group


async def test_a_failed_layer_receive_drops_no_socket(monkeypatch):
    # The Redis layer's receive can time out under load; a socket of its own used to die of it.
    monkeypatch.setattr(fanout, "RETRY_SECONDS", 0.01)
    layer = get_channel_layer()
    real_receive, failures = layer.receive, []

    async def flaky_receive(channel):
        if not failures:
            failures.append(channel)
            raise ConnectionError("Timeout reading from the layer")
        return await real_receive(channel)

    monkeypatch.setattr(layer, "receive", flaky_receive)
    alice = await persona("alice@example.com", "10.00")
    ws = await listening(bearer(await access_token(alice)))
    await credit(alice, 1_000_000_000)
    assert (await ws.receive_json_from(timeout=1))["reason"] == "bonus"
    assert failures
    await ws.disconnect()


async def test_a_portal_session_from_our_own_origin_authenticates():
    alice = await persona("alice@example.com", "3.00")
    ws = communicator((b"cookie", await session_cookie(alice)), (b"origin", b"http://127.0.0.1:8000"))
    assert (await ws.connect())[0]
    assert (await ws.receive_json_from())["balance"] == "3.000000000"
    await ws.disconnect()


async def test_a_session_cookie_sent_from_a_foreign_site_is_ignored(monkeypatch):
    # Cross-site WebSocket hijacking: evil.example opens the socket and the browser attaches
    # alice's cookie. The cookie must count for nothing there.
    monkeypatch.setattr(consumers, "AUTH_TIMEOUT_SECONDS", 0.3)
    alice = await persona("alice@example.com", "3.00")
    cookie = await session_cookie(alice)
    for origin in [b"https://evil.example", None]:
        headers = [(b"cookie", cookie)] + ([(b"origin", origin)] if origin else [])
        ws = communicator(*headers)
        assert (await ws.connect())[0]
        await expect_refusal(ws)


@pytest.mark.parametrize("origin", [b"http://127.0.0.1:abc", b"http://127.0.0.1:99999", b"http://127.0.0.1:-1"])
async def test_an_origin_whose_port_is_no_port_is_foreign_and_a_token_still_authenticates(origin):
    alice = await persona("alice@example.com", "3.00")
    ws = communicator((b"cookie", await session_cookie(alice)), (b"origin", origin))
    assert (await ws.connect())[0]
    assert await ws.receive_nothing(0.1)  # the cookie counted for nothing
    await ws.send_json_to({"type": "auth", "token": await access_token(alice)})
    assert (await ws.receive_json_from())["reason"] == "snapshot"
    await ws.disconnect()


async def test_a_key_that_expires_while_connected_ends_the_stream_at_the_next_event(monkeypatch):
    # Expiry is not announced (a revocation is, below): the next event re-checks the credential.
    monkeypatch.setattr(consumers, "RECHECK_SECONDS", 0)
    alice = await persona("alice@example.com", "10.00")
    key, secret = await database_sync_to_async(api_key_create)(user=alice, name="laptop")
    ws = await connected_with_header(secret)
    await ws.receive_json_from()
    expired = timezone.now() - timedelta(seconds=1)
    await database_sync_to_async(ApiKey.objects.filter(pk=key.pk).update)(expires_at=expired)
    await credit(alice, 1_000_000_000)
    assert "expired" in (await expect_refusal(ws))["message"]


# --- revocation closes exactly the sockets of the revoked credential -------------------------
# Each revocation below is made through a public surface (the API, the portal, the admin); the
# socket it concerns must close with 4401 within a second (waited for with a 2 s timeout), and
# every other socket must go on hearing events.

CLOSE_WAIT = 2  # seconds; the promise is "within a second", this is the generous event wait


async def listening(*headers: tuple[bytes, bytes]) -> WebsocketCommunicator:
    ws = communicator(*headers)
    assert (await ws.connect())[0]
    assert (await ws.receive_json_from())["reason"] == "snapshot"
    return ws


def bearer(token: str) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {token}".encode())


OUR_ORIGIN = (b"origin", b"http://127.0.0.1:8000")


async def still_listening(user, *sockets: WebsocketCommunicator) -> None:
    """A credit after the revocation reaches every socket that ignored it: the channel layer keeps
    one channel's messages in order, so a socket that had acted on the revocation would be closed."""
    await credit(user, 1)
    for ws in sockets:
        assert (await ws.receive_json_from(CLOSE_WAIT))["reason"] == "bonus"
        await ws.disconnect()


@database_sync_to_async
def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def cookie_of(client: Client) -> tuple[bytes, bytes]:
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


@database_sync_to_async
def login_pair(user):
    return token_pair_issue(user=user)


def staff_revoke(changelist: str, pk) -> None:
    """The revoke action of an admin change list, run by staff."""
    admin = Client()
    admin.force_login(make_user("staff@example.com", is_staff=True, is_superuser=True))
    assert admin.post(changelist, {"action": "revoke", "_selected_action": [pk]}).status_code == 302


@database_sync_to_async
def revoke_key(surface: str, key, owner) -> None:
    if surface == "api":
        access = token_pair_issue(user=owner).access
        response = APIClient().delete(f"/api/keys/{key.pk}", HTTP_AUTHORIZATION=f"Bearer {access}")
        assert response.status_code == 204
    elif surface == "portal":
        client = Client()
        client.force_login(owner)
        assert client.post(f"/keys/{key.pk}/revoke").status_code == 302
    else:
        staff_revoke("/admin/accounts/apikey/", key.pk)


@pytest.mark.parametrize("surface", ["api", "portal", "admin"])
async def test_revoking_a_key_closes_its_sockets_and_no_other(surface):
    alice = await persona("alice@example.com", "10.00")
    key, secret = await database_sync_to_async(api_key_create)(user=alice, name="laptop")
    _, other_secret = await database_sync_to_async(api_key_create)(user=alice, name="server")
    revoked = [await listening(bearer(secret)), await listening(bearer(secret))]
    others = [await listening(bearer(other_secret)), await listening(bearer(await access_token(alice)))]

    await revoke_key(surface, key, alice)

    for ws in revoked:
        assert (await expect_refusal(ws, timeout=CLOSE_WAIT))["message"] == "this credential has been revoked"
    await still_listening(alice, *others)


@database_sync_to_async
def end_login(how: str, pair) -> None:
    client = APIClient()
    if how == "logout":
        assert client.post("/api/auth/logout", {"refresh": pair.refresh}, format="json").status_code == 204
    elif how == "refresh token reuse":
        assert client.post("/api/auth/token/refresh", {"refresh": pair.refresh}, format="json").status_code == 200
        assert client.post("/api/auth/token/refresh", {"refresh": pair.refresh}, format="json").status_code == 401
    else:
        family_id = RefreshToken.objects.get(token_hash=sha256_hex(pair.refresh)).family_id
        staff_revoke("/admin/accounts/tokenfamily/", family_id)


@pytest.mark.parametrize("how", ["logout", "refresh token reuse", "staff"])
async def test_ending_a_login_closes_its_sockets_and_no_other(how):
    alice = await persona("alice@example.com", "10.00")
    laptop, desktop = await login_pair(alice), await login_pair(alice)
    _, secret = await database_sync_to_async(api_key_create)(user=alice, name="agent")
    ended = await listening(bearer(laptop.access))
    others = [await listening(bearer(desktop.access)), await listening(bearer(secret))]

    await end_login(how, laptop)

    assert (await expect_refusal(ended, timeout=CLOSE_WAIT))["message"] == "this credential has been revoked"
    await still_listening(alice, *others)


async def test_signing_out_of_the_portal_closes_that_sessions_sockets_and_no_other():
    alice = await persona("alice@example.com", "10.00")
    browser, other_browser = await signed_in(alice), await signed_in(alice)
    ended = await listening(cookie_of(browser), OUR_ORIGIN)
    others = [await listening(cookie_of(other_browser), OUR_ORIGIN), await listening(bearer(await access_token(alice)))]

    assert (await database_sync_to_async(browser.post)("/logout")).status_code == 302

    assert (await expect_refusal(ended, timeout=CLOSE_WAIT))["message"] == "this credential has been revoked"
    await still_listening(alice, *others)


async def test_disabling_a_user_in_the_admin_closes_every_socket_of_theirs_and_no_one_elses():
    alice = await persona("alice@example.com", "10.00")
    mallory = await persona("mallory@example.com", "1.00")
    staff = await signed_in(
        await database_sync_to_async(make_user)("staff@example.com", is_staff=True, is_superuser=True)
    )
    _, secret = await database_sync_to_async(api_key_create)(user=alice, name="agent")
    alices = [
        await listening(bearer(secret)),
        await listening(bearer(await access_token(alice))),
        await listening(cookie_of(await signed_in(alice)), OUR_ORIGIN),
    ]
    mallorys = await listening(bearer(await access_token(mallory)))

    form = {"email": "alice@example.com", "date_joined_0": "2025-01-01", "date_joined_1": "00:00:00", "_save": "Save"}
    response = await database_sync_to_async(staff.post)(f"/admin/accounts/user/{alice.pk}/change/", form)
    assert response.status_code == 302  # saved, with is_active unticked

    for ws in alices:
        await expect_refusal(ws, timeout=CLOSE_WAIT)
    await still_listening(mallory, mallorys)


@pytest.fixture(scope="module")
def servers_sharing_redis(django_db_setup, django_db_blocker):
    """Two server processes sharing the test database and a Redis channel layer."""
    redis = {"REDIS_URL": os.environ["TEST_REDIS_URL"], "REDIS_PREFIX": f"tt-test-{uuid.uuid4().hex[:8]}"}
    with live_servers(2, **redis) as urls:
        yield urls


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_deposit_made_through_one_server_process_reaches_a_socket_on_another(servers_sharing_redis):
    """Two server processes sharing PostgreSQL and Redis: alice listens on B, an operator's
    billing key credits her through A, and B's socket hears it."""
    server_a, server_b = servers_sharing_redis
    alice = await persona("alice@example.com", "10.00")
    operator = await persona("operator@example.com")
    _, billing_key = await database_sync_to_async(api_key_create)(user=operator, name="billing", scopes=["billing"])
    headers = {"Authorization": f"Bearer {await access_token(alice)}"}
    ws = await MiniWebSocket.connect(server_b, "/ws/events", headers)
    try:
        assert (await ws.receive_json(timeout=5))["reason"] == "snapshot"
        async with httpx.AsyncClient(base_url=server_a, timeout=5) as http:
            deposit = await http.post(
                "/v1/user/balance/deposit",
                json={"user": "alice@example.com", "amount": "2.000000001", "kind": "bonus"},
                headers={"Authorization": f"Bearer {billing_key}", "Idempotency-Key": "cross-process-1"},
            )
        assert deposit.status_code == 201, deposit.text
        event = await ws.receive_json(timeout=1)
        assert (event["balance"], event["reason"]) == ("12.000000001", "bonus")
    finally:
        await ws.close()


async def revoking_a_key_through_one_server_closes_its_socket_on(revoke_on: str, listen_on: str) -> None:
    """Alice listens on ``listen_on`` with a key and with a token; she revokes the key over HTTP
    through ``revoke_on``: the key's socket closes with 4401, the token's still answers."""
    alice = await persona("alice@example.com", "10.00")
    key, secret = await database_sync_to_async(api_key_create)(user=alice, name="agent")
    access = await access_token(alice)
    revoked = await MiniWebSocket.connect(listen_on, "/ws/events", {"Authorization": f"Bearer {secret}"})
    kept = await MiniWebSocket.connect(listen_on, "/ws/events", {"Authorization": f"Bearer {access}"})
    try:
        for ws in (revoked, kept):
            assert (await ws.receive_json(timeout=5))["reason"] == "snapshot"
        async with httpx.AsyncClient(base_url=revoke_on, timeout=5) as http:
            response = await http.delete(f"/api/keys/{key.pk}", headers={"Authorization": f"Bearer {access}"})
        assert response.status_code == 204, response.text

        assert (await revoked.receive_json(timeout=CLOSE_WAIT))["message"] == "this credential has been revoked"
        with pytest.raises(WebSocketClosed) as closed:
            await revoked.receive_json(timeout=CLOSE_WAIT)
        assert closed.value.code == 4401
        await kept.send_json({"type": "ping"})
        assert await kept.receive_json(timeout=CLOSE_WAIT) == {"type": "pong"}
    finally:
        await revoked.close()
        await kept.close()


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_key_revoked_through_one_server_process_closes_its_socket_on_another(servers_sharing_redis):
    server_a, server_b = servers_sharing_redis
    await revoking_a_key_through_one_server_closes_its_socket_on(server_a, listen_on=server_b)


# --- the same protocol through the shipped server process ----------------------------------
# The communicator tests above drive the consumer directly; these check that uvicorn's
# WebSocket layer hands it the same headers and carries its messages and close codes unchanged.


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker):
    with live_server() as url:
        yield url


async def test_the_server_process_authenticates_a_header_and_answers_pings(server):
    alice = await persona("alice@example.com", "10.00")
    ws = await MiniWebSocket.connect(server, "/ws/events", {"Authorization": f"Bearer {await access_token(alice)}"})
    try:
        assert (await ws.receive_json(timeout=5))["balance"] == "10.000000000"
        await ws.send_json({"type": "ping"})
        assert await ws.receive_json() == {"type": "pong"}
    finally:
        await ws.close()


@pytest.mark.parametrize("broken_origin", [False, True])
async def test_the_server_process_authenticates_a_first_message(server, broken_origin):
    alice = await persona("alice@example.com", "1.00")
    # An Origin whose port is no port is foreign (its cookie ignored), not a crash.
    cookie = (await session_cookie(alice)).decode()
    headers = {"Cookie": cookie, "Origin": "http://127.0.0.1:abc"} if broken_origin else {}
    ws = await MiniWebSocket.connect(server, "/ws/events", headers)
    try:
        await ws.send_json({"type": "auth", "token": await access_token(alice)})
        assert (await ws.receive_json(timeout=5))["reason"] == "snapshot"
    finally:
        await ws.close()


async def test_the_server_process_sends_the_error_then_closes_with_4401(server):
    ws = await MiniWebSocket.connect(server, "/ws/events", {"Authorization": "Bearer tt_not-a-real-key"})
    try:
        assert (await ws.receive_json(timeout=5))["code"] == "unauthenticated"
        with pytest.raises(WebSocketClosed) as closed:
            await ws.receive_json()
        assert closed.value.code == 4401
    finally:
        await ws.close()


async def test_the_server_process_honours_a_cookie_only_from_our_own_origin(server):
    alice = await persona("alice@example.com", "3.00")
    cookie = (await session_cookie(alice)).decode()
    ours = await MiniWebSocket.connect(server, "/ws/events", {"Cookie": cookie, "Origin": server})
    try:
        assert (await ours.receive_json(timeout=5))["balance"] == "3.000000000"
    finally:
        await ours.close()
    foreign = await MiniWebSocket.connect(server, "/ws/events", {"Cookie": cookie, "Origin": "https://evil.example"})
    try:
        await foreign.send_json({"type": "ping"})  # still unauthenticated: must authenticate first
        assert (await foreign.receive_json(timeout=5))["code"] == "unauthenticated"
        with pytest.raises(WebSocketClosed) as closed:
            await foreign.receive_json()
        assert closed.value.code == 4401
    finally:
        await foreign.close()


async def test_the_server_process_closes_a_socket_whose_key_is_revoked_over_http(server):
    await revoking_a_key_through_one_server_closes_its_socket_on(server, listen_on=server)
