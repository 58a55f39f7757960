"""The OpenAI error shape, built in one place for every ``/v1`` answer that is an error.

``{"error": {"message", "type", "param", "code", …}}`` is what the OpenAI SDKs read (an HTML page
or Django's plain-text 405 would surface as an unreadable ``APIStatusError``). Extra members ride
beside the four standard ones — a 402's ``topup_url``, ``balance`` and ``needed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# The ``type`` an error of each status has when the raiser does not say (OpenAI's own names).
TYPE_FOR_STATUS = {
    401: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error_body(
    message: str, type_: str = "invalid_request_error", code: str | None = None, param: str | None = None, **extra
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def error_event(message: str, type_: str, code: str | None = None) -> bytes:
    """The same body as one SSE ``data:`` event, for an error that happens mid-stream (the openai
    SDK raises it as an ``APIError``)."""
    return b"data: " + json.dumps(error_body(message, type_, code)).encode() + b"\n\n"


@dataclass
class OpenAIError(Exception):
    """An answer in the OpenAI error shape, raised by a rule and rendered by the surface."""

    status: int
    message: str
    type: str = ""
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None  # seconds, sent as ``Retry-After``
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if not self.type:
            self.type = TYPE_FOR_STATUS.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param, **self.extra)
