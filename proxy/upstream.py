"""Talking to the upstream (OpenRouter or any OpenAI-compatible server).

One shared ``httpx.AsyncClient`` per event loop — in a server process that is one client for the
whole process, so connections are pooled instead of a TLS handshake per request. (Tests run
an event loop per test, and a pooled connection cannot outlive its loop, hence the per-loop map
and ``close()``.) The server's upstream key goes only into the ``Authorization`` header of
upstream requests; it is never logged, echoed or sent to a client.

The client's transport is aiohttp's HTTP/1.1 client (``AiohttpTransport``): httpx's request and
response objects, limits and timeouts, over aiohttp's C-accelerated parser and connection pool.
Measured with ``bench/upstream_client.py``, one proxied call cost about 690 µs of the event
loop's CPU through httpx's own transport (httpcore, h11) and about 245 µs through this one.
Proxied requests (``stream()``) go straight to the transport — without the client's cookie jar,
auth flow and redirect loop, which a proxy must not use anyway: an upstream's cookies
(Cloudflare sets them on OpenRouter's responses) would be kept and replayed on every user's
requests, and redirects are never followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from urllib.parse import urlsplit

import aiohttp
import certifi
import httpx
from django.conf import settings

from core.money import loads_decimal

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, AiohttpTransport]] = (
    weakref.WeakKeyDictionary()
)


def timeout() -> httpx.Timeout:
    return httpx.Timeout(
        connect=settings.UPSTREAM_CONNECT_TIMEOUT,
        read=settings.UPSTREAM_READ_TIMEOUT,
        write=settings.UPSTREAM_CONNECT_TIMEOUT,
        pool=settings.UPSTREAM_CONNECT_TIMEOUT,
    )


def _httpx_error(exc: Exception) -> httpx.TransportError:
    """What httpx's own transport raises for the same failure, so callers see what they always saw.

    (httpx-aiohttp, the published adapter, maps every connection error to ``ConnectTimeout``: an
    upstream that dropped the connection would then read as a timeout — a 504, not a 502.)
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # waiting for a pooled connection, or connecting
        return httpx.ConnectTimeout(str(exc) or "timed out connecting to the upstream")
    if isinstance(exc, TimeoutError):  # aiohttp's sock_read: nothing arrived for the read timeout
        return httpx.ReadTimeout(str(exc) or "timed out reading from the upstream")
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unresolvable, TLS handshake or certificate
        return httpx.ConnectError(str(exc))
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(str(exc) or "the upstream broke the HTTP exchange")
    if isinstance(exc, OSError):  # (aiohttp's ClientOSError is one) the connection failed mid-exchange
        return httpx.ReadError(str(exc))
    return httpx.TransportError(str(exc) or type(exc).__name__)


_FAILURES = (aiohttp.ClientError, OSError)  # TimeoutError is an OSError


class _Body(httpx.AsyncByteStream):
    """A response body as aiohttp receives it: each chunk as soon as it arrives (SSE relays
    need that), transfer-decoded, content-encoding left to httpx."""

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while chunk := await self._response.content.readany():
                yield chunk
        except _FAILURES as exc:
            raise _httpx_error(exc) from exc

    async def aclose(self) -> None:
        # Read to its end, the connection goes back to the pool; left unread — a client that left
        # mid-answer — it is closed, and closing it is how an upstream generation is cancelled.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over one ``aiohttp.ClientSession`` (made on first use, on the
    running loop). ``limits`` bound the connections and their keep-alive; a request's httpx
    timeouts apply as aiohttp's: ``pool`` to getting a connection, ``connect`` to opening one,
    ``read`` between received bytes (which also catches an upstream that stops reading)."""

    def __init__(self, limits: httpx.Limits, *, verify: ssl.SSLContext | None = None):
        self._limits = limits
        self._ssl = verify if verify is not None else ssl.create_default_context(cafile=certifi.where())
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limits.max_connections or 0,
                keepalive_timeout=self._limits.keepalive_expiry,
                ssl=self._ssl,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # an upstream's cookies are never kept (above)
                auto_decompress=False,  # httpx decodes Content-Encoding, as with its own transport
                trust_env=False,  # never an environment proxy or .netrc credentials
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        limits = request.extensions.get("timeout", {})
        try:
            response = await self._client().request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=request.content or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=limits.get("pool"),
                    sock_connect=limits.get("connect"),
                    sock_read=limits.get("read"),
                ),
            )
        except _FAILURES as exc:
            raise _httpx_error(exc) from exc
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode("latin-1")},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def verify() -> ssl.SSLContext:
    """What upstream certificates are trusted: the public CAs httpx trusts (certifi's bundle),
    and ``UPSTREAM_CA_BUNDLE``'s certificates besides."""
    context = ssl.create_default_context(cafile=certifi.where())
    if settings.UPSTREAM_CA_BUNDLE:
        context.load_verify_locations(cafile=settings.UPSTREAM_CA_BUNDLE)
    return context


def _shared() -> tuple[httpx.AsyncClient, AiohttpTransport]:
    loop = asyncio.get_running_loop()
    shared = _clients.get(loop)
    if shared is None or shared[0].is_closed:
        # (aiohttp keeps every idle connection up to the total; it has no separate keep-alive cap.)
        limits = httpx.Limits(max_connections=settings.UPSTREAM_MAX_CONNECTIONS, keepalive_expiry=30)
        transport = AiohttpTransport(limits, verify=verify())
        client = httpx.AsyncClient(
            timeout=timeout(),
            transport=transport,
            # Never pick up proxies or credentials from the environment for upstream calls.
            trust_env=False,
        )
        shared = _clients[loop] = (client, transport)
    return shared


def client() -> httpx.AsyncClient:
    return _shared()[0]


async def close() -> None:
    """Close this event loop's client and its connections (tests, whose loops are short-lived)."""
    shared = _clients.pop(asyncio.get_running_loop(), None)
    if shared is not None:
        await shared[0].aclose()


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


def speaks(protocol: str) -> bool:
    """Does the upstream serve ``protocol`` ("responses", "messages") itself? Then a request in
    it is forwarded as it is; otherwise it is translated to chat completions. The one place this
    is decided."""
    if protocol == "responses":
        return settings.UPSTREAM_RESPONSES == "native"
    if protocol == "messages":
        # OpenRouter serves /messages; an Anthropic upstream serves nothing else.
        return settings.UPSTREAM_KIND in ("openrouter", "anthropic")
    if protocol == "count_tokens":
        # Only Anthropic's own API documents /messages/count_tokens (docs/protocols).
        return settings.UPSTREAM_KIND == "anthropic"
    raise ValueError(f"unknown protocol {protocol!r}")


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


def responses_body(body: dict, *, user_id: int, max_output: int) -> dict:
    """A Responses API request as the upstream gets it: the output cap the hold was taken for,
    nothing stored upstream (the gateway keeps no state, and stored responses would outlive
    the user's account), the pseudonymous user."""
    out = dict(body)
    out["max_output_tokens"] = max_output
    out["store"] = False
    out["user"] = pseudonym(user_id)
    return out


def messages_body(body: dict, *, user_id: int, max_output: int) -> dict:
    """An Anthropic Messages request as the upstream gets it: the output cap the hold was taken
    for, the pseudonymous user in ``metadata.user_id``."""
    out = dict(body)
    out["max_tokens"] = max_output
    metadata = out.get("metadata") if isinstance(out.get("metadata"), dict) else {}
    out["metadata"] = {**metadata, "user_id": pseudonym(user_id)}
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
