"""Talking to the upstreams (OpenRouter, any OpenAI-compatible server, Anthropic).

An upstream is described by an ``UpstreamConfig``: the *default upstream* is built from the
``UPSTREAM_*`` settings (``default()``), the others from the ``Upstream`` rows staff add in the
admin (``config_of``). Every function here takes the config to talk to; left out, it is the
default upstream, as before there were several.

One shared ``httpx.AsyncClient`` per event loop *and upstream* — in a server process that is one
client per upstream for the whole process, so connections are pooled instead of a TLS handshake
per request, each with that upstream's certificates and connection limit. (Tests run an event
loop per test, and a pooled connection cannot outlive its loop, hence the per-loop map and
``close()``.) An upstream's key goes only into the auth headers of requests to it; it is never
logged, echoed or sent to a client (``UpstreamConfig``'s repr leaves it out).

The client's transport is aiohttp's HTTP/1.1 client (``AiohttpTransport``): httpx's request and
response objects, limits and timeouts, over aiohttp's C-accelerated parser and connection pool.
``bench/upstream_client.py`` measures the event loop's CPU per proxied call through either
transport (httpx's own, httpcore and h11, costs several times more); the figures are in the
README's Benchmarks.
Proxied requests (``stream()``) go straight to the transport — without the client's cookie jar,
auth flow and redirect loop, which a proxy must not use anyway: an upstream's cookies
(Cloudflare sets them on OpenRouter's responses) would be kept and replayed on every user's
requests, and redirects are never followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

import aiohttp
import certifi
import httpx
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from core.money import loads_decimal

from . import keyvault
from .models import DEFAULT_UPSTREAM, Upstream

ANTHROPIC_VERSION = "2023-06-01"  # the Messages API version sent to upstreams of the anthropic kind


@dataclass(frozen=True)
class UpstreamConfig:
    """Everything needed to call one upstream. The key is kept out of ``repr`` (and so out of
    logs and tracebacks that print the config)."""

    name: str
    kind: str  # openrouter | openai | anthropic
    base_url: str  # no trailing slash
    api_key: str = field(default="", repr=False)
    ca_bundle: str = ""  # PEM text, or the path of a PEM file
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    max_connections: int = 200
    max_concurrency: int = 0  # requests in flight per process; 0 = no limit
    unusable: str = ""  # why it cannot be called (its stored key cannot be decrypted), or ""

    @property
    def is_openrouter(self) -> bool:
        return self.kind == "openrouter"

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_UPSTREAM


@lru_cache(maxsize=1)
def default() -> UpstreamConfig:
    """The default upstream: the ``UPSTREAM_*`` settings, exactly as they were always read.
    Built once (a request asks for it several times); a change of those settings (tests'
    ``override_settings``) builds it again (``_upstream_settings_changed``)."""
    return UpstreamConfig(
        name=DEFAULT_UPSTREAM,
        kind=settings.UPSTREAM_KIND,
        base_url=settings.UPSTREAM_BASE_URL,
        api_key=settings.UPSTREAM_API_KEY,
        ca_bundle=settings.UPSTREAM_CA_BUNDLE,
        connect_timeout=settings.UPSTREAM_CONNECT_TIMEOUT,
        read_timeout=settings.UPSTREAM_READ_TIMEOUT,
        max_connections=settings.UPSTREAM_MAX_CONNECTIONS,
    )


@receiver(setting_changed)
def _upstream_settings_changed(*, setting: str, **kwargs) -> None:
    if setting.startswith("UPSTREAM_"):
        default.cache_clear()


def config_of(row: Upstream) -> UpstreamConfig:
    """An ``Upstream`` row as a config, its key decrypted (``unusable`` says why when it cannot be)."""
    api_key, unusable = "", ""
    if row.api_key_encrypted:
        try:
            api_key = _decrypted(row.api_key_encrypted, tuple(settings.UPSTREAM_KEY_ENCRYPTION_KEYS))
        except keyvault.KeyVaultError as exc:
            unusable = str(exc)
    return UpstreamConfig(
        name=row.name,
        kind=row.kind,
        base_url=row.base_url.rstrip("/"),
        api_key=api_key,
        ca_bundle=row.ca_bundle.strip(),
        connect_timeout=row.connect_timeout,
        read_timeout=row.read_timeout,
        max_connections=row.max_connections,
        max_concurrency=row.max_concurrency,
        unusable=unusable,
    )


@lru_cache(maxsize=256)
def _decrypted(token: str, keys: tuple[str, ...]) -> str:
    # Memoised: the routing table is re-read every PROXY_PRICE_CACHE_SECONDS, the key rarely
    # changes. (Keyed by the encryption keys too, so a rotation is seen at once.)
    return keyvault.decrypt(token)


def timeout(target: UpstreamConfig | None = None) -> httpx.Timeout:
    target = target or default()
    return httpx.Timeout(
        connect=target.connect_timeout,
        read=target.read_timeout,
        write=target.connect_timeout,
        pool=target.connect_timeout,
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
        timeouts = aiohttp.ClientTimeout(
            total=None, connect=limits.get("pool"), sock_connect=limits.get("connect"), sock_read=limits.get("read")
        )
        return await self.send(
            request.method,
            str(request.url),
            request.headers.multi_items(),
            request.content or None,
            timeouts,
            request=request,
        )

    async def send(
        self,
        method: str,
        url: str,
        headers,
        content: bytes | None,
        timeouts: aiohttp.ClientTimeout,
        *,
        request: httpx.Request | None = None,
    ) -> httpx.Response:
        """``handle_async_request`` without an ``httpx.Request`` to build and take apart again
        (``stream()``: the proxy's calls, where building one was a few per cent of a request's
        CPU). The response is httpx's all the same; its ``request`` is ``request``."""
        try:
            response = await self._client().request(
                method, url, headers=headers, data=content, allow_redirects=False, timeout=timeouts
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


def is_pem(ca_bundle: str) -> bool:
    return ca_bundle.lstrip().startswith("-----BEGIN")


def verify(target: UpstreamConfig | None = None) -> ssl.SSLContext:
    """What upstream certificates are trusted: the public CAs httpx trusts (certifi's bundle),
    and the upstream's CA bundle besides (``UPSTREAM_CA_BUNDLE`` for the default upstream; PEM
    text or a file for the others). Raises ``ssl.SSLError``/``OSError`` for a bundle that cannot
    be loaded."""
    ca_bundle = (target or default()).ca_bundle
    context = ssl.create_default_context(cafile=certifi.where())
    if ca_bundle and is_pem(ca_bundle):
        context.load_verify_locations(cadata=ca_bundle)
    elif ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


# Per event loop, per upstream: (client, transport). Keyed by what the transport is built from,
# so a staff edit of an upstream's certificates or connection limit gets a fresh client; the one
# it replaces is *retired* — kept, not closed, so requests still running on it finish (its idle
# connections expire after their keep-alive) — and closed with the rest by ``close()``.
_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple, tuple[httpx.AsyncClient, AiohttpTransport]]
] = weakref.WeakKeyDictionary()
_retired: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[httpx.AsyncClient]] = weakref.WeakKeyDictionary()


