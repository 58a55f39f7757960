"""``POST /v1/responses``: the OpenAI Responses API, forwarded to an upstream that serves it
(``UPSTREAM_RESPONSES=native``: OpenRouter's ``/responses``) or translated to chat completions.

Stateless either way: ``store: true``, ``previous_response_id``, ``conversation`` and
``background`` are refused, and the upstream is always sent ``store: false`` — a stored response
would be a copy of a user's conversation the gateway could neither meter nor delete with the
account. Metered from ``response.usage`` (``input_tokens`` includes cached tokens, as chat's
``prompt_tokens`` does), on the whole Response or on the stream's terminal event.
"""

from __future__ import annotations

from core.protocols import responses as protocol
from core.protocols.sse import dumps
from core.protocols.usage import TERMINAL_RESPONSE_EVENTS, from_responses
from core.usage import StreamMeter

from .. import upstream
from . import relay
from .translated import TranslatableEndpoint

# A Response's terminal status, and why it is incomplete, in the words of chat's finish_reason
# (what every usage record says, whatever the protocol).
_FINISH = {"completed": "stop", "failed": "error", "cancelled": "cancelled"}
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


class ResponsesMeter(StreamMeter):
    """What billing needs from a native Responses answer: a whole ``Response`` or the events of
    a stream (its id and model from ``response.created``, the text relayed from the deltas, the
    usage and status from the terminal event)."""

    def __init__(self) -> None:
        super().__init__()
        self.sequence = -1  # the last event's sequence_number

    def observe(self, obj: object) -> None:
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if isinstance(obj.get("sequence_number"), int):
            self.sequence = obj["sequence_number"]
        if obj.get("object") == "response":
            self._response(obj)
        elif kind in ("response.created", "response.in_progress", "response.queued", *TERMINAL_RESPONSE_EVENTS):
            if isinstance(obj.get("response"), dict):
                self._response(obj["response"])
        elif kind == "error":
            self.error = str(obj.get("message") or "upstream error")[:500]
        elif isinstance(kind, str) and kind.endswith(".delta") and isinstance(obj.get("delta"), str):
            self.output_chars += len(obj["delta"])

    def _response(self, response: dict) -> None:
        if not self.id and isinstance(response.get("id"), str):
            self.id = response["id"]
        if isinstance(response.get("model"), str) and response["model"]:
            self.model = response["model"]
        usage = relay.usage_of(from_responses(response.get("usage")), response.get("usage"))
        self.usage = usage or self.usage
        status = response.get("status")
        if status == "incomplete":
            details = response.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            self.finish_reason = _INCOMPLETE.get(reason, "length")
        elif status in _FINISH:
            self.finish_reason = _FINISH[status]
        if status == "failed":
            error = response.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self.error = str(message or "the upstream failed the response")[:500]


class ResponsesRelay(relay.NativeStreamRelay):
    """A native Responses stream: the terminal event (``response.completed`` …) carries the usage
    and so waits for the tail; a stream cut off ends with an ``error`` event."""

    def __init__(self) -> None:
        super().__init__(ResponsesMeter())

    def ends(self, event: dict) -> bool:
        return event.get("type") in TERMINAL_RESPONSE_EVENTS

    def holds(self, event: dict) -> bool:
        return self.ends(event)

    def usage_in(self, event: dict) -> dict | None:
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        return usage if isinstance(usage, dict) else None

    def failure_event(self, message: str) -> dict:
        sequence = self.meter.sequence + 1
        return {
            "type": "error",
            "code": "upstream_error",
            "message": message,
            "param": None,
            "sequence_number": sequence,
        }


class Responses(TranslatableEndpoint):
    name = "responses"
    protocol = "responses"
    native_path = "responses"
    cap = "max_output_tokens"

    def check(self, payload: dict) -> None:
        protocol.refuse_stored_state(payload)

    def to_chat(self, payload: dict) -> dict:
        return protocol.request_to_chat(payload)

    def answer_from_chat(self, completion: dict, payload: dict) -> tuple[int, bytes]:
        return 200, dumps(protocol.response_from_chat(completion, request=payload)).encode()

    def translator(self, payload: dict) -> protocol.ResponseStream:
        return protocol.ResponseStream(request=payload)

    def native_body(self, payload: dict, *, user_id: int, max_output: int) -> dict:
        return upstream.responses_body(payload, user_id=user_id, max_output=max_output)

    def native_meter(self) -> ResponsesMeter:
        return ResponsesMeter()

    def native_stream(self) -> ResponsesRelay:
        return ResponsesRelay()
