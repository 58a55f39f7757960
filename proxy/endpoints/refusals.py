"""What a refused or failed request answers: the OpenAI-shaped errors and the assistant-message
refusal. No I/O: each function returns the error (or the body) for the lifecycle to send.
"""

from __future__ import annotations

import json
import logging
import time

from django.conf import settings

from core import upstream_errors
from core.money import format_usd
from core.openai_errors import OpenAIError

from ..services import Funds

log = logging.getLogger(__name__)

UPSTREAM_ERROR_BODY_LIMIT = 64 * 1024


def usd(nanos: int) -> str:
    """Money for a sentence: ``$1.500000000``, ``-$0.000120000``."""
    return f"-${format_usd(-nanos)}" if nanos < 0 else f"${format_usd(nanos)}"


def topup_url() -> str:
    return f"{settings.APP_URL}/topup"


def insufficient_funds(funds: Funds) -> OpenAIError:
    """The 402: what the balance is, what the request needed, and where to top up."""
    message = (
        f"Your balance ({usd(funds.balance)}, {usd(funds.available)} available) "
        f"cannot cover this request, which needs {usd(funds.needed)}. Top up at {topup_url()}"
    )
    extra = {"topup_url": topup_url(), "balance": format_usd(funds.balance), "needed": format_usd(funds.needed)}
    return OpenAIError(402, message, "insufficient_funds", "insufficient_funds", extra=extra)


def assistant_message_text(funds: Funds) -> str:
    return (
        f"Your Tokentill balance (${format_usd(funds.balance)}) is too low for this request, which needs "
        f"${format_usd(funds.needed)}. Top up at {topup_url()} and try again."
    )


def signed_out_text(failure) -> str:
    return (
        f"Your sign-in has expired or was ended ({failure.reason}). "
        f"Please sign in again at {settings.APP_URL}/login and try again."
    )


def assistant_completion(*, request_id: str, model: str, text: str) -> dict:
    """A whole chat completion carrying ``text`` as the assistant's answer (nothing charged)."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def assistant_stream(*, request_id: str, model: str, text: str, with_usage: bool) -> bytes:
    """The same answer as the data events of a stream (the caller appends the tail)."""
    base = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    if with_usage:
        chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
    return b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks)


def upstream_failed(status: int, message: str) -> OpenAIError:
    """The upstream could not be reached or timed out before any output: 502 or 504."""
    return OpenAIError(status, message, "upstream_error", "upstream_timeout" if status == 504 else "upstream_error")


def upstream_busy() -> OpenAIError:
    """Every candidate upstream already has its most requests in flight from this process."""
    message = "The upstream model is at its concurrency limit; retry shortly. Nothing was charged."
    return OpenAIError(503, message, "upstream_error", "upstream_busy", retry_after=1)


def upstream_unavailable(retry_after: int) -> OpenAIError:
    """Every candidate upstream's circuit breaker is open: answered at once, nothing forwarded."""
    message = (
        "The upstream model is unavailable: it failed repeatedly and is being given time to recover. "
        f"Retry in {retry_after} s. Nothing was charged."
    )
    return OpenAIError(503, message, "upstream_error", "upstream_unavailable", retry_after=retry_after)


def upstream_rejected(
    upstream_status: int, raw: bytes, headers, *, request_id: str, secrets: tuple[str, ...]
) -> tuple[OpenAIError, str]:
    """An upstream error answer before any output, and the detail recorded for staff.

    The client's own mistakes (400/404/413/422: context too long, bad parameter) come back as 400
    with the upstream's message so they can be fixed — redacted, as it was written for the
    operator and can name their key or account (``core.upstream_errors``); an upstream rate limit
    stays 429 with its Retry-After so SDKs back off; everything else (our upstream credentials or
    credit, upstream outages) is the operator's problem and becomes a 502 that reveals no details.
    Staff get the whole body in the log, credentials (``secrets``: the upstream keys) removed.
    """
    raw = raw[:UPSTREAM_ERROR_BODY_LIMIT]
    log.warning(
        "proxy request %s: upstream HTTP %s: %s",
        request_id,
        upstream_status,
        upstream_errors.log_text(raw, secrets=secrets),
    )
    detail = upstream_errors.client_error(raw, secrets=secrets)
    if upstream_status in (400, 404, 413, 422):
        message = detail.message or "The upstream model rejected the request."
        error = OpenAIError(400, message, "invalid_request_error", "upstream_invalid_request", param=detail.param)
    elif upstream_status == 429:
        error = OpenAIError(
            429,
            "The upstream model is rate limited; retry shortly.",
            "upstream_error",
            "upstream_rate_limited",
            retry_after=headers.get("retry-after"),
        )
    elif upstream_status in (408, 504, 524):
        error = OpenAIError(504, "The upstream model timed out.", "upstream_error", "upstream_timeout")
    else:
        message = f"The upstream model failed (HTTP {upstream_status})."
        error = OpenAIError(502, message, "upstream_error", "upstream_error")
    return error, f"upstream HTTP {upstream_status}: {detail.message}"[:500]
