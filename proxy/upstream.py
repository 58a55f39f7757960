"""Talking to the upstream (OpenRouter or any OpenAI-compatible server).

One shared ``httpx.AsyncClient`` per event loop — in a server process that is one client for the
whole process, so connections are pooled instead of a TLS handshake per request. (Tests run
an event loop per test, and a pooled connection cannot outlive its loop, hence the per-loop map.)
The server's upstream key goes only into the ``Authorization`` header of upstream requests; it is
never logged, echoed or sent to a client.

Proxied requests (``stream()``) go straight to that client's transport — its connection pool,
limits and timeouts — without the client's cookie jar, auth flow and redirect loop, which a proxy
must not use anyway: an upstream's cookies (Cloudflare sets them on OpenRouter's responses) would
be kept and replayed on every user's requests, and redirects are never followed. Measured: 475 →
309 µs of CPU per proxied request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import select
import ssl
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from urllib.parse import urlsplit

import certifi
import httpcore
import httpx
from django.conf import settings

from wallet.money import loads_decimal

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, httpx.AsyncHTTPTransport]] = (
    weakref.WeakKeyDictionary()
)


def timeout() -> httpx.Timeout:
    return httpx.Timeout(
        connect=settings.UPSTREAM_CONNECT_TIMEOUT,
        read=settings.UPSTREAM_READ_TIMEOUT,
        write=settings.UPSTREAM_CONNECT_TIMEOUT,
        pool=settings.UPSTREAM_CONNECT_TIMEOUT,
    )


class _LinearPool(httpcore.AsyncConnectionPool):
    """httpcore's connection pool, with its bookkeeping pass made cheaper per request.

    httpcore 1.0 runs ``_assign_requests_to_connections`` when every request starts and ends.
    Two costs grew with the pool: its clean-up loop built, for each idle connection, a list of
    the whole pool only to take its length (O(n²) per call), and it asked every idle connection
    whether the server had closed it — a ``poll`` system call each, twice per request. Here the
    length is ``len(self._connections)``, and the full expiry sweep runs at most every
    ``SWEEP_SECONDS``; in between, an idle connection is checked just before it is reused, so a
    request is still never sent down a connection the server has closed.
    """

    SWEEP_SECONDS = 0.5
    _swept_at = 0.0

    def _assign_requests_to_connections(self) -> list:
        closing_connections = []
        now = time.monotonic()
        sweep = now - self._swept_at >= self.SWEEP_SECONDS
        if sweep:
            self._swept_at = now
        for connection in list(self._connections):
            if connection.is_closed():
                self._connections.remove(connection)
            elif sweep and connection.has_expired():
                self._connections.remove(connection)
                closing_connections.append(connection)
            elif connection.is_idle() and len(self._connections) > self._max_keepalive_connections:
                self._connections.remove(connection)
                closing_connections.append(connection)

        queued_requests = [request for request in self._requests if request.is_queued()]
        for pool_request in queued_requests:
            origin = pool_request.request.url.origin
            available = None
            for candidate in list(self._connections):
                if candidate.can_handle_request(origin) and candidate.is_available():
                    if candidate.has_expired():  # closed by the server since the last sweep
                        self._connections.remove(candidate)
                        closing_connections.append(candidate)
                        continue
                    available = candidate
                    break
            if available is not None:
                pool_request.assign_to_connection(available)
            elif len(self._connections) < self._max_connections:
                connection = self.create_connection(origin)
                self._connections.append(connection)
                pool_request.assign_to_connection(connection)
            else:
                idle = next((c for c in self._connections if c.is_idle()), None)
                if idle is not None:
                    self._connections.remove(idle)
                    closing_connections.append(idle)
                    connection = self.create_connection(origin)
                    self._connections.append(connection)
                    pool_request.assign_to_connection(connection)
        return closing_connections


class _AsyncioStream(httpcore.AsyncNetworkStream):
    """An upstream connection as asyncio's own streams (uvloop's, in the server).

    httpcore's default backend goes through anyio, which wraps every read and write in a cancel
    scope, and does TLS itself in Python over a memory BIO; here a timeout is ``asyncio.timeout``
    and TLS is the event loop's. ``bench/upstream_client.py`` measures both. Failures map to
    httpcore's exceptions as its anyio backend maps them, so httpx raises what it always raised.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)  # b"" at the end: httpcore reads it as closed
        except TimeoutError:
            raise httpcore.ReadTimeout("timed out reading from the upstream") from None
        except OSError as exc:  # (ssl.SSLError is one)
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise httpcore.WriteTimeout("timed out writing to the upstream") from None
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        # As anyio closes a connection: at once, without a TLS goodbye the peer may never answer.
        self._writer.transport.abort()
        await asyncio.sleep(0)

    async def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            await self.aclose()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
        except OSError as exc:
            await self.aclose()
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str):
        if info == "is_readable":
            # httpcore asks every idle connection this before reusing it: one ``poll``. As its own
            # check, a socket that is gone counts as readable (about to read the end).
            sock = self._writer.get_extra_info("socket")
            fd = -1 if sock is None else sock.fileno()
            if fd < 0:
                return True
            poll = select.poll()
            poll.register(fd, select.POLLIN)
            return bool(poll.poll(0))
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info in ("ssl_object", "socket"):
            return self._writer.get_extra_info(info)
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on asyncio's streams (see ``_AsyncioStream``)."""

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None, socket_options=None
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout("timed out connecting to the upstream") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = writer.get_extra_info("socket")  # (asyncio turns Nagle off already)
        for option in socket_options or ():
            sock.setsockopt(*option)
        return _AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _transport(limits: httpx.Limits, *, verify: ssl.SSLContext | bool = True) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False, verify=verify)
    # httpx builds the pool itself; only a plain httpcore pool (the case here: no proxy, no
    # HTTP/2) has exactly the behaviour _LinearPool reproduces, so only that one is swapped.
    # (tests/test_proxy_lib.py checks the swap still happens after an httpx upgrade.)
    if type(getattr(transport, "_pool", None)) is httpcore.AsyncConnectionPool:
        transport._pool.__class__ = _LinearPool
        transport._pool._network_backend = AsyncioBackend()
    return transport


