"""Relaying an upstream's answer to the client: byte-for-byte where possible, metered as it goes.

* A stream is relayed as it arrives; only whole SSE events are held back, and only until their
  terminating blank line, because the usage chunk may have to be removed (a client that did not
  ask for usage must not get it: SDKs that index ``choices[0]`` break on it) or restated.
* OpenRouter's ``usage.cost`` is our cost price; a client reading ``cost`` should see what it
  paid, so the usage that carries it is restated as the request's charge — which is known only
  after settlement, so in a stream the usage chunk waits for the tail, and a whole answer is sent
  once settled.
* The stream's tail is the settled charge as an SSE comment (clients skip it), then the
  protocol's end: ``[DONE]`` for chat completions; for the typed-event protocols (Responses API,
  Anthropic Messages) the comment goes just before their final event.
* ``relay_whole`` and ``relay_stream`` do the forwarding for every protocol; what a stream's bytes
  become is a *stream relay*: ``ChatStreamRelay`` (chat as chat), ``TranslatedStreamRelay``
  (chat translated into another protocol's events) or a ``NativeStreamRelay`` (a protocol's own
  events, relayed as they come).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable

import httpx

from core.money import format_usd, loads_decimal
from core.openai_errors import error_event
from core.protocols.chat import StreamTranslator
from core.protocols.sse import encode, encode_all
from core.protocols.usage import TokenUsage
from core.sse import Event, SSEParser
from core.usage import StreamMeter, Usage, reported_cost

from ..models import UsageStatus
from ..services import Begun, Outcome
from .request import Finish, ProxyRequest, ms_since

_COST_MARK = "__tokentill_charge__"
_DECODER = json.JSONDecoder()
LARGE_BODY = 256 * 1024  # bytes: a whole answer this large is parsed in a worker thread
DRAIN_SECONDS = 0.1  # how long the rest of a finished stream's body may take to arrive


def dumps_charged(plain: dict, charge: int, usage: dict | None = None) -> bytes:
    """``plain`` (a chunk, completion or event whose ``usage`` OpenRouter priced) as JSON, its
    ``usage.cost`` now what the caller was charged (``cost_details`` broke down our cost: dropped).
    ``usage``: that object inside ``plain`` when it is not ``plain["usage"]``."""
    usage = plain["usage"] if usage is None else usage
    usage["cost"] = _COST_MARK
    usage.pop("cost_details", None)
    return json.dumps(plain, separators=(",", ":")).replace(f'"{_COST_MARK}"', format_usd(charge)).encode()


def priced(obj: object) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("usage"), dict) and "cost" in obj["usage"]


def charge_as_cost(raw: bytes, parsed: object, charge: int) -> bytes:
    """A whole response with ``usage.cost`` restated as the charge."""
    if not priced(parsed):
        return raw
    spliced = _splice_usage(raw, parsed["usage"], charge)
    return spliced if spliced is not None else dumps_charged(json.loads(raw), charge)


def _splice_usage(raw: bytes, usage: dict, charge: int) -> bytes | None:
    """``raw`` with only its usage object rewritten — an embeddings answer can be megabytes of
    floats that re-serialising would hold the event loop for (and reformat). OpenAI-shaped
    answers put ``usage`` last or nearly; the last ``"usage"`` whose object is the one parsed is
    it. None when it cannot be found so (the caller re-serialises the whole)."""
    at = raw.rfind(b'"usage"')
    colon = raw.find(b":", at + len(b'"usage"')) if at >= 0 else -1
    if colon < 0:
        return None
    tail = raw[colon + 1 :].decode("utf-8", errors="replace")
    try:
        value, end = _DECODER.raw_decode(tail, len(tail) - len(tail.lstrip()))
    except ValueError:
        return None
    if not isinstance(value, dict) or loads_decimal(tail[:end]) != usage:
        return None
    return raw[: colon + 1] + dumps_charged({"usage": value}, charge)[len(b'{"usage":') : -1] + tail[end:].encode()


def tokentill_comment(request_id: str, charge: int, balance: int, served: dict | None = None) -> bytes:
    """The settled charge as an SSE comment: every SDK skips comment lines. ``served``: the model
    that served it, and whether that was the fallback (``served_info``)."""
    info = {"request_id": request_id, "charge": format_usd(charge), "balance": format_usd(balance), **(served or {})}
    return b": tokentill " + json.dumps(info).encode() + b"\n\n"


def trailer(request_id: str, charge: int, balance: int, served: dict | None = None) -> bytes:
    """The end of a chat stream: the charge, then ``[DONE]``."""
    return tokentill_comment(request_id, charge, balance, served) + b"data: [DONE]\n\n"


def served_info(begun: Begun) -> dict:
    """What the ``: tokentill`` line says of the model that served the request."""
    return {"model_served": begun.served_model, "fallback": begun.fell_back}


class SSERelay(ABC):
    """What every stream relay shares: ``feed(chunk)`` returns the bytes to send now, event by
    event (``_event``); ``done`` turns true at the stream's end — ``data: [DONE]``, which is never
    relayed (the tail ends the stream once the request is settled), or an end event the subclass
    recognises; ``flush()`` is what is left in the parser when the upstream closed early."""

    def __init__(self, meter: StreamMeter):
        self.meter = meter
        self.parser = SSEParser()
        self.done = False
        self.data_relayed = False  # any data event (not just keep-alive comments) received?
        self.served: dict | None = None  # for the tail's ``: tokentill`` line (``served_info``)

    def feed(self, chunk: bytes) -> bytes:
        out = []
        for event in self.parser.feed(chunk):
            if event.is_done:
                self.done = True
            else:
                out.append(self._event(event))
            if self.done:
                break
        return b"".join(out)

    def flush(self) -> bytes:
        return b"".join(self._event(event) for event in self.parser.flush())

    @abstractmethod
    def tail(self, *, request_id: str, charge: int, balance: int, failure: str | None) -> bytes:
        """The end of the stream once settled: with the charge, and ``failure`` (a stream cut
        off) said in the protocol's words."""

    @abstractmethod
    def _event(self, event: Event) -> bytes: ...


