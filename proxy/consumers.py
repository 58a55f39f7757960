"""``/v1/chat/completions`` and ``/v1/embeddings``: the metered proxy, as Channels consumers.

Why the consumer is shaped the way it is:

* The request is served with a disconnect listener running *beside* it (Django's ``asgi.py``
  does the same). A consumer's ``handle()`` blocks the dispatch loop, so a relay loop inside it
  would never hear ``http.disconnect`` (channels issues #1249, #1350): the client could leave and
  we would keep paying the upstream. The listener cancels the request's task only while it is
  relaying — that closes the upstream response, and so cancels the generation — and otherwise
  just notes the departure: admission runs to its end and then releases its hold, and the
  settlement runs in a task of its own, shielded, so the client leaving cannot interrupt it. (A
  forced shutdown can: ``reconcile_holds`` then settles the hold left behind.)
* Few tasks: under load every task is another wait behind everything else ready on the event
  loop. The request runs in the ASGI server's own task, with the listener beside it, the
  settlement's task, and — only for a request still running after a second — a progress write;
  the body is read straight from ``receive`` rather than through Channels' dispatch loop.
* Upstream bytes are relayed as they arrive; only whole SSE events are held back, and only until
  their terminating blank line, because the usage chunk may have to be removed.
* The request is settled *before* the client is told its charge, so the ``: tokentill`` line and
  the ``X-Tokentill-*`` headers always describe committed money.
* No channel layer: these consumers never join a group, and opening a layer channel per request
  would cost a Redis round trip on every call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import django.db
import httpx
import psycopg
from channels.generic.http import AsyncHttpConsumer
from django.conf import settings
from psycopg_pool import PoolTimeout

from accounts.auth import AuthFailed, aauthenticate_bearer, bearer_from_header
from config import adb
from wallet.money import format_usd, loads_decimal

from . import limits, upstream
from .demo import DemoResponse
from .lib.sse import Event, SSEParser
from .lib.usage import StreamMeter
from .models import UsageStatus
from .services import (
    Begun,
    Funds,
    Outcome,
    Refusal,
    RequestMeta,
    arequest_begin,
    arequest_progress,
    arequest_settle,
    ausage_refused,
)

log = logging.getLogger(__name__)

UPSTREAM_ERROR_BODY_LIMIT = 64 * 1024
MAX_FALLBACK_MODELS = 10  # OpenRouter's ``models``: each is priced before the request is held
MAX_OUTPUT_TOKENS = 10_000_000  # far above any model's output limit; bounds what a hold is priced for
LARGE_BODY = 256 * 1024  # bytes: a whole answer this large is parsed in a worker thread
PROGRESS_AFTER = 1.0  # seconds a request runs before its progress is first written down
PROGRESS_EVERY = 60.0  # seconds between progress writes after that (at most HOLD_TTL / 3)
# Failures that mean "the database cannot take this request now", not a bug: answered 503.
# (ConditionFailed: a key or user whose row kept changing while admission ran, ADMIT_ATTEMPTS times.)
DATABASE_UNAVAILABLE = (
    django.db.OperationalError,
    django.db.InterfaceError,
    psycopg.OperationalError,
    PoolTimeout,
    adb.ConditionFailed,
)
ADMIT_ATTEMPTS = 3
DRAIN_SECONDS = 0.1  # how long the rest of a finished stream's body may take to arrive


async def _drain(chunks) -> None:
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


def _ms_since(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


_COST_MARK = "__tokentill_charge__"


def _dumps_charged(plain: dict, charge: int) -> bytes:
    """``plain`` (a chunk or completion whose ``usage`` OpenRouter priced) as JSON, its
    ``usage.cost`` now what the caller was charged: OpenRouter's own figure is our cost price, and
    a client reading ``cost`` should see what it paid (``cost_details`` breaks down the former)."""
    usage = plain["usage"]
    usage["cost"] = _COST_MARK
    usage.pop("cost_details", None)
    return json.dumps(plain, separators=(",", ":")).replace(f'"{_COST_MARK}"', format_usd(charge)).encode()


def _priced(obj: object) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("usage"), dict) and "cost" in obj["usage"]


def _charge_as_cost(raw: bytes, parsed: object, charge: int) -> bytes:
    """A whole response with ``usage.cost`` restated as the charge (see ``_dumps_charged``)."""
    if not _priced(parsed):
        return raw
    spliced = _splice_usage(raw, parsed["usage"], charge)
    return spliced if spliced is not None else _dumps_charged(json.loads(raw), charge)


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
    return raw[: colon + 1] + _dumps_charged({"usage": value}, charge)[len(b'{"usage":') : -1] + tail[end:].encode()


_DECODER = json.JSONDecoder()


def _usd(nanos: int) -> str:
    """Money for a sentence: ``$1.500000000``, ``-$0.000120000``."""
    return f"-${format_usd(-nanos)}" if nanos < 0 else f"${format_usd(nanos)}"


def _model_id(value: object) -> bool:
    """A plausible model id: a short printable string (it is stored, and looked up in the price
    table — a NUL or a lone surrogate cannot even be sent to PostgreSQL)."""
    return isinstance(value, str) and 0 < len(value) <= 200 and value.strip() == value and value.isprintable()


class ProxyConsumer(AsyncHttpConsumer):
    endpoint = ""

    async def __call__(self, scope, receive, send):
        self.scope = scope
        self.base_send = send
        self.request_id = f"req_{uuid.uuid4().hex}"
        self.started = time.monotonic()
        self.response_started = False
        self.disconnected = False
        self.cancellable = False  # may a disconnect cancel the work right now? (only while relaying)
        self.forwarded = False  # has the request been sent upstream?
        self.requested_model = ""  # the body's model id, once parsed
        self.run_ask = limits.RunAsk()  # the request's own run limits, once parsed
        self.headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])
        }
        self.begun: Begun | None = None
        self.meter: StreamMeter | None = None  # what a stream has relayed so far (for progress writes)
        self.progress_timer: asyncio.TimerHandle | None = None
        self.progress: asyncio.Future | None = None
        self.settling = False
        self.settlement_unawaited = False
        if scope.get("method") != "POST":
            message = f"{scope.get('method')} is not allowed here; send POST."
            return await self.send_error(405, message, "invalid_request_error", "method_not_allowed", allow="POST")
        body = await self.read_body(receive)
        if body is None:
            return
        task = asyncio.current_task()
        listener = asyncio.ensure_future(self.listen_for_disconnect(receive, task))
        try:
            await self.handle(body)
        except asyncio.CancelledError:
            if not self.disconnected:
                raise  # not ours: the server is shutting down
            task.uncancel()  # ours, for a client that left: handled
        finally:
            listener.cancel()

    # --- ASGI plumbing -------------------------------------------------------------------------

    async def read_body(self, receive) -> bytes | None:
        """The whole request body, or None when it was refused (413) or the client left."""
        limit = settings.PROXY_MAX_BODY_BYTES
        too_large = f"Request body is larger than {limit} bytes."
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            # Refused before a byte is read, so a client waiting on ``Expect: 100-continue`` is
            # told not to send the body at all.
            await self._refuse_early(413, too_large, "request_too_large")
            return None
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            part = message.get("body", b"")
            size += len(part)
            if size > limit:  # answered without reading (or buffering) the rest
                await self._refuse_early(413, too_large, "request_too_large")
                return None
            parts.append(part)
            if not message.get("more_body"):
                return b"".join(parts)

    async def listen_for_disconnect(self, receive, task: asyncio.Task) -> None:
        # After the body only http.disconnect can arrive: the client has gone.
        if (await receive())["type"] == "http.disconnect":
            self.disconnected = True
            if self.cancellable:
                task.cancel()

    def allow_cancel(self, allowed: bool) -> None:
        """Relaying may be cancelled by a disconnect; admission and settlement may not. (A
        departure noted before relaying began is handled by ``serve``, which checks for it
        with no await between that check and this call.)"""
        self.cancellable = allowed

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.response_started = True
        await self.send_headers(
            status=status,
            headers=[(b"x-request-id", self.request_id.encode())]
            + [(name.encode(), value.encode()) for name, value in headers],
        )

    def clamp_headers(self) -> list[tuple[str, str]]:
        """Tell a client whose output cap was lowered to what its balance affords."""
        clamped = self.begun.clamped_to if self.begun is not None else None
        return [("x-tokentill-max-tokens", str(clamped))] if clamped is not None else []

    async def send_whole(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        """A response with a known length (sent with Content-Length, not chunked)."""
        await self.start(status, [*headers, ("content-length", str(len(body)))])
        await self.send_body(body)

    async def send_json(self, status: int, payload: dict, headers: list[tuple[str, str]] | None = None) -> None:
        body = json.dumps(payload).encode()
        await self.send_whole(status, body, [("content-type", "application/json"), *(headers or [])])

    async def send_error(self, status: int, message: str, type_: str, code: str | None = None, **kw) -> None:
        param = kw.pop("param", None)
        retry_after = kw.pop("retry_after", None)
        headers = [("retry-after", str(retry_after))] if retry_after is not None else []
        if allow := kw.pop("allow", None):
            headers.append(("allow", allow))
        body = {"error": {"message": message, "type": type_, "param": param, "code": code, **kw}}
        await self.send_json(status, body, headers)

    async def send_refusal(self, refusal: Refusal) -> None:
        await self.send_error(
            refusal.status,
            refusal.message,
            refusal.type,
            refusal.code,
            param=refusal.param,
            retry_after=refusal.retry_after,
            **refusal.extra,
        )

    # --- the request ---------------------------------------------------------------------------

    def meta(self, principal) -> RequestMeta:
        return RequestMeta(
            request_id=self.request_id,
            user=principal.user,
            api_key=principal.api_key,
            endpoint=self.endpoint,
            run=self.headers.get("x-tokentill-run", "")[: limits.MAX_RUN_ID],
            agent=self.headers.get("x-tokentill-agent", "")[:200],
            tool=self.headers.get("x-tokentill-tool", "")[:200],
            run_max_steps=self.run_ask.max_steps,
            run_max_spend=self.run_ask.max_spend,
            unchanged=principal.unchanged,
        )

    async def authenticate(self):
        token = bearer_from_header(self.headers.get("authorization"))
        try:
            return await aauthenticate_bearer(token)
        except AuthFailed as exc:
            await self.send_error(401, exc.reason, "invalid_request_error", "invalid_api_key")
            return None

    async def _refuse_early(self, status: int, message: str, code: str) -> None:
        try:
            principal = await self.authenticate()
            if principal is None:
                return
            await ausage_refused(meta=self.meta(principal), http_status=status, error=message)
        except DATABASE_UNAVAILABLE:  # the refusal still stands; it just goes unrecorded
            log.exception("proxy request %s: could not record its refusal", self.request_id)
        await self.send_error(status, message, "invalid_request_error", code)

    async def handle(self, body: bytes) -> None:
        try:
            await self.serve(body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("proxy request %s failed", self.request_id)
            if self.response_started:
                return
            # Before forwarding nothing is held or charged; after it, a hold the settlement could
            # not close is charged by reconcile_holds from its record.
            after = " It will be reconciled from its usage record." if self.forwarded else " Nothing was charged."
            if isinstance(exc, DATABASE_UNAVAILABLE):
                message = "The billing database is unavailable or busy; retry shortly." + after
                await self.send_error(503, message, "server_error", "service_unavailable", retry_after=1)
            else:
                await self.send_error(500, "Internal error." + after, "server_error", "internal_error")

    async def serve(self, body: bytes) -> None:
        try:
            payload, invalid = self.parse(body), None
        except Refusal as refusal:
            payload, invalid = None, refusal
        try:
            # Not cancellable (see the module docstring): a half-taken hold is worse than a
            # finished one, which abandon() frees if the client has left meanwhile.
            begun = await self.admit(body, payload, invalid)
        except AuthFailed as exc:
            return await self.unauthenticated(exc, payload)
        except Refusal as refusal:
            return await self.send_refusal(refusal)
        except Funds as funds:
            return await self.insufficient_funds(funds, payload)
        if self.disconnected:
            return await self.abandon(begun)
        await self.forward(begun, payload)

    async def abandon(self, begun: Begun) -> None:
        """The client left before anything was forwarded: release the hold."""
        outcome = Outcome(status=UsageStatus.CANCELLED, reached_upstream=False, error="client disconnected")
        await arequest_settle(begun=begun, outcome=outcome)

    async def admit(self, body: bytes, payload: dict | None, invalid: Refusal | None) -> Begun:
        """Authenticate, then record a refusal or take the hold.

        The principal may come from a recent lookup; the first write checks it is still current
        (``accounts.auth``), and when it is not, admission starts again from a fresh lookup (so a
        key's rpm counter can count such a request twice). Raises ``AuthFailed`` (no record: there
        is no user), ``Refusal`` or ``Funds``.
        """
        token = bearer_from_header(self.headers.get("authorization"))
        for attempt in range(ADMIT_ATTEMPTS):
            principal = await aauthenticate_bearer(token, cached=attempt == 0)
            try:
                return await self.admit_as(principal, body, payload, invalid)
            except adb.ConditionFailed:
                if attempt == ADMIT_ATTEMPTS - 1:
                    raise

    async def admit_as(self, principal, body: bytes, payload: dict | None, invalid: Refusal | None) -> Begun:
        meta = self.meta(principal)
        if not principal.has_scope("proxy"):
            invalid = Refusal(403, "This API key lacks the `proxy` scope.", "permission_error", "insufficient_scope")
        meta.model = self.requested_model
        if payload is not None:
            meta.stream = payload.get("stream") is True
        if invalid is not None:
            await ausage_refused(meta=meta, http_status=invalid.status, error=invalid.message)
            raise invalid
        return await arequest_begin(
            meta=meta,
            fallback_models=payload.get("models") if self.endpoint == "chat.completions" else None,
            prompt_chars=len(body),
            requested_output=payload.get("max_completion_tokens") or payload.get("max_tokens"),
            choices=payload.get("n") or 1,
        )

    def parse(self, body: bytes) -> dict:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            raise Refusal(400, "The request body is not valid JSON.", code="invalid_json")
        if not isinstance(payload, dict):
            raise Refusal(400, "The request body must be a JSON object.", code="invalid_request")
        if _model_id(payload.get("model")):
            self.requested_model = payload["model"]  # recorded even if a later check refuses
        else:
            raise Refusal(400, "`model` must be a model id.", code="invalid_request", param="model")
        for name, most in (("max_tokens", MAX_OUTPUT_TOKENS), ("max_completion_tokens", MAX_OUTPUT_TOKENS), ("n", 128)):
            if payload.get(name) is not None and not (_positive_int(payload[name]) and payload[name] <= most):
                message = f"`{name}` must be a positive integer no larger than {most}."
                raise Refusal(400, message, code="invalid_request", param=name)
        try:
            self.run_ask = limits.run_ask_parse(self.headers)
        except limits.InvalidRunHeader as exc:
            raise Refusal(400, exc.message, code="invalid_request", param=exc.header) from None
        return payload

    async def insufficient_funds(self, funds: Funds, payload: dict) -> None:
        message = (
            f"Your balance ({_usd(funds.balance)}, {_usd(funds.available)} available) "
            f"cannot cover this request, which needs {_usd(funds.needed)}. Top up at {settings.APP_URL}/topup"
        )
        await self.send_error(
            402,
            message,
            "insufficient_funds",
            "insufficient_funds",
            topup_url=f"{settings.APP_URL}/topup",
            balance=format_usd(funds.balance),
            needed=format_usd(funds.needed),
        )

    async def unauthenticated(self, failure: AuthFailed, payload: dict | None) -> None:
        await self.send_error(401, failure.reason, "invalid_request_error", "invalid_api_key")

    async def open_upstream(self, begun: Begun, body: dict, path: str):
        if begun.price.is_demo:
            return DemoResponse(body, begun.rates, prompt_chars=len(json.dumps(body.get("messages", ""))))
        return upstream.stream(path, json.dumps(body).encode())

    async def forward(self, begun: Begun, payload: dict) -> None:
        outcome = Outcome(trust_upstream_cost=upstream.is_openrouter() and not begun.price.is_demo)
        self.begun = begun
        finish = None
        try:
            self.forwarded = True
            self.schedule_progress(begun, outcome, PROGRESS_AFTER)
            self.allow_cancel(True)
            finish = await self.relay(begun, payload, outcome)
        except asyncio.CancelledError:
            outcome.status = UsageStatus.CANCELLED
            outcome.error = "client disconnected"
            raise
        except Exception as exc:
            # A bug of ours mid-relay: still settle what the upstream did, marked as an error.
            outcome.status, outcome.error = UsageStatus.UPSTREAM_ERROR, f"proxy error: {type(exc).__name__}"
            raise
        finally:
            self.allow_cancel(False)
            outcome.latency_ms = _ms_since(self.started)
            settling = asyncio.ensure_future(self.settle(begun, outcome))
            settling.add_done_callback(self._settled)
            # Shielded: a second cancellation (server shutdown) must not lose the settlement.
            try:
                record = await asyncio.shield(settling)
            except asyncio.CancelledError:
                self.settlement_unawaited = True
                raise
        await finish(record, begun)

    def _settled(self, settling: asyncio.Future) -> None:
        # If whoever awaited the settlement was cancelled meanwhile, nobody else will hear of its
        # failure: log it here (and never leave an exception unretrieved).
        failure = None if settling.cancelled() else settling.exception()
        if failure is not None and self.settlement_unawaited:
            log.error("proxy request %s: settlement failed", self.request_id, exc_info=failure)

    async def settle(self, begun: Begun, outcome: Outcome):
        # Progress writes stop first, and one in flight lands first: the settlement is the last
        # word on the record and the hold.
        self.settling = True
        if self.progress_timer is not None:
            self.progress_timer.cancel()
        if self.progress is not None and not self.progress.done():
            await asyncio.wait({self.progress})
        return await arequest_settle(begun=begun, outcome=outcome)

    # --- progress writes (crash safety for requests that run a while) --------------------------

    def schedule_progress(self, begun: Begun, outcome: Outcome, delay: float) -> None:
        """A request still running after ``delay`` writes down its progress (arequest_progress);
        requests that finish sooner never pay for it — a timer, not a task, until then."""
        if not self.settling:
            loop = asyncio.get_running_loop()
            self.progress_timer = loop.call_later(delay, self._start_progress, begun, outcome)

    def _start_progress(self, begun: Begun, outcome: Outcome) -> None:
        self.progress = asyncio.ensure_future(self.write_progress(begun, outcome))

    async def write_progress(self, begun: Begun, outcome: Outcome) -> None:
        meter = self.meter
        try:
            await arequest_progress(
                begun=begun,
                generation_id=outcome.generation_id or (meter.id if meter else ""),
                output_chars=meter.output_chars if meter else 0,
            )
        except Exception:  # the request goes on; the next write tries again
            log.warning("proxy request %s: could not write its progress", self.request_id, exc_info=True)
        self.schedule_progress(begun, outcome, max(min(settings.HOLD_TTL / 3, PROGRESS_EVERY), 1.0))

    async def relay_whole(self, begun: Begun, body: dict, outcome: Outcome, path: str):
        """Forward a non-streamed request; return what to send once it is settled."""
        try:
            async with await self.open_upstream(begun, body, path) as response:
                # Known before the body: a client that leaves while it is generated still leaves
                # the id for reconcile_holds to ask OpenRouter what it cost.
                outcome.generation_id = response.headers.get("x-generation-id", "")
                raw = await response.aread()
                outcome.ttfb_ms = _ms_since(self.started)
        except httpx.TimeoutException:
            return self.upstream_failed(outcome, 504, "The upstream model timed out.")
        except httpx.HTTPError as exc:
            return self.upstream_failed(outcome, 502, f"The upstream model is unreachable ({type(exc).__name__}).")
        if response.status_code >= 400:
            return self.upstream_rejected(outcome, response.status_code, raw, response.headers)
        try:
            # A large body (embeddings of many inputs) is parsed off the event loop.
            parsed = await asyncio.to_thread(loads_decimal, raw) if len(raw) > LARGE_BODY else loads_decimal(raw)
        except ValueError:
            return self.upstream_failed(outcome, 502, "The upstream model sent a malformed response.")
        meter = StreamMeter()
        meter.observe(parsed)
        self.copy_meter(meter, outcome)
        outcome.http_status = 200
        if meter.error:
            outcome.status = UsageStatus.UPSTREAM_ERROR

        async def finish(record, begun):
            headers = [
                ("content-type", "application/json"),
                ("x-tokentill-charge", format_usd(record.charge)),
                ("x-tokentill-balance", format_usd(begun.wallet.balance)),
                *self.clamp_headers(),
            ]
            await self.send_whole(200, _charge_as_cost(raw, parsed, record.charge), headers)

        return finish

    def copy_meter(self, meter: StreamMeter, outcome: Outcome) -> None:
        outcome.usage = meter.usage
        outcome.upstream_model = meter.model
        outcome.generation_id = outcome.generation_id or meter.id
        outcome.finish_reason = meter.finish_reason
        outcome.output_chars = meter.output_chars
        if meter.error:
            outcome.error = meter.error

    def upstream_failed(self, outcome: Outcome, status: int, message: str):
        outcome.status, outcome.error, outcome.http_status = UsageStatus.UPSTREAM_ERROR, message, status
        outcome.reached_upstream = False

        async def finish(record, begun):
            await self.send_error(
                status, message, "upstream_error", "upstream_timeout" if status == 504 else "upstream_error"
            )

        return finish

    def upstream_rejected(self, outcome: Outcome, upstream_status: int, raw: bytes, headers):
        """An upstream error before any output: nothing is charged.

        The client's own mistakes (400/404/413/422: context too long, bad parameter) come back as
        400 with the upstream's message so they can be fixed; an upstream rate limit stays 429 with
        its Retry-After so SDKs back off; everything else (our upstream credentials or credit,
        upstream outages) is the operator's problem and becomes a 502 that reveals no details.
        """
        detail = upstream.error_message(raw[:UPSTREAM_ERROR_BODY_LIMIT])
        if upstream_status in (400, 404, 413, 422):
            status, message, code = (
                400,
                detail or "The upstream model rejected the request.",
                "upstream_invalid_request",
            )
        elif upstream_status == 429:
            status, message, code = 429, "The upstream model is rate limited; retry shortly.", "upstream_rate_limited"
        elif upstream_status in (408, 504, 524):
            status, message, code = 504, "The upstream model timed out.", "upstream_timeout"
        else:
            status, message, code = 502, f"The upstream model failed (HTTP {upstream_status}).", "upstream_error"
        outcome.status, outcome.http_status, outcome.reached_upstream = UsageStatus.UPSTREAM_ERROR, status, False
        outcome.error = f"upstream HTTP {upstream_status}: {detail}"[:500]
        retry_after = headers.get("retry-after") if status == 429 else None
        type_ = "invalid_request_error" if status == 400 else "upstream_error"

        async def finish(record, begun):
            await self.send_error(status, message, type_, code, retry_after=retry_after)

        return finish


class ChatCompletionsConsumer(ProxyConsumer):
    endpoint = "chat.completions"

    def parse(self, body: bytes) -> dict:
        payload = super().parse(body)
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Refusal(400, "`messages` must be a non-empty array.", code="invalid_request", param="messages")
        if "stream" in payload and not isinstance(payload["stream"], bool):
            raise Refusal(400, "`stream` must be a boolean.", code="invalid_request", param="stream")
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise Refusal(400, "`stream_options` must be an object.", code="invalid_request", param="stream_options")
        fallbacks = payload.get("models")
        if fallbacks is not None and (
            not isinstance(fallbacks, list)
            or len(fallbacks) > MAX_FALLBACK_MODELS
            or not all(_model_id(model) for model in fallbacks)
        ):
            raise Refusal(
                400,
                f"`models` must be an array of at most {MAX_FALLBACK_MODELS} model ids.",
                code="invalid_request",
                param="models",
            )
        return payload

    def client_wants_usage(self, payload: dict) -> bool:
        options = payload.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    async def relay(self, begun: Begun, payload: dict, outcome: Outcome):
        stream = payload.get("stream") is True
        body = upstream.chat_body(payload, user_id=begun.meta.user.pk, stream=stream, max_output=begun.max_output)
        if not stream:
            return await self.relay_whole(begun, body, outcome, "chat/completions")
        return await self.relay_stream(begun, body, outcome, self.client_wants_usage(payload))

    async def relay_stream(self, begun: Begun, body: dict, outcome: Outcome, client_usage: bool):
        meter = self.meter = StreamMeter()
        parser = SSEParser()
        done = False
        self.data_relayed = False  # any data event (not just keep-alive comments) sent on?
        self.priced_usage: dict | None = None  # the usage chunk held back to restate its cost
        try:
            async with await self.open_upstream(begun, body, "chat/completions") as response:
                if response.status_code >= 400:
                    raw = await response.aread()
                    return self.upstream_rejected(outcome, response.status_code, raw, response.headers)
                outcome.generation_id = response.headers.get("x-generation-id", "")
                chunks = response.aiter_raw()
                async for chunk in chunks:
                    if outcome.ttfb_ms is None:
                        outcome.ttfb_ms = _ms_since(self.started)
                    out = []
                    for event in parser.feed(chunk):
                        if event.is_done:
                            done = True
                            break
                        out.append(self.relay_event(event, meter, client_usage))
                    await self.send_out(b"".join(out))
                    if done:
                        break
                if done:
                    self.allow_cancel(False)  # the answer is complete: a client leaving now changes nothing
                    await _drain(chunks)
                else:
                    await self.send_out(b"".join(self.relay_event(e, meter, client_usage) for e in parser.flush()))
        except (httpx.TimeoutException, httpx.HTTPError) as exc:
            timed_out = isinstance(exc, httpx.TimeoutException)
            if not self.response_started:
                self.copy_meter(meter, outcome)
                if timed_out:
                    return self.upstream_failed(outcome, 504, "The upstream model timed out.")
                return self.upstream_failed(outcome, 502, f"The upstream model is unreachable ({type(exc).__name__}).")
            outcome.status = UsageStatus.UPSTREAM_ERROR
            outcome.error = (
                "upstream timed out mid-stream" if timed_out else f"upstream stream broke ({type(exc).__name__})"
            )
        finally:
            # Runs on cancellation too, so a disconnect is billed for what was already relayed.
            error = outcome.error
            self.copy_meter(meter, outcome)
            outcome.error = outcome.error or error
        failure = None  # an error event the client must see before the stream ends
        if not done and not self.data_relayed:
            # Nothing but keep-alive comments: a failure before any output, which costs nothing.
            no_output = "The upstream model closed the stream without any output."
            if not self.response_started:
                return self.upstream_failed(outcome, 502, no_output)
            outcome.reached_upstream = False
            outcome.status, outcome.error, failure = UsageStatus.UPSTREAM_ERROR, outcome.error or no_output, no_output
        elif not done and not meter.finish_reason and not meter.error:
            # Cut off mid-answer (a stream always ends with [DONE], or at least a finish reason).
            outcome.status = UsageStatus.UPSTREAM_ERROR
            outcome.error = outcome.error or "the upstream ended the stream before [DONE]"
            failure = "The upstream model's stream was cut off; the answer is incomplete."
        outcome.http_status = 200
        if meter.error:
            outcome.status = UsageStatus.UPSTREAM_ERROR
        if not self.response_started:
            await self.start_stream()

        async def finish(record, begun):
            tail = []
            if self.priced_usage is not None:
                tail.append(b"data: " + _dumps_charged(self.priced_usage, record.charge) + b"\n\n")
            if failure is not None:
                error = {"message": failure, "type": "upstream_error", "param": None, "code": "upstream_error"}
                tail.append(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
            await self.send_body(b"".join(tail) + self.trailer(record.charge, begun.wallet.balance))

        return finish

    def trailer(self, charge: int, balance: int) -> bytes:
        """The settled charge as an SSE comment (clients ignore it), then the end of the stream."""
        info = {"request_id": self.request_id, "charge": format_usd(charge), "balance": format_usd(balance)}
        return b": tokentill " + json.dumps(info).encode() + b"\n\ndata: [DONE]\n\n"

    async def start_stream(self) -> None:
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache"), ("x-accel-buffering", "no")]
        await self.start(200, [*headers, *self.clamp_headers()])

    async def send_out(self, data: bytes) -> None:
        if not data:
            return
        if not self.response_started:
            await self.start_stream()
        await self.send_body(data, more_body=True)

    def relay_event(self, event: Event, meter: StreamMeter, client_usage: bool) -> bytes:
        if event.is_comment:
            return event.encode()
        self.data_relayed = True
        try:
            chunk = loads_decimal(event.data)
        except ValueError:
            return event.encode()
        meter.observe(chunk)
        if not isinstance(chunk, dict) or chunk.get("usage") is None:
            return event.encode()
        usage_only = not chunk.get("choices") and not chunk.get("error")
        if client_usage:
            if not _priced(chunk):
                return event.encode()
            if usage_only:  # the stream's last data event: sent, restated, once the charge is known
                self.priced_usage = json.loads(event.data)
                return b""
            plain = json.loads(event.data)  # cost on a content chunk (not OpenRouter's way): not ours to show
            plain["usage"].pop("cost", None)
            plain["usage"].pop("cost_details", None)
        else:
            # The client did not ask for usage: drop the usage-only chunk (clients that index
            # choices[0] break on it), or just the usage key when it rode on a content chunk.
            if usage_only:
                return b""
            plain = json.loads(event.data)
            plain.pop("usage", None)
        return b"data: " + json.dumps(plain, separators=(",", ":")).encode() + b"\n\n"

    async def insufficient_funds(self, funds: Funds, payload: dict) -> None:
        if settings.REFUSAL_MODE != "assistant_message":
            return await super().insufficient_funds(funds, payload)
        text = (
            f"Your Tokentill balance (${format_usd(funds.balance)}) is too low for this request, which needs "
            f"${format_usd(funds.needed)}. Top up at {settings.APP_URL}/topup and try again."
        )
        await self.send_assistant_message(payload, text, "insufficient_funds", self.trailer(0, funds.balance))

    async def unauthenticated(self, failure: AuthFailed, payload: dict | None) -> None:
        """A credential that expired or was revoked, in assistant-message mode: a reply the app can
        show, asking the user to sign in again. Anything else (no credential, not one of ours, a
        body we could not read) stays a 401: there is no one to answer in words."""
        if settings.REFUSAL_MODE != "assistant_message" or not failure.signed_out or payload is None:
            return await super().unauthenticated(failure, payload)
        text = (
            f"Your sign-in has expired or was ended ({failure.reason}). "
            f"Please sign in again at {settings.APP_URL}/login and try again."
        )
        # No ": tokentill" line: nobody is signed in, so there is no balance to tell.
        await self.send_assistant_message(payload, text, "unauthenticated", b"data: [DONE]\n\n")

    async def send_assistant_message(self, payload: dict, text: str, blocked_reason: str, tail: bytes) -> None:
        """A refusal as an ordinary completion (streamed if the request asked), marked by
        ``X-Tokentill-Blocked``, for apps that render replies and nothing else. Nothing is charged."""
        ident, model, created = f"chatcmpl-{self.request_id}", payload["model"], int(time.time())
        blocked = [("x-tokentill-blocked", blocked_reason)]
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        if payload.get("stream") is not True:
            completion = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            }
            return await self.send_json(200, completion, blocked)
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
        chunks = [
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        if self.client_wants_usage(payload):
            chunks.append({**base, "choices": [], "usage": usage})
        body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + tail
        await self.start(200, [("content-type", "text/event-stream"), ("cache-control", "no-cache"), *blocked])
        await self.send_body(body)


class EmbeddingsConsumer(ProxyConsumer):
    endpoint = "embeddings"

    def parse(self, body: bytes) -> dict:
        payload = super().parse(body)
        value = payload.get("input")
        if value in (None, "", []) or not isinstance(value, (str, list)):
            raise Refusal(400, "`input` must be a string or a non-empty array.", code="invalid_request", param="input")
        if payload.get("stream"):
            raise Refusal(400, "Embeddings cannot be streamed.", code="invalid_request", param="stream")
        return payload

    async def relay(self, begun: Begun, payload: dict, outcome: Outcome):
        body = upstream.embeddings_body(payload, user_id=begun.meta.user.pk)
        return await self.relay_whole(begun, body, outcome, "embeddings")