def _shared(target: UpstreamConfig | None = None) -> tuple[httpx.AsyncClient, AiohttpTransport]:
    target = target or default()
    loop = asyncio.get_running_loop()
    per_loop = _clients.get(loop)
    if per_loop is None:
        per_loop = _clients[loop] = {}
    key = (target.name, target.ca_bundle, target.max_connections)
    shared = per_loop.get(key)
    if shared is None or shared[0].is_closed:
        for stale in [other for other in per_loop if other[0] == target.name]:
            _retired.setdefault(loop, []).append(per_loop.pop(stale)[0])
        # (aiohttp keeps every idle connection up to the total; it has no separate keep-alive cap.)
        limits = httpx.Limits(max_connections=target.max_connections, keepalive_expiry=30)
        transport = AiohttpTransport(limits, verify=verify(target))
        client = httpx.AsyncClient(
            timeout=timeout(target),
            transport=transport,
            # Never pick up proxies or credentials from the environment for upstream calls.
            trust_env=False,
        )
        shared = per_loop[key] = (client, transport)
    return shared


def client(target: UpstreamConfig | None = None) -> httpx.AsyncClient:
    return _shared(target)[0]


async def close() -> None:
    """Close this event loop's clients and their connections (tests, whose loops are short-lived)."""
    loop = asyncio.get_running_loop()
    clients = [shared[0] for shared in _clients.pop(loop, {}).values()] + _retired.pop(loop, [])
    for each in clients:
        await each.aclose()


@lru_cache(maxsize=64)
def _timeouts(target: UpstreamConfig) -> aiohttp.ClientTimeout:
    """``timeout(target)`` as the transport applies it (see ``AiohttpTransport``)."""
    limits = timeout(target)
    return aiohttp.ClientTimeout(total=None, connect=limits.pool, sock_connect=limits.connect, sock_read=limits.read)


