"""Signing in and staying signed in: tokens only in the keyring, refreshed before they expire and
on a 401, exactly once however many callers race, and every way a refresh can be refused."""

import asyncio
import json
import threading
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone
from tokentill import LoginFailed, SignedOut, Tokentill

from accounts.models import RefreshToken, TokenFamily
from accounts.services import token_family_revoke
from tests.client.conftest import PASSWORD
from tests.conftest import make_user

pytestmark = pytest.mark.django_db(transaction=True)


def stored(backend, server) -> dict:
    email = backend.get_password(f"tokentill {server} current", "account")
    return json.loads(backend.get_password(f"tokentill {server}", email))


def tamper(backend, server, **changes) -> dict:
    """Change the stored token set the way time or another process would."""
    tokens = stored(backend, server)
    tokens.update(changes)
    backend.set_password(f"tokentill {server}", tokens["email"], json.dumps(tokens))
    return tokens


def test_a_password_sign_in_lives_in_the_keyring_and_survives_a_restart(
    server, client_for, memory_keyring, real_passwords
):
    alice = make_user("alice@example.com", balance="10.00")
    client = client_for(alice, password=True)
    assert client.account.email == "alice@example.com"
    assert set(memory_keyring.entries) == {
        (f"tokentill {server}", "alice@example.com"),
        (f"tokentill {server} current", "account"),
    }
    assert stored(memory_keyring, server)["refresh"].startswith("ttr_")

    restarted = client_for()  # a new process would find the same keyring entries
    assert restarted.account.email == "alice@example.com"
    assert restarted.balance().balance == 10


def test_a_wrong_password_is_a_clear_error_and_stores_nothing(server, client_for, memory_keyring, real_passwords):
    make_user("alice@example.com")
    client = client_for()
    with pytest.raises(LoginFailed) as failed:
        client.login_with_password("alice@example.com", "not the password")
    assert failed.value.reason == "invalid_credentials"
    assert memory_keyring.entries == {}
    with pytest.raises(SignedOut):
        client.balance()


def test_each_server_url_keeps_its_own_sign_in(server, client_for, memory_keyring):
    client_for(make_user("alice@example.com"))
    other = Tokentill("http://127.0.0.1:9", keyring_backend=memory_keyring)
    assert other.account is None


def test_the_access_token_is_refreshed_shortly_before_it_expires(server, client_for, memory_keyring):
    client = client_for(make_user("alice@example.com"))
    before = tamper(memory_keyring, server, refresh_after=0)  # as if 15 minutes had passed
    client_for().balance()
    after = stored(memory_keyring, server)
    assert after["refresh"] != before["refresh"] and after["refresh_after"] > 0
    assert RefreshToken.objects.get(token_hash__isnull=False, used_at__isnull=False)  # the old one, rotated once
    assert client.balance().balance == 0  # the first client adopts the rotated tokens from the keyring


def test_a_401_refreshes_once_and_the_request_goes_through(server, client_for, memory_keyring, fake_upstream, price):
    from tests.fake_upstream import MODEL, Reply, completion, usage

    client_for(make_user("alice@example.com", balance="1.00"))
    tamper(memory_keyring, server, access="no-longer-accepted")
    client = client_for()  # starts from the keyring, holding the refused token
    fake_upstream.script("chat", Reply(body=completion("Pong.", u=usage(10, 2, cost="0.00001"))))
    reply = client.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ping"}])
    assert reply.choices[0].message.content == "Pong."
    assert stored(memory_keyring, server)["access"] != "no-longer-accepted"
    assert RefreshToken.objects.filter(used_at__isnull=False).count() == 1


def test_a_session_revoked_in_the_portal_signs_the_app_out(server, client_for, memory_keyring):
    client = client_for(make_user("alice@example.com"))
    token_family_revoke(family=TokenFamily.objects.get(), reason="signed out from the portal")
    with pytest.raises(SignedOut, match="revoked"):
        client.balance()
    assert memory_keyring.entries == {}
    assert client.account is None


