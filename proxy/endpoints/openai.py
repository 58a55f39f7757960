"""The OpenAI-shaped metered endpoints: ``/v1/chat/completions`` (streamed or not) and
``/v1/embeddings``."""

from __future__ import annotations

import asyncio

import httpx
from django.conf import settings

from accounts.auth import AuthFailed
from core.money import format_usd, loads_decimal
from core.usage import StreamMeter

from .. import upstream
from ..models import UsageStatus
from ..services import Begun, Funds, Outcome
from . import refusals, relay, validation
from .request import Endpoint, Finish, ProxyRequest, ms_since
from .validation import Parsed

LARGE_BODY = 256 * 1024  # bytes: a whole answer this large is parsed in a worker thread
DRAIN_SECONDS = 0.1  # how long the rest of a finished stream's body may take to arrive


def clamp_headers(begun: Begun | None) -> list[tuple[str, str]]:
    """Tell a client whose output cap was lowered to what its balance affords."""
    clamped = begun.clamped_to if begun is not None else None
    return [("x-tokentill-max-tokens", str(clamped))] if clamped is not None else []


async def drain(chunks) -> None:
    """Read what follows ``[DONE]`` (normally just the end of the body) so the upstream
    connection goes back to the pool; leaving the body unread makes httpx close it, and the
    next request pays a new connection (a TLS handshake, against a real upstream). Bounded: an
    upstream that keeps the stream open after ``[DONE]`` just loses its connection, as before.
    """
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in chunks:
                pass
    except (TimeoutError, httpx.HTTPError):  # the answer is complete: only the connection is lost
        pass


async def relay_whole(request: ProxyRequest, begun: Begun, body: dict, outcome: Outcome, path: str) -> Finish:
    """Forward a non-streamed request; return what to send once it is settled."""
    try:
        async with await request.open_upstream(begun, body, path) as response:
            # Known before the body: a client that leaves while it is generated still leaves the
            # id for reconcile_holds to ask OpenRouter what it cost.
            outcome.generation_id = response.headers.get("x-generation-id", "")
            raw = await response.aread()
            outcome.ttfb_ms = ms_since(request.started)
    except httpx.HTTPError as exc:
        return request.timed_out_or_unreachable(outcome, exc)
    if response.status_code >= 400:
        return request.rejected(outcome, response.status_code, raw, response.headers)
    try:
        # A large body (embeddings of many inputs) is parsed off the event loop.
        parsed = await asyncio.to_thread(loads_decimal, raw) if len(raw) > LARGE_BODY else loads_decimal(raw)
    except ValueError:
        return request.failed(outcome, 502, "The upstream model sent a malformed response.")
    meter = StreamMeter()
    meter.observe(parsed)
    request.copy_meter(meter, outcome)
    outcome.http_status = 200
    if meter.error:
        outcome.status = UsageStatus.UPSTREAM_ERROR

    async def finish(record, begun):
        headers = [
            ("content-type", "application/json"),
            ("x-tokentill-charge", format_usd(record.charge)),
            ("x-tokentill-balance", format_usd(begun.wallet.balance)),
            *clamp_headers(begun),
        ]
        await request.exchange.send_whole(200, relay.charge_as_cost(raw, parsed, record.charge), headers)

    return finish


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
            return await relay_whole(request, begun, body, outcome, "chat/completions")
        return await self.relay_stream(request, begun, body, outcome, self.client_wants_usage(payload))

    async def relay_stream(
        self, request: ProxyRequest, begun: Begun, body: dict, outcome: Outcome, client_usage: bool
    ) -> Finish:
        exchange = request.exchange
        stream = relay.ChatStreamRelay(client_usage=client_usage)
        request.meter = meter = stream.meter

        async def send(data: bytes) -> None:
            if data:
                if not exchange.response_started:
                    await exchange.start_stream(clamp_headers(begun))
                await exchange.send_body(data, more=True)

        try:
            async with await request.open_upstream(begun, body, "chat/completions") as response:
                if response.status_code >= 400:
                    raw = await response.aread()
                    return request.rejected(outcome, response.status_code, raw, response.headers)
                outcome.generation_id = response.headers.get("x-generation-id", "")
                chunks = response.aiter_raw()
                async for chunk in chunks:
                    if outcome.ttfb_ms is None:
                        outcome.ttfb_ms = ms_since(request.started)
                    await send(stream.feed(chunk))
                    if stream.done:
                        break
                if stream.done:
                    exchange.cancellable = False  # the answer is complete: a client leaving now changes nothing
                    await drain(chunks)
                else:
                    await send(stream.flush())
        except httpx.HTTPError as exc:
            if not exchange.response_started:
                request.copy_meter(meter, outcome)
                return request.timed_out_or_unreachable(outcome, exc)
            outcome.status = UsageStatus.UPSTREAM_ERROR
            outcome.error = (
                "upstream timed out mid-stream"
                if isinstance(exc, httpx.TimeoutException)
                else f"upstream stream broke ({type(exc).__name__})"
            )
        finally:
            # Runs on cancellation too, so a disconnect is billed for what was already relayed.
            error = outcome.error
            request.copy_meter(meter, outcome)
            outcome.error = outcome.error or error
        failure = None  # an error event the client must see before the stream ends
        if not stream.done and not stream.data_relayed:
            # Nothing but keep-alive comments: a failure before any output, which costs nothing.
            no_output = "The upstream model closed the stream without any output."
            if not exchange.response_started:
                return request.failed(outcome, 502, no_output)
            outcome.billable = False
            outcome.status, outcome.error, failure = UsageStatus.UPSTREAM_ERROR, outcome.error or no_output, no_output
        elif not stream.done and not meter.finish_reason and not meter.error:
            # Cut off mid-answer (a stream always ends with [DONE], or at least a finish reason).
            outcome.status = UsageStatus.UPSTREAM_ERROR
            outcome.error = outcome.error or "the upstream ended the stream before [DONE]"
            failure = "The upstream model's stream was cut off; the answer is incomplete."
        outcome.http_status = 200
        if meter.error:
            outcome.status = UsageStatus.UPSTREAM_ERROR
        if not exchange.response_started:
            await exchange.start_stream(clamp_headers(begun))

        async def finish(record, begun):
            tail = stream.tail(
                request_id=request.request_id, charge=record.charge, balance=begun.wallet.balance, failure=failure
            )
            await exchange.send_body(tail)

        return finish

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
        return await relay_whole(request, begun, body, outcome, "embeddings")
