"""``POST /v1/messages`` (Anthropic Messages API) and ``POST /v1/messages/count_tokens``.

* The credential may come as ``x-api-key`` (anthropic SDKs before 2.x) or ``Authorization:
  Bearer`` (the pinned 2.17 sends its API key so); any ``anthropic-version`` is accepted.
* Every error is in Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}`` —
  the 402 a ``billing_error`` with the top-up URL, balance and amount needed inside ``error``.
* Forwarded to an upstream that speaks the protocol (OpenRouter's ``/messages``; an Anthropic
  upstream), else translated to chat completions. Metered from the message's ``usage``, whose
  ``input_tokens`` *exclude* cache reads and writes (``core.protocols.usage.from_anthropic`` adds
  them back): an Anthropic answer read like a chat one would bill cached prompts as free.
* Counting tokens is free and so limited (``services.tokens_count_admit``); it is forwarded to
  an upstream that offers it, and answered 404 otherwise — the gateway does not guess counts.
"""

from __future__ import annotations

import json
import uuid

import httpx
from django.conf import settings

from accounts.auth import AuthFailed, aauthenticate_bearer, bearer_from_header
from core.openai_errors import OpenAIError
from core.protocols import anthropic as protocol
from core.protocols.sse import dumps
from core.protocols.usage import from_anthropic, merge_anthropic_usage
from core.usage import StreamMeter
from infra import adb

from .. import upstream
from ..selectors import routes_current
from ..services import Refusal, model_resolve, tokens_count_admit
from . import refusals, relay, validation
from .asgi import BodyTooLarge, ClientGone, Exchange
from .request import DATABASE_UNAVAILABLE, ProxyRequest
from .translated import TranslatableEndpoint
from .validation import Invalid

# Anthropic's stop reasons in the words of chat's finish_reason (what every usage record says).
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def credential(headers: dict[str, str]) -> str | None:
    return headers.get("x-api-key", "").strip() or bearer_from_header(headers.get("authorization"))


def error_response(error: OpenAIError, request_id: str) -> tuple[int, dict, list[tuple[str, str]]]:
    """An OpenAI-shaped refusal in Anthropic's shape: (status, body, headers)."""
    body = protocol.error_body(error.status, error.message, request_id=request_id, **error.extra)
    headers = [("retry-after", str(error.retry_after))] if error.retry_after is not None else []
    return error.status, body, headers