class ChatStreamRelay(SSERelay):
    """Turns a chat-completions SSE byte stream into what the client gets, metering it on the way."""

    def __init__(self, *, client_usage: bool):
        super().__init__(StreamMeter())
        self.client_usage = client_usage  # did the client ask for the usage chunk?
        self.priced_usage: dict | None = None  # the usage chunk held back to restate its cost

    def tail(self, *, request_id: str, charge: int, balance: int, failure: str | None) -> bytes:
        """The end of the stream once settled: the restated usage chunk, an error event the client
        must see (a stream cut off), the charge, ``[DONE]``."""
        parts = []
        if self.priced_usage is not None:
            parts.append(b"data: " + dumps_charged(self.priced_usage, charge) + b"\n\n")
        if failure is not None:
            parts.append(error_event(failure, "upstream_error", "upstream_error"))
        return b"".join(parts) + trailer(request_id, charge, balance, self.served)

    def _event(self, event: Event) -> bytes:
        if event.is_comment:
            return event.encode()
        self.data_relayed = True
        if self.meter.observe_text(event.data):  # a content chunk: counted from its text, relayed as is
            return event.encode()
        try:
            chunk = loads_decimal(event.data)
        except ValueError:
            return event.encode()
        self.meter.observe(chunk)
        if not isinstance(chunk, dict) or chunk.get("usage") is None:
            return event.encode()
        usage_only = not chunk.get("choices") and not chunk.get("error")
        if self.client_usage:
            if not priced(chunk):
                return event.encode()
            if usage_only:  # the stream's last data event: sent, restated, once the charge is known
                self.priced_usage = json.loads(event.data)
                return b""
            plain = json.loads(event.data)  # cost on a content chunk (not OpenRouter's way): not ours to show
            plain["usage"].pop("cost", None)
            plain["usage"].pop("cost_details", None)
        else:
            # The client did not ask for usage: drop the usage-only chunk, or just the usage key
            # when it rode on a content chunk.
            if usage_only:
                return b""
            plain = json.loads(event.data)
            plain.pop("usage", None)
        return b"data: " + json.dumps(plain, separators=(",", ":")).encode() + b"\n\n"


