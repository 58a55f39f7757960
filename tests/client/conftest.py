# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)
"""Fixtures for the client package's tests: a live server (the shipped uvicorn command) with the
fake upstream and the fake Lemon Squeezy behind it, an in-memory keyring, signed-in clients.

The keyring: every test here runs with an in-memory backend set as keyring's default, so neither
a test nor the code under test can ever reach the developer's real keyring.
"""

from __future__ import annotations

import keyring
import pytest
from django.conf import settings as django_settings

from tests.client.memory_keyring import MemoryKeyring
from tests.fake_payment_apis import LS_SECRET, FakeLemonSqueezy
from tests.fake_upstream import fake_upstream, fake_upstream_server, price  # noqa: F401  (fixtures)
from tests.live import free_port, live_server

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def fast_password_hashing(request, settings):
    """Personas are made in this process with a fast hasher, and signed in with tokens minted
    here: most tests are not about passwords. A test that signs in by password asks for
    ``real_passwords``, and its users get a hash the live server (with its own hashers) checks."""
    if "real_passwords" not in request.fixturenames:
        settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def real_passwords():
    """See ``fast_password_hashing``."""


def sign_in(server: str, user, backend) -> None:
    """Put a fresh login for ``user`` in ``backend`` as the package stores it, so a client made
    next finds it there like a restarted app (the password sign-in has tests of its own)."""
    from tokentill._store import Tokens, TokenStore

    from accounts.services import token_pair_issue

    pair = token_pair_issue(user=user)
    issued = {"access": pair.access, "refresh": pair.refresh, "expires_in": pair.expires_in}
    TokenStore(server, service_name="tokentill", backend=backend).save(Tokens.issued(issued, email=user.email))


@pytest.fixture(autouse=True)
def memory_keyring():
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def server_env(fake_upstream_server, port: int, **extra: str) -> dict:
    url = f"http://127.0.0.1:{port}"
    return {
        "SECRET_KEY": django_settings.SECRET_KEY,
        "APP_URL": url,
        "UPSTREAM_BASE_URL": fake_upstream_server.url,
        "UPSTREAM_API_KEY": "sk-or-v1-server-secret",
        "UPSTREAM_KIND": "openrouter",
        "PROXY_PRICE_CACHE_SECONDS": "0",
        "LEMONSQUEEZY_WEBHOOK_SECRET": LS_SECRET,
        "LOG_LEVEL": "WARNING",
        # An app waits this long before it first asks whether the person approved (RFC 8628's
        # 5 s by default): the browser sign-in tests approve at once, then sat out the rest.
        "DEVICE_POLL_INTERVAL": "1",
        **extra,
    }


@pytest.fixture(scope="package")
def fake_ls_server():
    with FakeLemonSqueezy() as fake:
        yield fake


@pytest.fixture(scope="package")
def server(django_db_setup, django_db_blocker, fake_upstream_server, fake_ls_server):
    """One server for the whole package, Lemon Squeezy checkout and webhooks configured."""
    port = free_port()
    env = server_env(
        fake_upstream_server,
        port,
        LEMONSQUEEZY_API_URL=fake_ls_server.url,
        LEMONSQUEEZY_API_KEY="ls_test_key",
        LEMONSQUEEZY_STORE_ID="70011",
    )
    with live_server(port=port, **env) as url:
        yield url


@pytest.fixture
def client_for(server, memory_keyring):
    """``client_for(user)``: a Tokentill client signed in as ``user`` (``password=True``: through
    the password sign-in, which needs ``real_passwords``); ``client_for()`` starts from whatever
    the keyring holds, as a restarted app would."""
    from tokentill import Tokentill

    made = []

    def make(user=None, *, password: bool = False, **options):
        backend = options.pop("keyring_backend", memory_keyring)
        if user is not None and not password:
            sign_in(server, user, backend)
        client = Tokentill(server, keyring_backend=backend, **options)
        made.append(client)
        if user is not None and password:
            client.login_with_password(user.email, PASSWORD)
        return client

    yield make
    for client in made:
        client.close()
