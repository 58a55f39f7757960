"""Raw ASGI plumbing for the metered endpoints: read the body, hear the client leave, send bytes.

Nothing here knows about money or protocols. An ``Exchange`` wraps one HTTP request's ``scope``,
``receive`` and ``send``; the request's lifecycle (``proxy.endpoints.request``) drives it.

Why a disconnect listener runs *beside* the request (Django's ``asgi.py`` does the same): the
request is served in the ASGI server's own task, and a relay loop there would never hear
``http.disconnect`` (channels issues #1249, #1350) — the client could leave and we would keep
paying the upstream. Once the body is read, only ``http.disconnect`` can arrive, so the listener
just waits for it, notes the departure and — only while the request allows it (relaying) —
cancels the request's task, which closes the upstream response and so cancels the generation.
"""

from __future__ import annotations

import asyncio
import json


class BodyTooLarge(Exception):
    """The declared or received body exceeds the limit (answered 413 without reading the rest)."""


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


class Exchange:
    def __init__(self, scope: dict, receive, send, request_id: str):
        self.scope, self.receive, self.send_message = scope, receive, send
        self.request_id = request_id
        self.method: str = scope.get("method", "")
        self.headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])
        }
        self.response_started = False
        self.disconnected = False
        self.cancellable = False  # may a disconnect cancel the request's task right now?
        self._listener: asyncio.Future | None = None

    # --- reading -----------------------------------------------------------------------------

    async def read_body(self, limit: int) -> bytes:
        """The whole request body. Raises ``BodyTooLarge`` (before a byte is read when the
        declared length says so — a client waiting on ``Expect: 100-continue`` is then told not
        to send it) or ``ClientGone``."""
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge
        parts, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            part = message.get("body", b"")
            size += len(part)
            if size > limit:  # answered without reading (or buffering) the rest
                raise BodyTooLarge
            parts.append(part)
            if not message.get("more_body"):
                return b"".join(parts)

    def listen_for_disconnect(self) -> None:
        """From now on (the body has been read), note the client leaving and cancel the current
        task if it leaves while ``cancellable``."""
        task = asyncio.current_task()

        async def listen() -> None:
            if (await self.receive())["type"] == "http.disconnect":
                self.disconnected = True
                if self.cancellable:
                    task.cancel()

        self._listener = asyncio.ensure_future(listen())

    def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.cancel()

    # --- writing -----------------------------------------------------------------------------

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.response_started = True
        await self.send_message(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"x-request-id", self.request_id.encode())]
                + [(name.encode(), value.encode()) for name, value in headers],
            }
        )

    async def send_body(self, body: bytes, *, more: bool = False) -> None:
        await self.send_message({"type": "http.response.body", "body": body, "more_body": more})

    async def send_whole(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        """A response with a known length (sent with Content-Length, not chunked)."""
        await self.start(status, [*headers, ("content-length", str(len(body)))])
        await self.send_body(body)

    async def send_json(self, status: int, payload: dict, headers: list[tuple[str, str]] | None = None) -> None:
        body = json.dumps(payload).encode()
        await self.send_whole(status, body, [("content-type", "application/json"), *(headers or [])])

    async def start_stream(self, headers: list[tuple[str, str]]) -> None:
        base = [("content-type", "text/event-stream"), ("cache-control", "no-cache"), ("x-accel-buffering", "no")]
        await self.start(200, [*base, *headers])