# --- the typed-event protocols ----------------------------------------------------------------


def usage_of(tokens: TokenUsage | None, raw: object) -> Usage | None:
    """A protocol's usage read by ``core.protocols.usage`` as what billing reads, with the cost
    OpenRouter states in every protocol's ``usage``."""
    if tokens is None or not isinstance(raw, dict):
        return None
    return Usage(**dataclasses.asdict(tokens), cost=reported_cost(raw, "cost"))


def ending(events: list[dict], comment: bytes) -> bytes:
    """A typed-event stream's last events with the charge comment before the final one (a
    client that stops reading at the protocol's end event has read the comment by then)."""
    if not events:
        return comment
    return encode_all(events[:-1]) + comment + encode(events[-1])


class TranslatedStreamRelay(SSERelay):
    """A chat-completions stream relayed as another protocol's events, through one of
    ``core.protocols``' translators, and metered as the chat stream it is.

    The translator's closing events come in the tail: they carry the usage, which a chat stream
    sends last, and the charge comment goes before the final one. A data line that is not JSON
    cannot be translated and is skipped."""

    def __init__(self, translator: StreamTranslator):
        super().__init__(StreamMeter())
        self.translator = translator

    def tail(self, *, request_id: str, charge: int, balance: int, failure: str | None) -> bytes:
        events = self.translator.fail(failure) if failure is not None else self.translator.finish()
        return ending(events, tokentill_comment(request_id, charge, balance, self.served))

    def _event(self, event: Event) -> bytes:
        if event.is_comment:  # keep-alive: comments are comments in every protocol
            return event.encode()
        self.data_relayed = True
        try:
            chunk = loads_decimal(event.data)
        except ValueError:
            return b""
        self.meter.observe(chunk)
        return encode_all(self.translator.feed(chunk))


class NativeStreamRelay(SSERelay):
    """A typed-event stream (Responses API, Anthropic Messages) relayed event for event,
    byte-for-byte, metered by ``meter`` (a ``StreamMeter`` that reads the protocol's events).

    Subclasses say which event ends the stream, which events wait for the tail (those whose
    usage may state OpenRouter's cost, restated there as the charge) and where an event keeps its
    usage. A priced usage on an event that cannot wait has the cost taken out: it is our cost
    price, not the client's to see."""

    def __init__(self, meter: StreamMeter):
        super().__init__(meter)
        self.held: list[Event] = []

    # -- the protocol -----------------------------------------------------------------------------

    @abstractmethod
    def ends(self, event: dict) -> bool: ...

    @abstractmethod
    def holds(self, event: dict) -> bool: ...

    @abstractmethod
    def usage_in(self, event: dict) -> dict | None: ...

    @abstractmethod
    def failure_event(self, message: str) -> dict:
        """The event that tells the client the stream was cut off."""
        ...

    # -- relaying ---------------------------------------------------------------------------------

    def tail(self, *, request_id: str, charge: int, balance: int, failure: str | None) -> bytes:
        parts = [self._restated(event, charge) for event in self.held]
        if failure is not None:
            parts.append(encode(self.failure_event(failure)))
        comment = tokentill_comment(request_id, charge, balance, self.served)
        return b"".join(parts[:-1]) + comment + parts[-1] if parts else comment

    def _event(self, event: Event) -> bytes:
        if event.is_comment:
            return event.encode()
        self.data_relayed = True
        try:
            parsed = loads_decimal(event.data)
        except ValueError:
            return event.encode()
        if not isinstance(parsed, dict):
            return event.encode()
        self.meter.observe(parsed)
        self.done = self.ends(parsed)
        if self.held or self.holds(parsed):
            self.held.append(event)
            return b""
        if not priced({"usage": self.usage_in(parsed)}):
            return event.encode()
        plain = json.loads(event.data)
        usage = self.usage_in(plain)
        usage.pop("cost", None)
        usage.pop("cost_details", None)
        return _framed(plain, json.dumps(plain, separators=(",", ":")).encode())

    def _restated(self, event: Event, charge: int) -> bytes:
        plain = json.loads(event.data)
        usage = self.usage_in(plain) if isinstance(plain, dict) else None
        if not priced({"usage": usage}):
            return event.encode()
        return _framed(plain, dumps_charged(plain, charge, usage))


