"""One attempt at one delivery: a signed webhook POST, or an email. No database access here —
the worker runs these in threads beside each other and records their results itself.

Webhooks are signed the Standard Webhooks way with its reference library: ``webhook-id`` (the
event id, the same on every retry), ``webhook-timestamp`` (this attempt, unix seconds) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` under the endpoint's
``whsec_`` secret. A 2xx answer is a success; anything else — a redirect too, which is not
followed — is a failure to retry.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx
from django.conf import settings
from django.core.mail import EmailMultiAlternatives, get_connection
from standardwebhooks import Webhook

from .services import Result

# Each phase of an attempt (connect, send, wait for the answer) has this long; an attempt can
# therefore take at most about 3× it, and the claim's lease is comfortably longer.
TIMEOUT = 15.0  # seconds
LEASE = timedelta(seconds=4 * TIMEOUT + 30)
USER_AGENT = "Tokentill-Webhooks/1"


def signed_headers(*, secret: str, event_id: str, body: str, at: datetime) -> dict[str, str]:
    timestamp = datetime.fromtimestamp(int(at.timestamp()), tz=UTC)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id=event_id, timestamp=timestamp, data=body),
    }


def client(timeout: float = TIMEOUT) -> httpx.Client:
    # No redirects (a 3xx is the receiver's misconfiguration, and following one would re-POST the
    # signed body somewhere the operator did not register), no proxies from the environment.
    return httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False)


def _retry_after(response: httpx.Response) -> timedelta | None:
    raw = response.headers.get("retry-after", "").strip()
    if raw.isdigit():
        return timedelta(seconds=int(raw))
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(when - datetime.now(tz=UTC), timedelta(0)) if when.tzinfo else None


def post(http: httpx.Client, *, url: str, secret: str, event_id: str, body: str) -> Result:
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **signed_headers(secret=secret, event_id=event_id, body=body, at=datetime.now(tz=UTC)),
    }
    started = time.monotonic()
    try:
        # Streamed and closed unread: only the status matters, and a receiver that answers with
        # an endless body must not hold the worker.
        with http.stream("POST", url, content=body.encode(), headers=headers) as response:
            status = response.status_code
            retry_after = _retry_after(response) if status in (429, 503) else None
    except httpx.TimeoutException as exc:
        return Result(ok=False, latency_ms=_since(started), error=f"timed out ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        return Result(ok=False, latency_ms=_since(started), error=f"{type(exc).__name__}: {exc}"[:500])
    ok = 200 <= status < 300
    error = "" if ok else f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
    return Result(ok=ok, status_code=status, latency_ms=_since(started), error=error, retry_after=retry_after)


def send_email(mail: EmailMultiAlternatives) -> Result:
    started = time.monotonic()
    try:
        with get_connection(fail_silently=False, timeout=settings.EMAIL_TIMEOUT) as connection:
            mail.connection = connection
            mail.send()
    except Exception as exc:  # SMTP and socket errors alike: retried on the schedule
        return Result(ok=False, latency_ms=_since(started), error=f"{type(exc).__name__}: {exc}"[:500])
    return Result(ok=True, latency_ms=_since(started))


def _since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
