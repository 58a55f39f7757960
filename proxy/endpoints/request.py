"""One metered request's lifecycle, whatever its protocol: authenticate, admit (guardrails and the
hold), forward, settle, answer.

* Admission runs to its end even if the client leaves meanwhile (a half-taken hold is worse than
  a finished one, which is then released); relaying may be cancelled by a disconnect (which
  closes the upstream response, and so cancels the generation); the settlement runs in a task of
  its own, shielded, so the client leaving cannot interrupt it. (A forced shutdown can:
  ``reconcile_holds`` then settles the hold left behind.)
* Few tasks: under load every task is another wait behind everything else ready on the event
  loop. The request runs in the ASGI server's own task, with the disconnect listener beside it,
  the settlement's task, and — only for a request still running after a second — a progress write.
* The request is settled *before* the client is told its charge, so the ``: tokentill`` line and
  the ``X-Tokentill-*`` headers always describe committed money.
* No channel layer: these endpoints never join a group, and opening a layer channel per request
  would cost a Redis round trip on every call.
* Failover: the request goes to the model's first candidate upstream whose circuit breaker lets
  it (``proxy.routing``); when that attempt fails *before any output* — connection failure,
  timeout, a 5xx answer, a stream that never sent a byte — the relay runs again with the next
  candidate, under the same hold, and the one settlement prices the upstream that answered. The
  relay reports such a failure through ``failed``/``rejected``/``timed_out_or_unreachable``,
  which is how this module knows, without knowing the protocol, that nothing reached the client.
  A 4xx answer is the client's to see, and once a byte has been relayed there is no going back.

An ``Endpoint`` (``openai.py``, ``responses.py``, ``anthropic.py``) knows its protocol: how to
validate a body, where the credential is, how to relay the upstream's answer, how to render a
refusal. This module knows none of that.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable

import django.db
import httpx
import psycopg
from django.conf import settings
from psycopg_pool import PoolTimeout

from accounts.auth import AuthFailed, aauthenticate_bearer, bearer_from_header
from core.openai_errors import OpenAIError
from core.usage import StreamMeter
from infra import adb

from .. import limits, org_billing, routing
from ..demo import DemoResponse
from ..models import UsageStatus
from ..selectors import Route
from ..services import (
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
from . import refusals
from .asgi import BodyTooLarge, ClientGone, Exchange
from .validation import Invalid, Parsed

log = logging.getLogger(__name__)

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

# What a relay returns: how to answer the client once the request is settled.
Finish = Callable[..., Awaitable[None]]


@dataclasses.dataclass
class Failure:
    """An attempt that failed before any output, as the relay reported it: the next candidate
    upstream may be tried."""

    counts: bool = True  # against the upstream's circuit breaker? (Not when it was only busy.)


class Endpoint(abc.ABC):
    """One protocol's half of a metered request. Subclasses set ``name`` (the usage record's
    ``endpoint``) and implement ``parse`` and ``relay``."""

    name = ""

    @abc.abstractmethod
    def parse(self, body: bytes) -> Parsed:
        """The request's body read and checked; raises ``Invalid`` for what the protocol refuses."""

    def credential(self, headers: dict[str, str]) -> str | None:
        """The API key or access token the client sent (``Authorization: Bearer``)."""
        return bearer_from_header(headers.get("authorization"))

    @abc.abstractmethod
    async def relay(self, request: ProxyRequest, begun: Begun, parsed: Parsed, outcome: Outcome) -> Finish:
        """Forward the request and relay the answer; return what to send once it is settled."""

    async def send_error(self, request: ProxyRequest, error: OpenAIError) -> None:
        await request.exchange.send_json(error.status, error.body(), _error_headers(error))

    async def insufficient_funds(self, request: ProxyRequest, funds: Funds, parsed: Parsed) -> None:
        await self.send_error(request, refusals.insufficient_funds(funds))

    async def unauthenticated(self, request: ProxyRequest, failure: AuthFailed, parsed: Parsed | None) -> None:
        await self.send_error(request, Refusal(401, failure.reason, code="invalid_api_key"))


def _error_headers(error: OpenAIError) -> list[tuple[str, str]]:
    return [("retry-after", str(error.retry_after))] if error.retry_after is not None else []


