"""Framing typed events as Server-Sent Events.

Both the Responses API and the Anthropic Messages API name every event twice: an ``event:``
line and the ``type`` inside its JSON. The Anthropic SDK dispatches on the ``event:`` line alone
(an event without one is skipped), the OpenAI SDK on ``type``, so both are always written.
"""

from __future__ import annotations

import json
from decimal import Decimal


def _plain(value: object) -> object:
    # Upstream chunks are parsed with Decimal numbers; none of them is money by the time it is
    # framed here (sampling parameters, logprobs), so a float is what the client expects.
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(obj: object) -> str:
    """Compact JSON of a translated object (``Decimal`` numbers as JSON numbers)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=_plain)


def encode(event: dict) -> bytes:
    """``event: <type>\\ndata: <json>\\n\\n`` — one event, compact JSON on one line."""
    return f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()


def encode_all(events: list[dict]) -> bytes:
    return b"".join(encode(event) for event in events)
