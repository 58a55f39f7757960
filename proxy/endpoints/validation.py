"""Input validation for the metered endpoints: a request body in, a ``Parsed`` request or a
``Refusal`` (400) out. No I/O.

The checks are the ones billing depends on — the model id (stored and looked up), the output cap
and choice count (they size the hold) — plus the shapes an upstream would reject anyway, so a
malformed request is refused before anything is held. Everything else in the body is the
upstream's business and is passed through untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from core.media import Media, media_parts

from ..services import Refusal

MAX_FALLBACK_MODELS = 10  # OpenRouter's ``models``: each is priced before the request is held
MAX_OUTPUT_TOKENS = 10_000_000  # far above any model's output limit; bounds what a hold is priced for
MAX_CHOICES = 128


@dataclass
class Parsed:
    """What the lifecycle needs to know about a request, whatever its protocol."""

    payload: dict
    model: str
    stream: bool = False
    fallback_models: list[str] = field(default_factory=list)
    requested_output: int | None = None  # output tokens per choice the client capped, if it did
    choices: int = 1
    prompt_chars: int = 0  # the size the prompt's hold is estimated from (the body's length)
    media: Media = field(default_factory=Media)  # its non-text parts, held at their allowances


class Invalid(Exception):
    """A refused body, with the model it named when that much could be read (it is recorded)."""

    def __init__(self, refusal: Refusal, model: str = ""):
        super().__init__(refusal.message)
        self.refusal, self.model = refusal, model


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> Refusal:
    return Refusal(400, message, code=code, param=param)


def model_id(value: object) -> bool:
    """A plausible model id: a short printable string (it is stored, and looked up in the price
    table — a NUL or a lone surrogate cannot even be sent to PostgreSQL)."""
    return isinstance(value, str) and 0 < len(value) <= 200 and value.strip() == value and value.isprintable()


def positive_int(value: object, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= most


def json_object(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise Invalid(invalid("The request body is not valid JSON.", code="invalid_json")) from None
    if not isinstance(payload, dict):
        raise Invalid(invalid("The request body must be a JSON object."))
    return payload


def openai_request(body: bytes) -> tuple[dict, str]:
    """The JSON object and its model id, with the checks every OpenAI-shaped request shares."""
    payload = json_object(body)
    if not model_id(payload.get("model")):
        raise Invalid(invalid("`model` must be a model id.", "model"))
    model = payload["model"]
    for name, most in (
        ("max_tokens", MAX_OUTPUT_TOKENS),
        ("max_completion_tokens", MAX_OUTPUT_TOKENS),
        ("n", MAX_CHOICES),
    ):
        if payload.get(name) is not None and not positive_int(payload[name], most):
            raise Invalid(invalid(f"`{name}` must be a positive integer no larger than {most}.", name), model)
    return payload, model


def chat_completions(body: bytes) -> Parsed:
    payload, model = openai_request(body)

    def refuse(message: str, param: str) -> Invalid:
        return Invalid(invalid(message, param), model)

    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise refuse("`messages` must be a non-empty array.", "messages")
    if "stream" in payload and not isinstance(payload["stream"], bool):
        raise refuse("`stream` must be a boolean.", "stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise refuse("`stream_options` must be an object.", "stream_options")
    fallbacks = payload.get("models")
    if fallbacks is not None and (
        not isinstance(fallbacks, list) or len(fallbacks) > MAX_FALLBACK_MODELS or not all(map(model_id, fallbacks))
    ):
        raise refuse(f"`models` must be an array of at most {MAX_FALLBACK_MODELS} model ids.", "models")
    return Parsed(
        payload=payload,
        model=model,
        stream=payload.get("stream") is True,
        fallback_models=list(fallbacks or []),
        requested_output=payload.get("max_completion_tokens") or payload.get("max_tokens"),
        choices=payload.get("n") or 1,
        prompt_chars=len(body),
        media=media_parts(messages),
    )


def embeddings(body: bytes) -> Parsed:
    payload, model = openai_request(body)
    value = payload.get("input")
    if value in (None, "", []) or not isinstance(value, (str, list)):
        raise Invalid(invalid("`input` must be a string or a non-empty array.", "input"), model)
    if payload.get("stream"):
        raise Invalid(invalid("Embeddings cannot be streamed.", "stream"), model)
    return Parsed(
        payload=payload,
        model=model,
        requested_output=payload.get("max_completion_tokens") or payload.get("max_tokens"),
        choices=payload.get("n") or 1,
        prompt_chars=len(body),
    )
