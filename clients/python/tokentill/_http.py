"""The httpx and openai plumbing: what every response tells about money, streams included; an
async transport that survives several event loops; openai clients that raise our errors.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import openai

from .errors import status_error_for, usd

TAIL_PREFIX = b": tokentill "


@dataclass(frozen=True)
class Charge:
    """What one response cost and what was left (USD)."""

    request_id: str | None
    charge: Decimal | None
    balance: Decimal | None


class Meter:
    """Remembers the last charge reported on any response made through the client.

    Non-streamed responses carry ``X-Tokentill-Charge`` / ``X-Tokentill-Balance``. A stream's
    charge is only known at its end, where the server writes an SSE comment line
    (``: tokentill {"request_id", "charge", "balance"}``) just before ``data: [DONE]``; the openai
    SDK skips comments, so the response hook wraps the response's byte stream in a reader that
    passes every byte through unchanged and picks that line out on the way.
    """

    def __init__(self) -> None:
        self.last: Charge | None = None
        self._listeners: list[Callable[[Charge], Any]] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Callable[[Charge], Any]) -> None:
        self._listeners.append(listener)

    def record(self, charge: Charge) -> None:
        with self._lock:
            self.last = charge
        for listener in self._listeners:
            listener(charge)

    def record_info(self, info: dict) -> None:
        self.record(Charge(info.get("request_id"), usd(info.get("charge")), usd(info.get("balance"))))

    def on_response(self, response: httpx.Response) -> None:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            if isinstance(response.stream, httpx.AsyncByteStream):
                response.stream = _AsyncTail(response.stream, self.record_info)
            else:
                response.stream = _SyncTail(response.stream, self.record_info)
        elif "x-tokentill-charge" in response.headers:
            headers = response.headers
            self.record(
                Charge(
                    headers.get("x-request-id"),
                    usd(headers.get("x-tokentill-charge")),
                    usd(headers.get("x-tokentill-balance")),
                )
            )

    async def aon_response(self, response: httpx.Response) -> None:
        self.on_response(response)


class _TailParser:
    """Finds ``: tokentill {...}`` lines in an SSE byte stream, whatever the chunk boundaries.
    Only a line that can still become one is buffered: long data lines are skipped, not kept."""

    def __init__(self, on_info: Callable[[dict], Any]):
        self._on_info = on_info
        self._line = b""
        self._skipping = False

    def feed(self, chunk: bytes) -> None:
        for index, piece in enumerate(chunk.split(b"\n")):
            if index:
                self._end_line()
            if self._skipping:
                continue
            self._line += piece
            if not (self._line.startswith(TAIL_PREFIX) or TAIL_PREFIX.startswith(self._line)):
                self._line, self._skipping = b"", True

    def _end_line(self) -> None:
        line, self._line, self._skipping = self._line.rstrip(b"\r"), b"", False
        if line.startswith(TAIL_PREFIX):
            try:
                info = json.loads(line[len(TAIL_PREFIX) :])
            except ValueError:
                return
            if isinstance(info, dict):
                self._on_info(info)


class _SyncTail(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, on_info: Callable[[dict], Any]):
        self._inner, self._parser = inner, _TailParser(on_info)

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._parser.feed(chunk)
            yield chunk

    def close(self) -> None:
        self._inner.close()


class _AsyncTail(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, on_info: Callable[[dict], Any]):
        self._inner, self._parser = inner, _TailParser(on_info)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._parser.feed(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class PerLoopTransport(httpx.AsyncBaseTransport):
    """httpx's async connection pool belongs to the event loop that opened its connections, and
    desktop apps and agent frameworks (Strands' sync ``agent(...)``, ``Runner.run_sync``) run a
    fresh loop per call. One pool per running loop lets one ``AsyncOpenAI`` client serve them all."""

    def __init__(self, **kwargs: Any):
        self._kwargs = kwargs
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncHTTPTransport] = (
            weakref.WeakKeyDictionary()
        )

    def _pool(self) -> httpx.AsyncHTTPTransport:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = self._pools[loop] = httpx.AsyncHTTPTransport(**self._kwargs)
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._pool().handle_async_request(request)

    async def aclose(self) -> None:
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.aclose()


class OpenAI(openai.OpenAI):
    """``openai.OpenAI`` whose 402 is ``InsufficientFunds`` and whose run-limit 429 is
    ``RunLimitReached`` (subclasses of the SDK's own errors); nothing else differs."""

    def _make_status_error(self, err_msg: str, *, body: object, response: Any) -> openai.APIStatusError:
        data = body.get("error", body) if isinstance(body, dict) else body
        mapped = status_error_for(err_msg, response=response, body=data)
        return mapped or super()._make_status_error(err_msg, body=body, response=response)


class AsyncOpenAI(openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` with the same error mapping as ``OpenAI``."""

    def _make_status_error(self, err_msg: str, *, body: object, response: Any) -> openai.APIStatusError:
        data = body.get("error", body) if isinstance(body, dict) else body
        mapped = status_error_for(err_msg, response=response, body=data)
        return mapped or super()._make_status_error(err_msg, body=body, response=response)
