"""Talking to the upstream (OpenRouter or any OpenAI-compatible server).

One shared ``httpx.AsyncClient`` per event loop — in a server process that is one client for the
whole process, so connections are pooled instead of a TLS handshake per request. (Tests run
an event loop per test, and a pooled connection cannot outlive its loop, hence the per-loop map.)
The server's upstream key goes only into the ``Authorization`` header of upstream requests; it is
never logged, echoed or sent to a client.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import weakref
from urllib.parse import urlsplit

import httpx
from django.conf import settings

from wallet.money import loads_decimal

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def timeout() -> httpx.Timeout:
    return httpx.Timeout(
        connect=float(settings.UPSTREAM_CONNECT_TIMEOUT),
        read=float(settings.UPSTREAM_READ_TIMEOUT),
        write=float(settings.UPSTREAM_CONNECT_TIMEOUT),
        pool=float(settings.UPSTREAM_CONNECT_TIMEOUT),
    )


def client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    shared = _clients.get(loop)
    if shared is None or shared.is_closed:
        shared = httpx.AsyncClient(
            timeout=timeout(),
            limits=httpx.Limits(
                max_connections=settings.UPSTREAM_MAX_CONNECTIONS,
                max_keepalive_connections=min(settings.UPSTREAM_MAX_CONNECTIONS, 100),
                keepalive_expiry=30,
            ),
            # Never pick up proxies or credentials from the environment for upstream calls.
            trust_env=False,
        )
        _clients[loop] = shared
    return shared


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


def chat_body(body: dict, *, user_id: int, stream: bool, max_output: int | None) -> dict:
    """The client's request as the upstream gets it: output cap, usage switch, pseudonymous user."""
    out = dict(body)
    out["user"] = pseudonym(user_id)
    if max_output is not None:
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
    with httpx.Client(timeout=timeout(), trust_env=False) as sync_client:
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