def verify() -> ssl.SSLContext:
    """What upstream certificates are trusted: the public CAs httpx trusts (certifi's bundle),
    and ``UPSTREAM_CA_BUNDLE``'s certificates besides."""
    context = ssl.create_default_context(cafile=certifi.where())
    if settings.UPSTREAM_CA_BUNDLE:
        context.load_verify_locations(cafile=settings.UPSTREAM_CA_BUNDLE)
    return context


def _shared() -> tuple[httpx.AsyncClient, httpx.AsyncHTTPTransport]:
    loop = asyncio.get_running_loop()
    shared = _clients.get(loop)
    if shared is None or shared[0].is_closed:
        limits = httpx.Limits(
            max_connections=settings.UPSTREAM_MAX_CONNECTIONS,
            max_keepalive_connections=min(settings.UPSTREAM_MAX_CONNECTIONS, 100),
            keepalive_expiry=30,
        )
        transport = _transport(limits, verify=verify())
        client = httpx.AsyncClient(
            timeout=timeout(),
            limits=limits,
            transport=transport,
            # Never pick up proxies or credentials from the environment for upstream calls.
            trust_env=False,
        )
        shared = _clients[loop] = (client, transport)
    return shared


def client() -> httpx.AsyncClient:
    return _shared()[0]


@lru_cache(maxsize=32)
def _parsed(url: str) -> httpx.URL:
    return httpx.URL(url)