def test_a_reused_refresh_token_revokes_the_login_and_signs_out(server, client_for, memory_keyring):
    client_for(make_user("alice@example.com"))
    stale = stored(memory_keyring, server)
    tamper(memory_keyring, server, refresh_after=0)
    client_for().balance()  # rotates: the stored refresh token is now used
    # A stale copy comes back (a restored backup, a second machine): presenting it is reuse.
    memory_keyring.set_password(f"tokentill {server}", stale["email"], json.dumps({**stale, "refresh_after": 0}))
    with pytest.raises(SignedOut, match="reuse"):
        client_for().balance()
    assert TokenFamily.objects.get().revoked_reason == "refresh_token_reuse"
    assert memory_keyring.entries == {}


def test_an_expired_refresh_token_signs_out(server, client_for, memory_keyring):
    client_for(make_user("alice@example.com"))
    RefreshToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    tamper(memory_keyring, server, refresh_after=0)
    with pytest.raises(SignedOut, match="expired"):
        client_for().balance()
    assert memory_keyring.entries == {}


def test_logout_revokes_the_refresh_token_on_the_server_and_clears_the_keyring(server, client_for, memory_keyring):
    client = client_for(make_user("alice@example.com"))
    refresh = stored(memory_keyring, server)["refresh"]
    client.logout()
    assert memory_keyring.entries == {}
    assert TokenFamily.objects.get().revoked_at is not None
    refused = httpx.post(server + "/api/auth/token/refresh", json={"refresh": refresh})
    assert refused.status_code == 401
    client.logout()  # signed out already: nothing to do, no error


def test_racing_threads_and_tasks_refresh_exactly_once(server, client_for, memory_keyring):
    """Refresh tokens rotate and reuse revokes the login: sixteen callers that all find the
    access token stale at the same moment must rotate it once, and all succeed."""
    client_for(make_user("alice@example.com", balance="3.00"))
    tamper(memory_keyring, server, refresh_after=0)
    client = client_for()
    barrier = threading.Barrier(8)
    results = []

    def in_a_thread():
        barrier.wait()
        results.append(client.balance().balance)

    async def in_tasks():
        return await asyncio.gather(*(client.abalance() for _ in range(8)))

    threads = [threading.Thread(target=in_a_thread) for _ in range(8)]
    for thread in threads:
        thread.start()
    results += [b.balance for b in asyncio.run(in_tasks())]
    for thread in threads:
        thread.join(30)
    assert results == [3] * 16
    assert TokenFamily.objects.get().revoked_at is None
    assert RefreshToken.objects.count() == 2  # the first, used once, and its successor


def test_without_an_os_keyring_the_error_says_what_to_do(server, real_passwords):
    import keyring.backends.fail
    from tokentill import KeyringUnavailable

    make_user("alice@example.com")
    client = Tokentill(server, keyring_backend=keyring.backends.fail.Keyring())
    with pytest.raises(KeyringUnavailable, match="Secret Service"):
        client.login_with_password("alice@example.com", PASSWORD)
    client.close()
    assert not TokenFamily.objects.exists()  # said before signing in: no login left behind


def test_in_assistant_message_mode_an_expired_token_is_refreshed_not_shown(
    fake_upstream_server, fake_upstream, price, memory_keyring
):
    """With REFUSAL_MODE=assistant_message the server answers an expired access token with a
    normal reply asking the user to sign in again (X-Tokentill-Blocked: unauthenticated). The
    client can sign itself in again, so it refreshes and the user sees the real answer."""
    from accounts.services import ACCESS_SALT
    from tests.client.conftest import server_env, sign_in
    from tests.fake_upstream import MODEL, Reply, completion, usage
    from tests.live import free_port, live_server
    from tests.test_proxy_signed_out import SignedAnHourAgo

    alice = make_user("alice@example.com", balance="1.00")
    port = free_port()
    with live_server(port=port, **server_env(fake_upstream_server, port, REFUSAL_MODE="assistant_message")) as url:
        sign_in(url, alice, memory_keyring)
        family = {"f": str(TokenFamily.objects.get().pk)}
        expired = SignedAnHourAgo(salt=ACCESS_SALT).sign_object(family, compress=False)
        tamper(memory_keyring, url, access=expired)
        fake_upstream.script("chat", Reply(body=completion("Pong.", u=usage(10, 2, cost="0.00001"))))
        client = Tokentill(url, keyring_backend=memory_keyring)
        reply = client.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ping"}])
        client.close()
    assert reply.choices[0].message.content == "Pong."
    assert RefreshToken.objects.filter(used_at__isnull=False).count() == 1