@asynccontextmanager
async def stream(path: str, content: bytes, target: UpstreamConfig | None = None) -> AsyncIterator[httpx.Response]:
    """POST ``content`` (JSON) to the upstream's ``path``; the response, its body still unread.

    Leaving the block closes the response: after reading it to the end that returns the
    connection to the pool; earlier (a client that left) it closes the connection, which is how
    an upstream generation is cancelled.
    """
    target = target or default()
    transport = _shared(target)[1]
    response = await transport.send("POST", url(path, target), headers(target), content, _timeouts(target))
    try:
        yield response
    finally:
        await response.aclose()


def url(path: str, target: UpstreamConfig | None = None) -> str:
    return f"{(target or default()).base_url}/{path.lstrip('/')}"


def is_openrouter(target: UpstreamConfig | None = None) -> bool:
    return (target or default()).is_openrouter


def speaks(protocol: str, target: UpstreamConfig | None = None) -> bool:
    """Does ``target`` (the default upstream when None) serve ``protocol`` ("responses",
    "messages", "count_tokens") itself? Then a request in it is forwarded as it is; otherwise it
    is translated to chat completions. The one place this is decided."""
    target = target or default()
    if protocol == "responses":
        # The default upstream follows UPSTREAM_RESPONSES; OpenRouter serves /responses.
        return settings.UPSTREAM_RESPONSES == "native" if target.is_default else target.kind == "openrouter"
    if protocol == "messages":
        # OpenRouter serves /messages; an Anthropic upstream serves nothing else.
        return target.kind in ("openrouter", "anthropic")
    if protocol == "count_tokens":
        # Only Anthropic's own API documents /messages/count_tokens (docs/protocols).
        return target.kind == "anthropic"
    raise ValueError(f"unknown protocol {protocol!r}")


def headers(target: UpstreamConfig | None = None) -> dict[str, str]:
    target = target or default()
    result = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if target.api_key:
        result["Authorization"] = f"Bearer {target.api_key}"
    if target.kind == "anthropic":
        # Anthropic's own Messages API reads the key from x-api-key; its OpenAI-compatible
        # chat completions from the bearer. Both go, with the API version it requires.
        if target.api_key:
            result["x-api-key"] = target.api_key
        result["anthropic-version"] = ANTHROPIC_VERSION
    if target.is_openrouter:
        # App attribution on openrouter.ai; the title only counts together with the referer.
        result["HTTP-Referer"] = settings.APP_URL
        result["X-Title"] = settings.APP_TITLE
        result["X-OpenRouter-Title"] = settings.APP_TITLE
    return result


def pseudonym(user_id: int) -> str:
    """A stable id per user the upstream can use for abuse isolation, revealing nothing."""
    return hmac.new(settings.SECRET_KEY.encode(), str(user_id).encode(), hashlib.sha256).hexdigest()


def _reads_max_tokens_only(target: UpstreamConfig) -> bool:
    # Ollama reads only max_tokens; OpenAI's own API refuses max_tokens for reasoning models.
    return urlsplit(target.base_url).hostname != "api.openai.com"


def chat_body(body: dict, *, user_id: int, stream: bool, max_output: int, target: UpstreamConfig | None = None) -> dict:
    """The client's request as ``target`` gets it: output cap, usage switch, pseudonymous user.

    ``max_output`` — what the hold was taken for — is always sent, under the name the client used
    (``max_completion_tokens`` when it used neither): without it the upstream could generate
    more than the hold covers.
    """
    target = target or default()
    out = dict(body)
    out["user"] = pseudonym(user_id)
    if "max_completion_tokens" in out or "max_tokens" not in out:
        out["max_completion_tokens"] = max_output
    if "max_tokens" in out:
        out["max_tokens"] = max_output
    if target.is_openrouter:
        out["usage"] = {"include": True}
    else:
        if "max_completion_tokens" in out and "max_tokens" not in out and _reads_max_tokens_only(target):
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
    metadata = out.get("metadata")
    out["metadata"] = {**(metadata if isinstance(metadata, dict) else {}), "user_id": pseudonym(user_id)}
    return out


def embeddings_body(body: dict, *, user_id: int) -> dict:
    out = dict(body)
    out["user"] = pseudonym(user_id)
    return out


def generation_lookup(
    generation_id: str, *, attempts: int = 4, backoff: float = 0.5, target: UpstreamConfig | None = None
) -> dict | None:
    """OpenRouter's record of one generation (``GET /generation?id=``) at ``target``, or None.

    The record often appears only a moment after the generation ends, so a 404 is read as "not
    yet" and retried with a doubling pause, a bounded number of times.
    """
    target = target or default()
    with httpx.Client(timeout=timeout(target), trust_env=False, verify=verify(target)) as sync_client:
        for attempt in range(attempts):
            try:
                response = sync_client.get(
                    url("generation", target), params={"id": generation_id}, headers=headers(target)
                )
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
