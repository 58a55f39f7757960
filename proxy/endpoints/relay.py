"""Relaying an upstream's answer to the client: byte-for-byte where possible, metered as it goes.

* A stream is relayed as it arrives; only whole SSE events are held back, and only until their
  terminating blank line, because the usage chunk may have to be removed (a client that did not
  ask for usage must not get it: SDKs that index ``choices[0]`` break on it) or restated.
* OpenRouter's ``usage.cost`` is our cost price; a client reading ``cost`` should see what it
  paid, so the usage that carries it is restated as the request's charge — which is known only
  after settlement, so in a stream the usage chunk waits for the tail, and a whole answer is sent
  once settled.
* The stream's tail is the settled charge as an SSE comment (clients skip it), then ``[DONE]``.
"""

from __future__ import annotations

import json

from core.money import format_usd, loads_decimal
from core.openai_errors import error_event
from core.sse import Event, SSEParser
from core.usage import StreamMeter

_COST_MARK = "__tokentill_charge__"
_DECODER = json.JSONDecoder()


def dumps_charged(plain: dict, charge: int) -> bytes:
    """``plain`` (a chunk or completion whose ``usage`` OpenRouter priced) as JSON, its
    ``usage.cost`` now what the caller was charged (``cost_details`` broke down our cost: dropped)."""
    usage = plain["usage"]
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


def trailer(request_id: str, charge: int, balance: int) -> bytes:
    """The settled charge as an SSE comment (clients ignore it), then the end of the stream."""
    info = {"request_id": request_id, "charge": format_usd(charge), "balance": format_usd(balance)}
    return b": tokentill " + json.dumps(info).encode() + b"\n\ndata: [DONE]\n\n"


class ChatStreamRelay:
    """Turns a chat-completions SSE byte stream into what the client gets, metering it on the way.

    ``feed(chunk)`` returns the bytes to send now; ``done`` turns true at ``data: [DONE]`` (which
    is never relayed: the tail ends the stream once the request is settled).
    """

    def __init__(self, *, client_usage: bool):
        self.client_usage = client_usage  # did the client ask for the usage chunk?
        self.meter = StreamMeter()
        self.parser = SSEParser()
        self.done = False
        self.data_relayed = False  # any data event (not just keep-alive comments) sent on?
        self.priced_usage: dict | None = None  # the usage chunk held back to restate its cost

    def feed(self, chunk: bytes) -> bytes:
        out = []
        for event in self.parser.feed(chunk):
            if event.is_done:
                self.done = True
                break
            out.append(self._event(event))
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left in the parser when the upstream closed without ``[DONE]``."""
        return b"".join(self._event(event) for event in self.parser.flush())

    def tail(self, *, request_id: str, charge: int, balance: int, failure: str | None) -> bytes:
        """The end of the stream once settled: the restated usage chunk, an error event the client
        must see (a stream cut off), the charge, ``[DONE]``."""
        parts = []
        if self.priced_usage is not None:
            parts.append(b"data: " + dumps_charged(self.priced_usage, charge) + b"\n\n")
        if failure is not None:
            parts.append(error_event(failure, "upstream_error", "upstream_error"))
        return b"".join(parts) + trailer(request_id, charge, balance)

    def _event(self, event: Event) -> bytes:
        if event.is_comment:
            return event.encode()
        self.data_relayed = True
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
