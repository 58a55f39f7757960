"""``/ws/events``: live balance events for one user's open clients.

Authentication, in this order:

1. ``Authorization: Bearer <API key or access token>`` on the upgrade request (desktop clients);
2. the portal's session cookie, only when the ``Origin`` is one of ours;
3. otherwise the first message must be ``{"type": "auth", "token": "…"}`` within a few seconds.

Why the Origin check applies to cookies only: a browser attaches cookies to a WebSocket opened
by *any* site (cross-site WebSocket hijacking), so a cookie proves nothing unless the page came
from us. A bearer token is different: a foreign page cannot read it, so whoever presents one is
its holder, and desktop clients send no Origin at all. A cookie from a foreign origin is ignored,
not fatal — the connection may still authenticate with a token.

Failures are reported as an ``{"type": "error", …}`` message followed by a close with code 4401
(the reason string is dropped by some servers, the message is not). An operator key (``admin``
scope) is refused the same way, in the header or the first message: it works on ``/api/admin/``
only, as ``/api`` and ``/v1`` answer it 401.

Revocation: a socket remembers which credential it authenticated with — an API key, a login's
token family, or a portal session — and closes with 4401 as soon as a ``credential.revoked``
message for it (or for every credential of the user: the account was disabled) reaches its group
(``wallet.events``); the user's other sockets stay open. Expiry is not announced: it is noticed
when an event arrives, at most ``RECHECK_SECONDS`` late, which also covers a revocation message
the channel layer lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from importlib import import_module
from urllib.parse import urlparse

from channels.auth import get_user
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.security.websocket import OriginValidator
from channels.sessions import SessionMiddlewareStack
from channels.utils import await_many_dispatch
from django.conf import settings

from wallet import events
from wallet.services import wallet_get_or_create

from . import fanout
from .auth import AuthFailed, Principal, authenticate_bearer, bearer_from_header
from .authentication import OPERATOR_KEY_ELSEWHERE

AUTH_TIMEOUT_SECONDS = 5.0
# An open socket re-checks its credential (expired, or revoked where the announcement was lost)
# when an event arrives, at most this often, so that costs no query per event.
RECHECK_SECONDS = 60.0
REVOKED = "this credential has been revoked or has expired"

CLOSE_UNAUTHENTICATED = 4401
CLOSE_BAD_MESSAGE = 4400


def allowed_origins() -> list[str]:
    """Where our own pages are served from: APP_URL, CSRF_TRUSTED_ORIGINS and ALLOWED_HOSTS.

    A wildcard host is left out on purpose: ``ALLOWED_HOSTS=*`` must not turn every site on the
    web into a trusted origin for cookie-authenticated sockets.
    """
    hosts = [host for host in settings.ALLOWED_HOSTS if host != "*"]
    return [settings.APP_URL, *settings.CSRF_TRUSTED_ORIGINS, *hosts]


def origin_is_ours(headers: dict[bytes, bytes]) -> bool:
    raw = headers.get(b"origin")
    if not raw:
        return False
    try:
        parsed = urlparse(raw.decode("latin-1"))
        # Read here because Channels' check reads it unguarded: a port that is not a number, or
        # is out of range (``http://127.0.0.1:abc``, ``:99999``), raises ValueError. No page of
        # ours has such an origin, so it is foreign like any other.
        parsed.port  # noqa: B018
    except ValueError:
        return False
    return OriginValidator(None, allowed_origins()).valid_origin(parsed)


@database_sync_to_async
def _principal(token: str) -> tuple[Principal | None, str | None]:
    try:
        principal = authenticate_bearer(token)
    except AuthFailed as exc:
        return None, exc.reason
    if principal.api_key is not None and principal.api_key.organization_id is not None:
        # An organization's key is nobody's account: it has no user's balance to follow.
        return None, "an organization's API key has no live events"
    return principal, None


def _credential(principal: Principal) -> events.Credential:
    if principal.api_key is not None:
        return events.api_key_credential(principal.api_key.pk)
    return events.token_family_credential(principal.token_family_id)


@database_sync_to_async
def _snapshot(user) -> dict:
    wallet = wallet_get_or_create(user=user)
    wallet.refresh_from_db(fields=["balance", "held"])
    return events.balance_payload(balance=wallet.balance, held=wallet.held, reason="snapshot")


class EventsConsumer(AsyncJsonWebsocketConsumer):
    async def __call__(self, scope, receive, send):
        """Channels' loop without a layer channel of the socket's own: the process's hub
        (``accounts.fanout``) puts the group's messages in ``inbox``, drained here in order with the
        client's messages, as a layer channel would be."""
        self.scope = scope
        self.channel_layer = None
        self.inbox = fanout.new_inbox()
        self.base_send = send
        with contextlib.suppress(StopConsumer):
            await await_many_dispatch([receive, self.inbox.get], self.dispatch)

    async def connect(self):
        self.user = None
        self.credential: events.Credential | None = None
        self.group = None
        self.token = None
        self.closed = False
        self.checked_at = 0.0
        self.auth_timer = None
        headers = dict(self.scope.get("headers", []))

        token = bearer_from_header(headers.get(b"authorization"))
        if token:
            await self.accept()
            await self._authenticate_token(token)
            return

        if origin_is_ours(headers):
            user = await get_user(self.scope)
            if user.is_authenticated and user.is_active:
                await self.accept()
                await self._start(user, events.session_credential(self.scope["session"].session_key))
                return

        await self.accept()
        self.auth_timer = asyncio.create_task(self._auth_deadline())

    async def _auth_deadline(self):
        await asyncio.sleep(AUTH_TIMEOUT_SECONDS)
        if self.user is None:
            await self._refuse('authenticate within a few seconds: send {"type": "auth", "token": "…"}')

    async def _authenticate_token(self, token: str):
        principal, reason = await _principal(token)
        if principal is None:
            await self._refuse(reason)
            return
        if principal.is_operator_key:
            # Like /api and /v1: an operator key acts on others' accounts, never as its owner's
            # client, so it hears no balance events — refused exactly like a revoked key.
            await self._refuse(OPERATOR_KEY_ELSEWHERE)
            return
        self.token = token
        await self._start(principal.user, _credential(principal))

    async def _start(self, user, credential: events.Credential):
        self.user, self.credential = user, credential
        self.checked_at = time.monotonic()
        if self.auth_timer is not None:
            self.auth_timer.cancel()
        # Join before reading the snapshot: a change committed between the two is then sent as
        # an event after the snapshot, instead of falling into the gap and never being seen.
        self.group = events.group_for_user(user.pk)
        await fanout.hub().subscribe(self.group, self.inbox)
        # Likewise a revocation committed after the credential was checked but before the group
        # was joined was announced where this socket could not hear it; any later one reaches it.
        if not await self._credential_alive():
            await self._refuse(REVOKED)
            return
        await self.send_json(await _snapshot(user))

    async def _refuse(self, reason: str):
        if self.closed:
            return
        self.closed = True
        if self.group is not None:  # hear nothing more
            await fanout.hub().unsubscribe(self.group, self.inbox)
            self.group = None
        await self.send_json({"type": "error", "code": "unauthenticated", "message": reason})
        await self.close(code=CLOSE_UNAUTHENTICATED, reason=reason[:120])

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        try:
            content = await self.decode_json(text_data) if text_data else None
        except ValueError:
            content = None
        if not isinstance(content, dict):
            await self.send_json({"type": "error", "code": "bad_message", "message": "send JSON objects"})
            await self.close(code=CLOSE_BAD_MESSAGE, reason="send JSON objects")
            return
        kind = content.get("type")
        if self.user is None:
            token = content.get("token")
            if kind != "auth" or not isinstance(token, str) or not token:
                await self._refuse('the first message must be {"type": "auth", "token": "…"}')
                return
            await self._authenticate_token(token)
        elif kind == "ping":
            await self.send_json({"type": "pong"})
        # Anything else from an authenticated client is ignored: the stream is one-way.

    async def wallet_event(self, message):
        if self.closed:
            return
        if time.monotonic() - self.checked_at > RECHECK_SECONDS:
            if not await self._credential_alive():
                await self._refuse(REVOKED)
                return
            self.checked_at = time.monotonic()
        await self.send_json(message["event"])

    async def credential_revoked(self, message):
        revoked = message["credential"]
        if revoked is None or tuple(revoked) == self.credential:
            await self._refuse("this credential has been revoked")

    async def _credential_alive(self) -> bool:
        if self.user is None:  # only an authenticated socket joins the groups whose messages ask this
            raise RuntimeError("the credential of a socket not yet authenticated was checked")
        if self.token is not None:
            principal, _ = await _principal(self.token)
            user = principal.user if principal is not None else None
        else:
            # A fresh store: the scope's session was read once at connect and would not notice
            # a logout since.
            store = import_module(settings.SESSION_ENGINE).SessionStore(self.scope["session"].session_key)
            user = await get_user({"session": store})
        return user is not None and user.is_authenticated and user.pk == self.user.pk

    async def disconnect(self, code):
        if self.auth_timer is not None:
            self.auth_timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.auth_timer
        if self.group is not None:
            await fanout.hub().unsubscribe(self.group, self.inbox)


# The session middleware only makes the cookie's session readable; whether it counts is decided
# in connect(), after the Origin check.
events_application = SessionMiddlewareStack(EventsConsumer.as_asgi())