class MessagesMeter(StreamMeter):
    """What billing needs from a native Messages answer: a whole ``Message`` or the events of a
    stream (``message_start``'s id, model and first counts, each ``message_delta``'s cumulative
    counts and stop reason, the text relayed from the block deltas)."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_usage: dict | None = None

    def observe(self, obj: object) -> None:
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "message":
            self._message(obj)
            self._usage(obj.get("usage") if isinstance(obj.get("usage"), dict) else None)
            self._stop(obj.get("stop_reason"))
        elif kind == "message_start" and isinstance(obj.get("message"), dict):
            self._message(obj["message"])
            # Its output count is only the first token: billed only once a message_delta gives
            # the final one (a stream cut off before that is billed a marked estimate, as chat is).
            self.raw_usage = merge_anthropic_usage(self.raw_usage, obj)
        elif kind == "message_delta":
            self._usage(merge_anthropic_usage(self.raw_usage, obj))
            delta = obj.get("delta")
            self._stop(delta.get("stop_reason") if isinstance(delta, dict) else None)
        elif kind == "content_block_delta" and isinstance(obj.get("delta"), dict):
            delta = obj["delta"]
            for name in ("text", "partial_json", "thinking"):
                if isinstance(delta.get(name), str):
                    self.output_chars += len(delta[name])
        elif kind == "error":
            error = obj.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self.error = str(message or "upstream error")[:500]
            self.finish_reason = "error"

    def _message(self, message: dict) -> None:
        if not self.id and isinstance(message.get("id"), str):
            self.id = message["id"]
        if isinstance(message.get("model"), str) and message["model"]:
            self.model = message["model"]

    def _usage(self, raw: dict | None) -> None:
        self.raw_usage = raw
        self.usage = relay.usage_of(from_anthropic(raw), raw) or self.usage

    def _stop(self, reason: object) -> None:
        if isinstance(reason, str) and reason:
            self.finish_reason = _FINISH.get(reason, reason)[:40]


class MessagesRelay(relay.NativeStreamRelay):
    """A native Messages stream: ``message_delta`` (the final usage) and ``message_stop`` wait for
    the tail; a stream cut off ends with an ``error`` event, which the anthropic SDK raises."""

    def __init__(self) -> None:
        super().__init__(MessagesMeter())

    def ends(self, event: dict) -> bool:
        return event.get("type") in ("message_stop", "error")

    def holds(self, event: dict) -> bool:
        return event.get("type") in ("message_delta", "message_stop")

    def usage_in(self, event: dict) -> dict | None:
        """``message_delta.usage``, or ``message_start.message.usage``."""
        holder = event.get("message") if event.get("type") == "message_start" else event
        usage = holder.get("usage") if isinstance(holder, dict) else None
        return usage if isinstance(usage, dict) else None

    def failure_event(self, message: str) -> dict:
        return {"type": "error", "error": {"type": "api_error", "message": message}}


class Messages(TranslatableEndpoint):
    name = "messages"
    protocol = "messages"
    native_path = "messages"
    cap = "max_tokens"

    def credential(self, headers: dict[str, str]) -> str | None:
        return credential(headers)

    async def send_error(self, request: ProxyRequest, error: OpenAIError) -> None:
        await request.exchange.send_json(*error_response(error, request.request_id))

    def to_chat(self, payload: dict) -> dict:
        return protocol.request_to_chat(payload)

    def answer_from_chat(self, completion: dict, payload: dict) -> tuple[int, bytes]:
        error = completion.get("error") if isinstance(completion, dict) else None
        if error:
            # A Message cannot say it failed; the chat upstream's failure is an API error.
            message = error.get("message") if isinstance(error, dict) else str(error)
            return 502, dumps(protocol.error_body(502, str(message or "The upstream model failed."))).encode()
        return 200, dumps(protocol.message_from_chat(completion, request=payload)).encode()

    def translator(self, payload: dict) -> protocol.MessageStream:
        return protocol.MessageStream(request=payload)

    def native_body(self, payload: dict, *, user_id: int, max_output: int) -> dict:
        return upstream.messages_body(payload, user_id=user_id, max_output=max_output)

    def native_meter(self) -> MessagesMeter:
        return MessagesMeter()

    def native_stream(self) -> MessagesRelay:
        return MessagesRelay()


class CountTokensApplication:
    """``POST /v1/messages/count_tokens``: authenticate, admit (scope, model, rate limit),
    forward, relay the count. Not metered: nothing is held, charged or recorded."""

    async def __call__(self, scope, receive, send) -> None:
        exchange = Exchange(scope, receive, send, request_id=f"req_{uuid.uuid4().hex}")
        try:
            await self.serve(exchange)
        except ClientGone:
            return
        except DATABASE_UNAVAILABLE:
            error = OpenAIError(
                503, "The database is unavailable or busy; retry shortly.", "server_error", retry_after=1
            )
            await exchange.send_json(*error_response(error, exchange.request_id))
        except OpenAIError as error:
            await exchange.send_json(*error_response(error, exchange.request_id))

    async def serve(self, exchange: Exchange) -> None:
        if exchange.method != "POST":
            raise Refusal(405, f"{exchange.method} is not allowed here; send POST.", code="method_not_allowed")
        try:
            body = await exchange.read_body(settings.PROXY_MAX_BODY_BYTES)
        except BodyTooLarge:
            raise Refusal(413, "The request body is too large.", code="request_too_large") from None
        try:
            principal = await aauthenticate_bearer(credential(exchange.headers))
        except AuthFailed as exc:
            raise Refusal(401, exc.reason, code="invalid_api_key") from None
        try:
            payload = validation.json_object(body)
        except Invalid as invalid:
            raise invalid.refusal from None
        if not validation.model_id(payload.get("model")):
            raise Refusal(400, "`model` must be a model id.", param="model")
        await adb.in_thread(tokens_count_admit)(principal=principal, model=payload["model"])
        # An alias is counted by the model behind it.
        payload["model"] = await adb.in_thread(model_resolve)(payload["model"])
        # The first of the model's upstreams that counts (an Anthropic one), in the routing order.
        routes = await adb.in_thread(routes_current)(payload["model"])
        counting = [r.upstream for r in routes if not r.is_demo and upstream.speaks("count_tokens", r.upstream)]
        if not counting:
            raise Refusal(
                404,
                "No upstream serving this model can count tokens (the gateway cannot count tokens itself, "
                "and does not estimate them): count_tokens needs an upstream that offers it (docs/api.md).",
                code="not_supported",
            )
        target = counting[0]
        try:
            async with upstream.stream("messages/count_tokens", json.dumps(payload).encode(), target) as response:
                raw = await response.aread()
        except httpx.HTTPError as exc:
            timed_out = isinstance(exc, httpx.TimeoutException)
            message = "The upstream model timed out." if timed_out else "The upstream model is unreachable."
            raise refusals.upstream_failed(504 if timed_out else 502, message) from None
        if response.status_code >= 400:
            secrets = tuple(key for key in (target.api_key, settings.UPSTREAM_API_KEY) if key)
            raise refusals.upstream_rejected(
                response.status_code, raw, response.headers, request_id=exchange.request_id, secrets=secrets
            )[0]
        await exchange.send_whole(200, raw, [("content-type", "application/json")])
