"""The OpenAI-shaped metered endpoints: ``/v1/chat/completions`` (streamed or not) and
``/v1/embeddings``."""

from __future__ import annotations

from django.conf import settings

from accounts.auth import AuthFailed

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
            payload,
            user_id=begun.meta.user.pk,
            stream=parsed.stream,
            max_output=begun.max_output,
            target=request.upstream,  # this attempt's upstream: its kind decides the usage switch
        )
        if not parsed.stream:
            return await relay.relay_whole(request, begun, body, outcome, "chat/completions")
        stream = relay.ChatStreamRelay(client_usage=self.client_wants_usage(payload))
        return await relay.relay_stream(request, begun, body, outcome, stream, "chat/completions")

    async def insufficient_funds(self, request: ProxyRequest, funds: Funds, parsed: Parsed) -> None:
        if settings.REFUSAL_MODE != "assistant_message":
            return await super().insufficient_funds(request, funds, parsed)
        text = refusals.assistant_message_text(funds)
        tail = relay.trailer(request.request_id, 0, funds.balance)
        await self.send_assistant_message(request, parsed, text, "insufficient_funds", tail)

    async def unauthenticated(self, request: ProxyRequest, failure: AuthFailed, parsed: Parsed | None) -> None:
        """A credential that expired or was revoked, in assistant-message mode: a reply the app can
        show, asking the user to sign in again. Anything else (no credential, not one of ours, a
        body we could not read) stays a 401: there is no one to answer in words."""
        if settings.REFUSAL_MODE != "assistant_message" or not failure.signed_out or parsed is None:
            return await super().unauthenticated(request, failure, parsed)
        # No ": tokentill" line: nobody is signed in, so there is no balance to tell.
        text = refusals.signed_out_text(failure)
        await self.send_assistant_message(request, parsed, text, "unauthenticated", b"data: [DONE]\n\n")

    async def send_assistant_message(
        self, request: ProxyRequest, parsed: Parsed, text: str, blocked_reason: str, tail: bytes
    ) -> None:
        """A refusal as an ordinary completion (streamed if the request asked), marked by
        ``X-Tokentill-Blocked``, for apps that render replies and nothing else. Nothing is charged."""
        blocked = [("x-tokentill-blocked", blocked_reason)]
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
        await exchange.start(200, [("content-type", "text/event-stream"), ("cache-control", "no-cache"), *blocked])
        await exchange.send_body(body + tail)


class Embeddings(Endpoint):
    name = "embeddings"

    def parse(self, body: bytes) -> Parsed:
        return validation.embeddings(body)

    async def relay(self, request: ProxyRequest, begun: Begun, parsed: Parsed, outcome: Outcome) -> Finish:
        body = upstream.embeddings_body(parsed.payload, user_id=begun.meta.user.pk)
        return await relay.relay_whole(request, begun, body, outcome, "embeddings")
