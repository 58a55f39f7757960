"""The OpenAI-shaped metered endpoints: ``/v1/chat/completions`` (streamed or not) and
``/v1/embeddings``."""

from __future__ import annotations

from django.conf import settings

from .. import upstream
from ..services import Begun, Funds, Outcome
from . import refusals, relay, validation
from .request import Endpoint, Finish, ProxyRequest
from .validation import Parsed


class ChatCompletions(Endpoint):
    name = "chat.completions"

    def parse(self, body: bytes) -> Parsed:
        return validation.chat_completions(body)

    @staticmethod
    def client_wants_usage(payload: dict) -> bool:
        options = payload.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    async def relay(self, request: ProxyRequest, begun: Begun, parsed: Parsed, outcome: Outcome) -> Finish:
        payload = parsed.payload
        body = upstream.chat_body(
            payload, user_id=begun.meta.user.pk, stream=parsed.stream, max_output=begun.max_output
        )
        if not parsed.stream:
            return await relay.relay_whole(request, begun, body, outcome, "chat/completions")
        stream = relay.ChatStreamRelay(client_usage=self.client_wants_usage(payload))
        return await relay.relay_stream(request, begun, body, outcome, stream, "chat/completions")

    async def insufficient_funds(self, request: ProxyRequest, funds: Funds, parsed: Parsed) -> None:
        if settings.REFUSAL_MODE != "assistant_message":
            return await super().insufficient_funds(request, funds, parsed)
        text = refusals.assistant_message_text(funds)
        blocked = [("x-tokentill-blocked", "insufficient_funds")]
        exchange, model = request.exchange, parsed.model
        if not parsed.stream:
            completion = refusals.assistant_completion(request_id=request.request_id, model=model, text=text)
            return await exchange.send_json(200, completion, blocked)
        body = refusals.assistant_stream(
            request_id=request.request_id,
            model=model,
            text=text,
            with_usage=self.client_wants_usage(parsed.payload),
        )
        body += relay.trailer(request.request_id, 0, funds.balance)
        await exchange.start(200, [("content-type", "text/event-stream"), ("cache-control", "no-cache"), *blocked])
        await exchange.send_body(body)


class Embeddings(Endpoint):
    name = "embeddings"

    def parse(self, body: bytes) -> Parsed:
        return validation.embeddings(body)

    async def relay(self, request: ProxyRequest, begun: Begun, parsed: Parsed, outcome: Outcome) -> Finish:
        body = upstream.embeddings_body(parsed.payload, user_id=begun.meta.user.pk)
        return await relay.relay_whole(request, begun, body, outcome, "embeddings")