@asynccontextmanager
async def stream(path: str, content: bytes) -> AsyncIterator[httpx.Response]:
    """POST ``content`` (JSON) to the upstream's ``path``; the response, its body still unread.

    Leaving the block closes the response: after reading it to the end that returns the
    connection to the pool; earlier (a client that left) it closes the connection, which is how
    an upstream generation is cancelled.
    """
    request = httpx.Request(
        "POST",
        _parsed(url(path)),
        headers=headers(),
        content=content,
        extensions={"timeout": timeout().as_dict()},
    )
    response = await _shared()[1].handle_async_request(request)
    try:
        yield response
    finally:
        await response.aclose()


def url(path: str) -> str:
    return f"{settings.UPSTREAM_BASE_URL}/{path.lstrip('/')}"


def is_openrouter() -> bool:
    return settings.UPSTREAM_KIND == "openrouter"


def headers() -> dict[str, str]:
    result = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if settings.UPSTREAM_API_KEY:
        result["Authorization"] = f"Bearer {settings.UPSTREAM_API_KEY}"
    if is_openrouter():
        # App attribution on openrouter.ai; the title only counts together with the referer.
        result["HTTP-Referer"] = settings.APP_URL
        result["X-Title"] = settings.APP_TITLE
        result["X-OpenRouter-Title"] = settings.APP_TITLE
    return result


def pseudonym(user_id: int) -> str:
    """A stable id per user the upstream can use for abuse isolation, revealing nothing."""
    return hmac.new(settings.SECRET_KEY.encode(), str(user_id).encode(), hashlib.sha256).hexdigest()


def _reads_max_tokens_only() -> bool:
    # Ollama reads only max_tokens; OpenAI's own API refuses max_tokens for reasoning models.
    return urlsplit(settings.UPSTREAM_BASE_URL).hostname != "api.openai.com"


def chat_body(body: dict, *, user_id: int, stream: bool, max_output: int) -> dict:
    """The client's request as the upstream gets it: output cap, usage switch, pseudonymous user.

    ``max_output`` — what the hold was taken for — is always sent, under the name the client used
    (``max_completion_tokens`` when it used neither): without it the upstream could generate
    more than the hold covers.
    """
    out = dict(body)
    out["user"] = pseudonym(user_id)
    if "max_completion_tokens" in out or "max_tokens" not in out:
        out["max_completion_tokens"] = max_output
    if "max_tokens" in out:
        out["max_tokens"] = max_output
    if is_openrouter():
        out["usage"] = {"include": True}
    else:
        if "max_completion_tokens" in out and "max_tokens" not in out and _reads_max_tokens_only():
            out["max_tokens"] = out["max_completion_tokens"]
        if stream:
            # Ask for the usage chunk even when the client did not; the relay strips it again.
            out["stream_options"] = {**(out.get("stream_options") or {}), "include_usage": True}
        else:
            # vLLM answers 400 to stream_options on a request that does not stream.
            out.pop("stream_options", None)
    return out


def embeddings_body(body: dict, *, user_id: int) -> dict:
    out = dict(body)
    out["user"] = pseudonym(user_id)
    return out


def error_message(raw: bytes) -> str:
    """The upstream's error text (OpenAI, OpenRouter and vLLM shapes), for the client and the record."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", errors="replace").strip()
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
    return ""


def generation_lookup(generation_id: str, *, attempts: int = 4, backoff: float = 0.5) -> dict | None:
    """OpenRouter's record of one generation (``GET /generation?id=``), or None.

    The record often appears only a moment after the generation ends, so a 404 is read as "not
    yet" and retried with a doubling pause, a bounded number of times.
    """
    with httpx.Client(timeout=timeout(), trust_env=False, verify=verify()) as sync_client:
        for attempt in range(attempts):
            try:
                response = sync_client.get(url("generation"), params={"id": generation_id}, headers=headers())
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 200:
                data = loads_decimal(response.content)
                return data.get("data") if isinstance(data, dict) and isinstance(data.get("data"), dict) else None
            if response is not None and response.status_code not in (404, 429) and response.status_code < 500:
                return None
            if attempt < attempts - 1:
                time.sleep(backoff * 2**attempt)
    return None