def _framed(event: dict, data: bytes) -> bytes:
    return f"event: {event.get('type')}\n".encode() + b"data: " + data + b"\n\n"


# --- forwarding -------------------------------------------------------------------------------


# What a whole answer becomes for the client: (status, body) from the upstream's raw body, its
# parsed JSON and the settled charge.
Answer = Callable[[bytes, object, int], tuple[int, bytes]]


def passthrough(raw: bytes, parsed: object, charge: int) -> tuple[int, bytes]:
    return 200, charge_as_cost(raw, parsed, charge)


def begun_headers(begun: Begun) -> list[tuple[str, str]]:
    """What the client is told as the answer starts: the model that serves it (and whether that
    is the fallback), and an output cap lowered to what its balance affords."""
    headers = [("x-tokentill-model-served", begun.served_model)]
    if begun.fell_back:
        headers.append(("x-tokentill-fallback", "used"))
    if begun.clamped_to is not None:
        headers.append(("x-tokentill-max-tokens", str(begun.clamped_to)))
    return headers


async def drain(chunks) -> None:
    """Read what follows the end of a stream (normally just the end of the body) so the upstream
    connection goes back to the pool; leaving the body unread makes httpx close it, and the
    next request pays a new connection (a TLS handshake, against a real upstream). Bounded: an
    upstream that keeps the stream open after its end just loses its connection, as before.
    """
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in chunks:
                pass
    except (TimeoutError, httpx.HTTPError):  # the answer is complete: only the connection is lost
        pass


async def relay_whole(
    request: ProxyRequest,
    begun: Begun,
    body: dict,
    outcome: Outcome,
    path: str,
    *,
    meter: StreamMeter | None = None,
    answer: Answer = passthrough,
) -> Finish:
    """Forward a non-streamed request; return what to send once it is settled. ``meter`` reads
    the answer (a chat completion by default), ``answer`` renders it for the client."""
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
    meter = meter or StreamMeter()
    meter.observe(parsed)
    request.copy_meter(meter, outcome)
    outcome.http_status = 200
    if meter.error:
        outcome.status = UsageStatus.UPSTREAM_ERROR

    async def finish(record, begun):
        status, content = answer(raw, parsed, record.charge)
        headers = [
            ("content-type", "application/json"),
            ("x-tokentill-charge", format_usd(record.charge)),
            ("x-tokentill-balance", format_usd(begun.wallet.balance)),
            *begun_headers(begun),
        ]
        await request.exchange.send_whole(status, content, headers)

    return finish


async def relay_stream(
    request: ProxyRequest, begun: Begun, body: dict, outcome: Outcome, stream: SSERelay, path: str
) -> Finish:
    """Forward a streamed request, relaying the upstream's events through ``stream`` as they
    arrive; return what to send (the tail) once it is settled."""
    exchange = request.exchange
    request.meter = meter = stream.meter

    async def send(data: bytes) -> None:
        if data:
            if not exchange.response_started:
                await exchange.start_stream(begun_headers(begun))
            await exchange.send_body(data, more=True)

    try:
        async with await request.open_upstream(begun, body, path) as response:
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
        # Cut off mid-answer (a stream always ends with its end event, or at least a finish reason).
        outcome.status = UsageStatus.UPSTREAM_ERROR
        outcome.error = outcome.error or "the upstream ended the stream before it was complete"
        failure = "The upstream model's stream was cut off; the answer is incomplete."
    outcome.http_status = 200
    if meter.error:
        outcome.status = UsageStatus.UPSTREAM_ERROR
    if not exchange.response_started:
        await exchange.start_stream(begun_headers(begun))

    async def finish(record, begun):
        stream.served = served_info(begun)
        tail = stream.tail(
            request_id=request.request_id, charge=record.charge, balance=begun.wallet.balance, failure=failure
        )
        await exchange.send_body(tail)

    return finish
