"""The signed-in state of one client: tokens from the keyring, refreshed under one lock.

Refresh tokens rotate, and presenting one twice makes the server revoke the whole login (its
defence against a stolen token). So however many threads, tasks and openai clients share a
``Tokentill``, one refresh happens at a time, and a caller that waited for the lock first looks
whether someone else already refreshed (the refresh token it saw is no longer the stored one)
before rotating again. The lock is a ``threading.Lock``; async callers take it in a worker thread
(``asyncio.to_thread``), so an event loop never blocks on it and tasks and threads share one
critical section. Inside it the keyring is read again, so a token another process on this machine
(the CLI beside the app) rotated meanwhile is adopted rather than reused.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Generator

import httpx

from ._store import Tokens, TokenStore
from .errors import ApiError, SignedOut

BLOCKED_HEADER = "x-tokentill-blocked"


def _needs_refresh(tokens: Tokens) -> bool:
    return time.time() >= tokens.refresh_after


class Session:
    def __init__(self, store: TokenStore, http: httpx.Client):
        self._store = store
        self._http = http  # unauthenticated: the refresh token in the body is the credential
        self._lock = threading.Lock()
        self._tokens: Tokens | None = None
        self._loaded = False

    # --- state -------------------------------------------------------------------------------

    def tokens(self) -> Tokens | None:
        if not self._loaded:
            self._tokens, self._loaded = self._store.load(), True
        return self._tokens

    def adopt(self, tokens: Tokens) -> None:
        with self._lock:
            self._store.save(tokens)
            self._tokens, self._loaded = tokens, True

    def forget(self) -> Tokens | None:
        """Drop the tokens here and in the keyring; returns what was dropped."""
        with self._lock:
            tokens = self.tokens()
            self._store.clear(tokens.email if tokens else None)
            self._tokens, self._loaded = None, True
            return tokens

    # --- access tokens -----------------------------------------------------------------------

    def current(self) -> Tokens:
        """Usable tokens, the access token refreshed first when it is about to expire."""
        tokens = self.tokens()
        if tokens is None:
            raise SignedOut("not signed in to this server")
        return self.refresh(seen=tokens) if _needs_refresh(tokens) else tokens

    async def acurrent(self) -> Tokens:
        tokens = self.tokens()
        if tokens is None:
            raise SignedOut("not signed in to this server")
        return await self.arefresh(seen=tokens) if _needs_refresh(tokens) else tokens

    def refresh(self, *, seen: Tokens) -> Tokens:
        """Tokens replacing ``seen`` (the set a refused request used, or one about to expire).

        A rotation is recognised by the refresh token, not the access token: two access tokens
        minted in the same second for one login are the same string. Raises ``SignedOut`` (and
        clears the keyring entry) when the server refuses the refresh token; a network failure
        propagates and keeps the tokens for the next attempt."""
        with self._lock:
            tokens = self._store.load()  # what this or another process last stored
            if tokens is None:
                self._tokens = None
                raise SignedOut("not signed in to this server")
            if tokens.refresh != seen.refresh and not _needs_refresh(tokens):
                self._tokens = tokens  # someone else rotated while we waited
                return tokens
            response = self._http.post("/api/auth/token/refresh", json={"refresh": tokens.refresh})
            if response.status_code in (400, 401):
                self._store.clear(tokens.email)
                self._tokens = None
                raise SignedOut(f"signed out: {_detail(response)}")
            if response.status_code != 200:
                raise ApiError(response.status_code, _detail(response))
            fresh = Tokens.issued(response.json(), email=tokens.email, id=tokens.id)
            self._store.save(fresh)
            self._tokens = fresh
            return fresh

    async def arefresh(self, *, seen: Tokens) -> Tokens:
        return await asyncio.to_thread(self.refresh, seen=seen)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("error") or body)
    return str(body)


def _refused_credential(response: httpx.Response) -> bool:
    # A 401, or (in the server's assistant-message mode) a completion that only says "sign in
    # again": both mean this access token is no longer accepted.
    return response.status_code == 401 or response.headers.get(BLOCKED_HEADER) == "unauthenticated"


class BearerAuth(httpx.Auth):
    """Puts the session's current access token on every request; on a refusal refreshes once and
    sends the request again. The same object serves sync and async httpx clients."""

    def __init__(self, session: Session):
        self._session = session

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        tokens = self._session.current()
        request.headers["Authorization"] = f"Bearer {tokens.access}"
        response = yield request
        if _refused_credential(response):
            request.headers["Authorization"] = f"Bearer {self._session.refresh(seen=tokens).access}"
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        tokens = await self._session.acurrent()
        request.headers["Authorization"] = f"Bearer {tokens.access}"
        response = yield request
        if _refused_credential(response):
            request.headers["Authorization"] = f"Bearer {(await self._session.arefresh(seen=tokens)).access}"
            yield request