FALLBACK_HEADER = "X-Tokentill-Fallback"


class InvalidFallbackHeader(ValueError):
    pass


def fallback_ask_parse(headers: dict[str, str]) -> bool | None:
    """``X-Tokentill-Fallback``: ``allow`` (True), ``deny`` (False), absent (None)."""
    value = headers.get(FALLBACK_HEADER.lower())
    if value is None:
        return None
    value = value.strip().lower()
    if value not in ("allow", "deny"):
        raise InvalidFallbackHeader(f"{FALLBACK_HEADER} must be `allow` or `deny`.")
    return value == "allow"


def fallback_allowed(asked: bool | None, api_key) -> bool:
    """The request's own word, else its key's ``allow_fallback`` limit (off by default)."""
    if asked is not None:
        return asked
    return bool(api_key is not None and (api_key.limits or {}).get("allow_fallback"))


class MeteredApplication:
    """The ASGI application serving one ``Endpoint`` (routed in ``config/routing.py``)."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint

    async def __call__(self, scope, receive, send) -> None:
        exchange = Exchange(scope, receive, send, request_id=f"req_{uuid.uuid4().hex}")
        await ProxyRequest(self.endpoint, exchange).serve()


def ms_since(start: float) -> int:
    return int((time.monotonic() - start) * 1000)


class ProxyRequest:
    def __init__(self, endpoint: Endpoint, exchange: Exchange):
        self.endpoint, self.exchange = endpoint, exchange
        self.request_id = exchange.request_id
        self.started = time.monotonic()
        self.forwarded = False  # has the request been sent upstream?
        self.begun: Begun | None = None
        self.meter: StreamMeter | None = None  # what a stream has relayed so far (for progress writes)
        self.progress_timer: asyncio.TimerHandle | None = None
        self.progress: asyncio.Future | None = None
        self.settling = False
        self.settlement_unawaited = False
        self.run_ask = limits.RunAsk()  # the request's own run limits, once its headers are read
        self.fallback_ask: bool | None = None  # X-Tokentill-Fallback: allow (True), deny (False)
        self.route: Route | None = None  # the candidate being tried
        self.failure: Failure | None = None  # set when the current attempt failed before any output

    # --- entry ---------------------------------------------------------------------------------

    async def serve(self) -> None:
        exchange = self.exchange
        if exchange.method != "POST":
            message = f"{exchange.method} is not allowed here; send POST."
            error = Refusal(405, message, code="method_not_allowed")
            return await exchange.send_json(405, error.body(), [("allow", "POST")])
        try:
            body = await exchange.read_body(settings.PROXY_MAX_BODY_BYTES)
        except ClientGone:
            return
        except BodyTooLarge:
            return await self.refuse_early(413, f"Request body is larger than {settings.PROXY_MAX_BODY_BYTES} bytes.")
        exchange.listen_for_disconnect()
        try:
            await self.handle(body)
        except asyncio.CancelledError:
            if not exchange.disconnected:
                raise  # not ours: the server is shutting down
            asyncio.current_task().uncancel()  # ours, for a client that left: handled
        finally:
            exchange.stop_listening()

    async def refuse_early(self, status: int, message: str) -> None:
        """Refused before the body was read (413): recorded for a known user, then answered."""
        try:
            principal = await self.authenticate()
            if principal is None:
                return
            await ausage_refused(meta=self.meta(principal, model=""), http_status=status, error=message)
        except DATABASE_UNAVAILABLE:  # the refusal still stands; it just goes unrecorded
            log.exception("proxy request %s: could not record its refusal", self.request_id)
        await self.endpoint.send_error(self, Refusal(status, message, code="request_too_large"))

    async def authenticate(self):
        token = self.endpoint.credential(self.exchange.headers)
        try:
            return await aauthenticate_bearer(token)
        except AuthFailed as exc:
            await self.endpoint.send_error(self, Refusal(401, exc.reason, code="invalid_api_key"))
            return None

    def meta(self, principal, *, model: str, stream: bool = False) -> RequestMeta:
        headers = self.exchange.headers
        return RequestMeta(
            request_id=self.request_id,
            user=principal.user,
            api_key=principal.api_key,
            endpoint=self.endpoint.name,
            model=model,
            stream=stream,
            run=headers.get("x-tokentill-run", "")[: limits.MAX_RUN_ID],
            agent=headers.get("x-tokentill-agent", "")[:200],
            tool=headers.get("x-tokentill-tool", "")[:200],
            run_max_steps=self.run_ask.max_steps,
            run_max_spend=self.run_ask.max_spend,
            fallback_allowed=fallback_allowed(self.fallback_ask, principal.api_key),
            unchanged=principal.unchanged,
        )

    async def handle(self, body: bytes) -> None:
        try:
            await self.run(body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("proxy request %s failed", self.request_id)
            if self.exchange.response_started:
                return
            # Before forwarding nothing is held or charged; after it, a hold the settlement could
            # not close is charged by reconcile_holds from its record.
            after = " It will be reconciled from its usage record." if self.forwarded else " Nothing was charged."
            if isinstance(exc, DATABASE_UNAVAILABLE):
                message = "The billing database is unavailable or busy; retry shortly." + after
                error = OpenAIError(503, message, "server_error", "service_unavailable", retry_after=1)
            else:
                error = OpenAIError(500, "Internal error." + after, "server_error", "internal_error")
            await self.endpoint.send_error(self, error)

    async def run(self, body: bytes) -> None:
        parsed, invalid = None, None
        try:
            parsed = self.endpoint.parse(body)
            self.run_ask = limits.run_ask_parse(self.exchange.headers)
            self.fallback_ask = fallback_ask_parse(self.exchange.headers)
        except Invalid as refused:
            parsed, invalid = None, refused
        except limits.InvalidRunHeader as exc:
            refusal = Refusal(400, exc.message, code="invalid_request", param=exc.header)
            parsed, invalid = None, Invalid(refusal, parsed.model)
        except InvalidFallbackHeader as exc:
            refusal = Refusal(400, str(exc), code="invalid_request", param=FALLBACK_HEADER)
            parsed, invalid = None, Invalid(refusal, parsed.model)
        try:
            # Not cancellable: a half-taken hold is worse than a finished one, which abandon()
            # frees if the client has left meanwhile.
            begun = await self.admit(parsed, invalid)
        except AuthFailed as exc:
            return await self.endpoint.unauthenticated(self, exc, parsed)
        except Funds as funds:
            return await self.endpoint.insufficient_funds(self, funds, parsed)
        except Refusal as refusal:
            return await self.endpoint.send_error(self, refusal)
        if self.exchange.disconnected:
            return await self.abandon(begun)
        await self.forward(begun, parsed)

    # --- admission -----------------------------------------------------------------------------

    async def admit(self, parsed: Parsed | None, invalid: Invalid | None) -> Begun:
        """Authenticate, then record a refusal or take the hold.

        The principal may come from a recent lookup; the first write checks it is still current
        (``accounts.auth``), and when it is not, admission starts again from a fresh lookup (so a
        key's rpm counter can count such a request twice). Raises ``AuthFailed`` (no record: there
        is no user), ``Refusal`` or ``Funds``.
        """
        token = self.endpoint.credential(self.exchange.headers)
        for attempt in range(ADMIT_ATTEMPTS):
            principal = await aauthenticate_bearer(token, cached=attempt == 0)
            try:
                return await self.admit_as(principal, parsed, invalid)
            except adb.ConditionFailed:
                if attempt == ADMIT_ATTEMPTS - 1:
                    raise

    async def admit_as(self, principal, parsed: Parsed | None, invalid: Invalid | None) -> Begun:
        if parsed is None:
            meta = self.meta(principal, model=invalid.model)
            refusal = invalid.refusal
        else:
            meta = self.meta(principal, model=parsed.model, stream=parsed.stream)
            refusal = None
        if not principal.has_scope("proxy"):
            refusal = Refusal(403, "This API key lacks the `proxy` scope.", "permission_error", "insufficient_scope")
        if refusal is None:
            try:  # which wallet pays: the user's, or an organization's (X-Tokentill-Org, its keys)
                meta = await org_billing.abilling_for(meta, principal, self.exchange.headers)
            except Refusal as refused:
                refusal = refused
        if refusal is not None:
            await ausage_refused(meta=meta, http_status=refusal.status, error=refusal.message)
            raise refusal
        return await arequest_begin(
            meta=meta,
            fallback_models=parsed.fallback_models,
            prompt_chars=parsed.prompt_chars,
            requested_output=parsed.requested_output,
            choices=parsed.choices,
            media=parsed.media,
        )

    async def abandon(self, begun: Begun) -> None:
        """The client left before anything was forwarded: release the hold."""
        outcome = Outcome(status=UsageStatus.CANCELLED, billable=False, error="client disconnected")
        await arequest_settle(begun=begun, outcome=outcome)

    # --- forwarding and settlement ---------------------------------------------------------------

    @property
    def upstream(self):
        """The ``UpstreamConfig`` of the candidate being tried (for relays whose request body or
        protocol depends on the upstream's kind)."""
        return self.route.upstream

    def upstream_secrets(self) -> tuple[str, ...]:
        """Keys an upstream's error text must never relay: the one it was called with, and the
        default upstream's."""
        called = self.route.upstream.api_key if self.route is not None else ""
        return tuple(key for key in (called, settings.UPSTREAM_API_KEY) if key)

    async def open_upstream(self, begun: Begun, body: dict, path: str):
        """The current candidate's answer to ``body`` (an async context manager), or the demo
        model's."""
        if body.get("model") != begun.served_model:
            # The model staff routed it to (alias, agent route, fallback). Served by the fallback,
            # the client's own ``models`` list goes too: one hop, and never a dearer model.
            body = {**body, "model": begun.served_model}
            if begun.fell_back:
                body.pop("models", None)
        if self.route.is_demo:
            return DemoResponse(body, begun.rates, prompt_chars=len(json.dumps(body.get("messages", ""))))
        return routing.opened(self.route.upstream, path, json.dumps(body).encode())

    async def forward(self, begun: Begun, parsed: Parsed) -> None:
        outcome = Outcome()
        self.begun = begun
        finish = None
        try:
            self.forwarded = True
            self.schedule_progress(begun, outcome, PROGRESS_AFTER)
            self.exchange.cancellable = True
            finish = await self.relay_with_failover(begun, parsed, outcome)
        except asyncio.CancelledError:
            outcome.status = UsageStatus.CANCELLED
            outcome.error = "client disconnected"
            raise
        except Exception as exc:
            # A bug of ours mid-relay: still settle what the upstream did, marked as an error.
            outcome.status, outcome.error = UsageStatus.UPSTREAM_ERROR, f"proxy error: {type(exc).__name__}"
            raise
        finally:
            self.exchange.cancellable = False
            outcome.latency_ms = ms_since(self.started)
            settling = asyncio.ensure_future(self.settle(begun, outcome))
            settling.add_done_callback(self._settled)
            # Shielded: a second cancellation (server shutdown) must not lose the settlement.
            try:
                record = await asyncio.shield(settling)
            except asyncio.CancelledError:
                self.settlement_unawaited = True
                raise
        await finish(record, begun)

    async def relay_with_failover(self, begun: Begun, parsed: Parsed, outcome: Outcome) -> Finish:
        """Relay through the first candidate whose breaker allows it; after a failure before any
        output, through the next. The outcome is the last attempt's, its error prefixed with
        what the earlier ones failed with ("failed over from …")."""
        finish, skipped, failed_over = None, [], []
        earlier = None  # the previous attempt's failure, noted once another attempt follows it
        for route in begun.routes:
            permit = routing.admit(route)
            if permit is None:
                skipped.append(route)  # its breaker is open: not even tried
                continue
            if earlier is not None:
                failed_over.append(earlier)
            self.start_attempt(route, outcome)
            try:
                finish = await self.endpoint.relay(self, begun, parsed, outcome)
            except BaseException:  # cancelled (the client left), or a bug of ours
                routing.report(route, permit, failed=None)
                raise
            failure = self.failure
            if failure is None:
                routing.report(route, permit, failed=False)
            else:  # (busy says nothing about its health: no verdict)
                routing.report(route, permit, failed=True if failure.counts else None)
            if failure is None or self.exchange.response_started:
                break
            detail = outcome.error or "failed"
            log.warning(
                "proxy request %s: upstream %s failed before any output: %s", self.request_id, route.name, detail
            )
            earlier = f"{route.name}: {detail}"
        if finish is None:
            return self.unavailable(outcome, skipped)
        if failed_over:
            notes = "; ".join(failed_over)
            outcome.error = f"failed over from {notes}" + (f"; then {outcome.error}" if outcome.error else "")
        return finish

    def start_attempt(self, route: Route, outcome: Outcome) -> None:
        """A fresh outcome for the next candidate (the earlier attempt cost nothing)."""
        self.route, self.failure, self.meter = route, None, None
        fresh = Outcome(
            trust_upstream_cost=route.upstream.is_openrouter and not route.is_demo,
            upstream=route.name,
            price=route.price,
        )
        for each in dataclasses.fields(Outcome):
            setattr(outcome, each.name, getattr(fresh, each.name))

    def unavailable(self, outcome: Outcome, skipped: list[Route]) -> Finish:
        """Every candidate's breaker is open: fail fast, nothing charged, and say when to retry."""
        names = ", ".join(route.name for route in skipped)
        retry_after = max(1, math.ceil(routing.retry_in(skipped)))
        error = refusals.upstream_unavailable(retry_after)
        return self._fail(outcome, error, f"upstream unavailable: circuit open ({names})")

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

    # --- progress writes (crash safety for requests that run a while) ----------------------------

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
                upstream=outcome.upstream,
                price=outcome.price,
            )
        except Exception:  # the request goes on; the next write tries again
            log.warning("proxy request %s: could not write its progress", self.request_id, exc_info=True)
        self.schedule_progress(begun, outcome, max(min(settings.HOLD_TTL / 3, PROGRESS_EVERY), 1.0))

    # --- outcomes a relay reports ----------------------------------------------------------------

    def copy_meter(self, meter: StreamMeter, outcome: Outcome) -> None:
        outcome.usage = meter.usage
        outcome.upstream_model = meter.model
        outcome.generation_id = outcome.generation_id or meter.id
        outcome.finish_reason = meter.finish_reason
        outcome.output_chars = meter.output_chars
        if meter.error:
            outcome.error = meter.error

    def _fail(self, outcome: Outcome, error: OpenAIError, detail: str) -> Finish:
        """Nothing is charged; answer ``error`` once settled."""
        outcome.status, outcome.error, outcome.http_status = UsageStatus.UPSTREAM_ERROR, detail, error.status
        outcome.billable = False

        async def finish(record, begun):
            await self.endpoint.send_error(self, error)

        return finish

    def failed(self, outcome: Outcome, status: int, message: str) -> Finish:
        """The upstream failed before any output: nothing is charged; answer 502/504 once settled
        — unless another candidate upstream serves it instead."""
        self.failure = Failure()
        return self._fail(outcome, refusals.upstream_failed(status, message), message)

    def refused(self, outcome: Outcome, error: OpenAIError) -> Finish:
        """Refused after admission, before anything was forwarded (a body only the upstream chosen
        for it cannot take): nothing is charged; answer ``error`` once the hold is released."""
        outcome.status, outcome.error, outcome.http_status = UsageStatus.REFUSED, error.message[:500], error.status
        outcome.billable = False

        async def finish(record, begun):
            await self.endpoint.send_error(self, error)

        return finish

    def rejected(self, outcome: Outcome, upstream_status: int, raw: bytes, headers) -> Finish:
        """An upstream error answer before any output: nothing is charged. A 5xx is the
        upstream's failure (the next candidate is tried); a 4xx is the client's answer."""
        if upstream_status >= 500:
            self.failure = Failure()
        error, detail = refusals.upstream_rejected(
            upstream_status, raw, headers, request_id=self.request_id, secrets=self.upstream_secrets()
        )
        return self._fail(outcome, error, detail)

    def timed_out_or_unreachable(self, outcome: Outcome, exc: httpx.HTTPError) -> Finish:
        if isinstance(exc, routing.UpstreamBusy):
            finish = self._fail(outcome, refusals.upstream_busy(), str(exc))
            self.failure = Failure(counts=False)
            return finish
        if isinstance(exc, httpx.TimeoutException):
            return self.failed(outcome, 504, "The upstream model timed out.")
        return self.failed(outcome, 502, f"The upstream model is unreachable ({type(exc).__name__}).")
