"""State changes for proxied requests: begin (guardrails, price, hold, pending record), settle
(charge + record in one transaction), and the record of a refused request.

Every request a known user makes leaves one ``UsageRecord``: refused ones with status
``refused`` and no charge, the rest ``pending`` until ``arequest_settle`` closes them.

The request services are async: the metered endpoints call them from the event loop. On PostgreSQL their
statements run right there on the hot path's async connections (``infra.adb``); elsewhere each
step is the ORM in a worker thread. Statement budget on PostgreSQL (pinned by tests): begin = ONE
statement, the hold with its pending record (the wallet comes joined to the authenticated user,
and the hold is taken only while the principal is unchanged: ``RequestMeta.unchanged``);
settle = ONE statement, the record UPDATE with the hold's settlement. The model's routes (which
upstreams serve it, at what price) come from the per-process cache in ``selectors``; the
guardrail counters, when a key or run has any, from Django's cache in a worker thread.

A model served by several upstreams is held for its *dearest* candidate and settled at the price
of the one that actually served it, so failing over from one to the next never settles above
the hold (for the same usage) and never charges twice: one hold, one settlement, whatever the
number of attempts (``proxy.endpoints.request``).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.utils import timezone

from accounts.models import ApiKey, User
from core.media import Media, prompt_tokens_held
from core.money import usd_to_nanos
from core.openai_errors import OpenAIError
from core.pricing import Rates, affordable_output, charge_nanos, cost_usd, hold_nanos
from core.usage import Usage, estimate_tokens
from infra import adb
from orgs.models import Membership, Organization
from wallet.models import Hold, Wallet
from wallet.services import (
    InsufficientFunds,
    ahold_create,
    ahold_extend,
    ahold_release,
    ahold_settle,
    wallet_get_or_create,
)

from . import limits, org_billing
from .models import CostSource, ModelPrice, UsageRecord, UsageStatus
from .selectors import (
    Choice,
    Route,
    Tiers,
    allowance_for,
    choice_of,
    model_servable,
    overrun_cap_for,
    price_current,
    rates_for,
    routes_cached,
    routes_current,
    tiers_cached,
    tiers_current,
)

log = logging.getLogger(__name__)

# The endpoints the built-in demo model answers: it speaks chat completions, which the Responses
# and Messages endpoints translate to.
DEMO_ENDPOINTS = ("chat.completions", "responses", "messages")
MAX_HOLD = 2**62  # nanodollars (~4.6 billion USD): well inside the 64-bit columns holds are kept in


# A request stopped before the upstream, rendered as an OpenAI-shaped error. (A guardrail's
# ``limits.LimitExceeded`` is one too.)
Refusal = OpenAIError


@dataclass
class Funds(Exception):
    """Refused for insufficient funds (402, or the assistant-message refusal)."""

    balance: int  # nanodollars
    available: int  # nanodollars
    needed: int  # nanodollars


@dataclass
class RequestMeta:
    request_id: str
    user: User
    api_key: ApiKey | None
    endpoint: str  # "chat.completions" | "embeddings" | "responses" | "messages"
    model: str = ""
    stream: bool = False
    run: str = ""
    agent: str = ""
    tool: str = ""
    # The request's own run limits (X-Tokentill-Run-Max-Steps/-Spend; 0 = none): the key's and the
    # operator's still apply, and the tightest wins (proxy.limits).
    run_max_steps: int = 0
    run_max_spend: int = 0  # nanodollars
    # May a wallet that cannot afford the model (or is under its threshold) be served by the
    # model's fallback? (The key's ``allow_fallback``, or ``X-Tokentill-Fallback``.)
    fallback_allowed: bool = False
    # The principal's ``unchanged`` condition (``accounts.auth``): the request's first write — its
    # hold, or its refusal's record — happens only while it is true, else ``adb.ConditionFailed``.
    unchanged: tuple[str, dict] | None = None
    # Billed to an organization (``proxy.org_billing``): it, its wallet, and the membership whose
    # limits apply (None for the organization's own key). None: the user's own wallet.
    organization: Organization | None = None
    wallet: Wallet | None = None
    membership: Membership | None = None


@dataclass
class Begun:
    meta: RequestMeta
    wallet: Wallet
    hold: Hold
    record: UsageRecord
    price: ModelPrice
    rates: Rates
    prompt_tokens: int  # estimate, from the request size
    max_output: int  # output tokens per choice, the cap sent upstream
    clamped_to: int | None  # set when the output cap was lowered to what the balance affords
    reservation: limits.Reservation
    models: list[str] = field(default_factory=list)  # the model served, then the client's ``models``
    routes: list[Route] = field(default_factory=list)  # the model's candidates, first choice first
    served_model: str = ""  # the price-table model sent upstream (after alias, agent and fallback)
    fell_back: bool = False  # served by the fallback because the wallet ran low


@dataclass
class Outcome:
    status: str = UsageStatus.OK
    usage: Usage | None = None
    trust_upstream_cost: bool = False  # OpenRouter's usage.cost is what it charged us
    upstream_model: str = ""
    generation_id: str = ""
    finish_reason: str = ""
    error: str = ""
    http_status: int | None = None
    output_chars: int = 0
    # Does the upstream's work cost money? False when the request never reached it, or it
    # refused or failed before any output: the hold is released, nothing is charged.
    billable: bool = True
    latency_ms: int | None = None
    ttfb_ms: int | None = None
    upstream: str = ""  # the name of the upstream that answered (the last one tried)
    price: ModelPrice | None = None  # the model's price at that upstream (None: the held price)


def _record_of(meta: RequestMeta, choice: Choice | None = None, **fields) -> UsageRecord:
    """The (unsaved) usage record of this request: who, what, and the client's labels."""
    if choice is not None:
        fields.setdefault("alias", choice.alias[:200])
        fields.setdefault("served_model", choice.model[:200])
    # (adb.new: ``UsageRecord(...)`` without Model.__init__'s per-field walk — one per request.)
    return adb.new(
        UsageRecord,
        request_id=meta.request_id,
        user=meta.user,
        api_key=meta.api_key,
        organization=meta.organization,
        endpoint=meta.endpoint,
        model=meta.model[:200],
        stream=meta.stream,
        run=meta.run,
        agent=meta.agent,
        tool=meta.tool,
        **fields,
    )


def _refused_record(meta: RequestMeta, *, http_status: int, error: str, choice: Choice | None = None) -> UsageRecord:
    return _record_of(
        meta,
        choice,
        status=UsageStatus.REFUSED,
        http_status=http_status,
        error=error[:500],
        cost_source=CostSource.NONE,
        settled_at=timezone.now(),
    )


async def _arecord(record: UsageRecord, only_if: tuple[str, dict] | None = None) -> UsageRecord:
    """Insert a usage record: on the event loop on PostgreSQL, else through the ORM in a thread.
    ``only_if`` (PostgreSQL): a condition the insert happens under, else ``adb.ConditionFailed``."""
    if not adb.native():
        await adb.in_thread(record.save)(force_insert=True)
        return record
    if only_if is None:
        row = await adb.fetchone(*adb.insert_statement(record))
    else:
        insert, params = adb.insert_statement(record, source="ok")
        row = await adb.fetchone(f"WITH ok AS (SELECT 1 WHERE {only_if[0]}) {insert}", {**params, **only_if[1]})
    if row is None:  # only with a condition: a plain insert answers its row
        raise adb.ConditionFailed("the record's condition was false")
    adb.saved(record, row[0])
    return record


async def ausage_refused(
    *, meta: RequestMeta, http_status: int, error: str, choice: Choice | None = None
) -> UsageRecord:
    """Record a request refused before it reached the upstream (nothing charged)."""
    record = _refused_record(meta, http_status=http_status, error=error, choice=choice)
    return await _arecord(record, meta.unchanged)


def tokens_count_admit(*, principal, model: str, now: datetime | None = None) -> None:
    """May this principal have ``model``'s input counted (``POST /v1/messages/count_tokens``)?
    Raises ``Refusal``. Counting is free — no hold, no usage record — and so rate-limited."""
    if not principal.has_scope("proxy"):
        raise Refusal(403, "This API key lacks the `proxy` scope.", "permission_error", "insufficient_scope")
    if not model_servable(price_current(model_resolve(model))):
        raise Refusal(400, f"The model `{model}` does not exist.", code="model_not_found")
    limits.check_count_tokens(api_key=principal.api_key, user=principal.user, now=now or timezone.now())


def model_resolve(model: str) -> str:
    """The price-table model an alias names (a model names itself). A cached lookup."""
    return choice_of(tiers_current(), model=model).model


@dataclass
class Priced:
    """What serving the request by one model will be held for."""

    model: str  # the price-table model sent upstream
    price: ModelPrice  # the dearest candidate's: what the hold is priced at
    rates: Rates
    prompt_tokens: int  # estimate, from the request size and its non-text parts at that price
    max_output: int  # output tokens per choice: the cap sent upstream
    amount: int  # nanodollars to hold
    routes: list[Route]  # the model's candidates, first choice first
    overrun_cap: int  # nanodollars the settlement may take above the hold (that price's)
    models: list[str]  # the model, then the client's ``models`` list (billing may name any)

    def tokens_held(self, choices: int) -> int:
        """The tokens the hold assumes: counted against token limits while it is in flight."""
        return self.prompt_tokens + self.max_output * choices


@dataclass
class Plan:
    """What a request will be held for, decided before any money moves."""

    choice: Choice
    served: Priced
    fallback: Priced | None  # when the request may fall back and the model has a fallback on sale
    choices: int  # the request's ``n``
    reservation: limits.Reservation


def request_plan(
    *,
    meta: RequestMeta,
    fallback_models: list[str] | None = None,
    prompt_chars: int,
    requested_output: int | None,
    choices: int = 1,
    now: datetime,
    routes: list[list[Route]] | None = None,
    media: Media | None = None,
    tiers: Tiers | None = None,
    counters: bool = True,
    subjects: list | None = None,
) -> Plan:
    """Check the guardrails and price the request, or raise ``Refusal`` (not yet recorded).

    The order is the cheap-to-expensive one: model and key rules and the price (no writes), rate
    and run-step counters (cache), spend caps (cache reservation). What the request asked for is
    resolved first (``selectors.choice_of``: agent route, alias, fallback). ``routes`` are those
    of ``_models_of(choice, …)`` when the caller already has them (see ``arequest_begin``), else
    they are looked up, stopping at the first unknown one.

    The hold is the most the request can cost: the prompt estimate plus ``choices`` × the output
    cap (the client's ``max_tokens``, else the model's default — which is then sent upstream),
    at the dearest price any candidate upstream (or listed fallback model) could bill. The
    prompt estimate counts the body's non-text parts (``media``) at that price's allowances
    (``core.media``); what the upstream bills beyond the hold is still charged up to the price's
    overrun cap (``wallet.models.settlement_charge``). The fallback, when the request may take
    it, is priced the same way on its own routes (one hop: the client's ``models`` are not
    offered with it); the spend caps reserve the model's amount. ``counters=False``: the caller
    has found that no counter applies to this request (see ``_aplan``), so none is checked.
    ``subjects``: the key's and the user's limits (``limits.subjects_of``) when the caller has
    worked them out already; each counter check below is handed the same ones.
    """
    choice = choice_of(tiers or tiers_current(), model=meta.model, agent=meta.agent)
    models = _models_of(choice, meta, fallback_models)
    found: list[list[Route]] = []
    for index, model in enumerate(models):
        candidates = routes[index] if routes is not None else routes_current(model)
        named = choice.asked if index == 0 else model
        if not candidates:
            if named != model:  # an alias (or an agent's) whose model is no longer sold
                raise Refusal(
                    400, f"The model `{named}` (served by `{model}`) is not available.", code="model_not_found"
                )
            raise Refusal(400, f"The model `{model}` does not exist.", code="model_not_found")
        if any(route.is_demo for route in candidates) and meta.endpoint not in DEMO_ENDPOINTS:
            raise Refusal(400, f"The demo model `{named}` only answers chat completions.", code="model_not_found")
        found.append(candidates)
    allowed = (meta.api_key.limits or {}).get("allowed_models") if meta.api_key is not None else None
    if allowed is not None:
        # The name the request is routed by (an alias, not the model behind it, so staff may
        # switch that model), and the client's own fallbacks.
        for model in [choice.asked, *models[1 : fallback_count(choice, meta, models)]]:
            if model not in allowed:
                raise Refusal(
                    403, f"This API key may not use the model `{model}`.", "permission_error", "model_not_allowed"
                )
    org_billing.check_model(meta.membership, models)
    media = media or Media()
    primary_models = models[: fallback_count(choice, meta, models)]
    served = _priced(primary_models, found[: len(primary_models)], prompt_chars, requested_output, choices, media)
    fallback = None
    if len(primary_models) < len(models):
        fallback = _priced(models[-1:], found[-1:], prompt_chars, requested_output, choices, media)

    if served.amount > MAX_HOLD:
        raise Refusal(400, "This request could cost more than any wallet can hold; ask for less output.")
    if not counters:
        # The caller found that no counter applies (``limits.uses_counters`` and
        # ``member_uses_counters`` false): every check below would pass and move nothing, and the
        # reservation would hold only the amount and the tokens. Most requests are such.
        reservation = limits.Reservation(amount=served.amount, tokens=served.tokens_held(choices))
        return Plan(choice, served, fallback, choices, reservation)
    user = meta.user
    if subjects is None:
        subjects = limits.subjects_of(meta.api_key, user)
    limits.check_rpm(api_key=meta.api_key, now=now, user=user, subjects=subjects)
    parallel = limits.acquire_parallel(api_key=meta.api_key, user=user, subjects=subjects)
    try:
        step = limits.check_run_steps(
            run=meta.run, user_id=user.pk, api_key=meta.api_key, run_max_steps=meta.run_max_steps
        )
    except limits.LimitExceeded:
        limits.release(limits.Reservation(parallel_keys=parallel))
        raise
    try:
        reservation = limits.reserve_spend(
            api_key=meta.api_key,
            run=meta.run,
            user_id=user.pk,
            amount=served.amount,
            now=now,
            run_max_spend=meta.run_max_spend,
            user=user,
            subjects=subjects,
        )
    except limits.LimitExceeded:
        # A request that does not happen is no step, and holds no slot.
        limits.release(limits.Reservation(step_key=step, parallel_keys=parallel))
        raise
    reservation.step_key, reservation.parallel_keys = step, parallel
    try:
        limits.reserve_tokens(
            reservation, api_key=meta.api_key, user=user, tokens=served.tokens_held(choices), now=now, subjects=subjects
        )
    except limits.LimitExceeded:
        limits.release(reservation)
        raise
    # The member's own limits in the organization, on the same reservation (released with it).
    limits.reserve_member_spend(
        reservation, membership=meta.membership, amount=served.amount, now=now, api_key=meta.api_key, run=meta.run
    )
    return Plan(choice, served, fallback, choices, reservation)


def _priced(
    models: list[str],
    found: list[list[Route]],
    prompt_chars: int,
    requested_output: int | None,
    choices: int,
    media: Media,
) -> Priced:
    def held(price: ModelPrice) -> tuple[int, Rates, int]:
        """What a hold at ``price`` is: its amount, the rates and the prompt estimate (each
        worked out once per candidate: this runs on every request)."""
        rates = rates_for(price)
        prompt_tokens = prompt_tokens_held(prompt_chars, media, allowance_for(price))
        output = (requested_output or price.default_max_output) * choices
        return hold_nanos(rates, prompt_tokens=prompt_tokens, max_output=output), rates, prompt_tokens

    # Any candidate upstream may end up serving it (failover), and with fallbacks any listed
    # model may answer: reserve for the dearest. (On a tie, the first choice's price.)
    candidates = [(route.price, held(route.price)) for routes in found for route in routes]
    price, (amount, rates, prompt_tokens) = max(candidates, key=lambda candidate: candidate[1][0])
    return Priced(
        model=models[0],
        price=price,
        rates=rates,
        prompt_tokens=prompt_tokens,
        max_output=requested_output or price.default_max_output,
        amount=amount,
        routes=found[0],
        overrun_cap=overrun_cap_for(price),
        models=models,
    )


def _models_of(choice: Choice, meta: RequestMeta, fallback_models: list[str] | None) -> list[str]:
    """The models whose routes the request needs: the one that serves it, the client's own
    ``models`` list, then — when the request may take it — the fallback."""
    models = [choice.model, *(m for m in fallback_models or [] if m != choice.model)]
    if meta.fallback_allowed and choice.fallback:
        models.append(choice.fallback)
    return models


def fallback_count(choice: Choice, meta: RequestMeta, models: list[str]) -> int:
    """How many of ``models`` are the request's own (the rest is the fallback)."""
    return len(models) - 1 if meta.fallback_allowed and choice.fallback else len(models)


# Per event loop: the cache refreshes in progress (``_refreshed``), by what they read.
_refreshing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, asyncio.Future]] = (
    weakref.WeakKeyDictionary()
)


async def _refreshed(what: tuple, read: Callable[[], object]) -> None:
    """Run ``read`` (which fills a per-process cache from the database) in a worker thread, once
    however many requests find that cache stale at the same moment: the others wait for that
    read instead of each making it in a thread of its own — under load, the moment a cache
    expired used to send every request in flight to the worker threads at once."""
    loop = asyncio.get_running_loop()
    running = _refreshing.setdefault(loop, {})
    future = running.get(what)
    if future is None:
        future = running[what] = asyncio.ensure_future(adb.in_thread(read)())
        future.add_done_callback(lambda _: running.pop(what, None))
    await asyncio.shield(future)


async def _aplan(meta: RequestMeta, **kwargs) -> Plan:
    """``request_plan`` on the event loop when it needs no I/O (tiers and routes cached, no
    cache counters for this key or run); otherwise in a worker thread, where the price table
    and the cache (Redis, when configured) may be reached. Stale tiers and routes are read again
    first, once for all the requests that need them (``_refreshed``)."""
    tiers = tiers_cached()
    routes = None
    if tiers is None and settings.PROXY_PRICE_CACHE_SECONDS > 0:
        await _refreshed(("tiers",), tiers_current)
        tiers = tiers_cached()
    if tiers is not None:
        choice = choice_of(tiers, model=meta.model, agent=meta.agent)
        models = _models_of(choice, meta, kwargs.get("fallback_models"))
        routes = routes_cached(models)
        if routes is None:
            await _refreshed(("routes", *models), lambda: [routes_current(model) for model in models])
            routes = routes_cached(models)
    subjects = limits.subjects_of(meta.api_key, meta.user)  # worked out once for every check
    uses_counters = limits.uses_counters(
        api_key=meta.api_key,
        run=meta.run,
        run_max_steps=meta.run_max_steps,
        run_max_spend=meta.run_max_spend,
        user=meta.user,
        subjects=subjects,
    )
    if routes is None or uses_counters or limits.member_uses_counters(meta.membership):
        return await adb.in_thread(request_plan)(meta=meta, subjects=subjects, **kwargs)
    return request_plan(meta=meta, routes=routes, tiers=tiers, counters=False, **kwargs)


async def _wallet_of(user) -> Wallet:
    """The user's wallet, without a query when authentication already joined it in."""
    if User.wallet.is_cached(user):
        try:
            return user.wallet
        except Wallet.DoesNotExist:  # joined and absent: created below
            pass
    return await adb.in_thread(wallet_get_or_create)(user=user)


async def arequest_begin(
    *,
    meta: RequestMeta,
    fallback_models: list[str] | None = None,
    prompt_chars: int,
    requested_output: int | None,
    choices: int = 1,
    now: datetime | None = None,
    media: Media | None = None,
) -> Begun:
    """Check guardrails, price the request and reserve its cost, or raise ``Refusal``/``Funds``.

    Every outcome leaves a usage record: ``refused`` for a refusal, ``pending`` with the hold —
    written by the hold's own statement (``also_insert``), so there is never a hold without its
    record or a record of money never reserved. On PostgreSQL that is one statement (besides
    authentication, when the principal was not remembered), committing on its own, so the wallet
    row is locked for that statement only. Raises ``adb.ConditionFailed`` — nothing held or
    recorded — when ``meta.unchanged`` no longer holds: the caller authenticates again.
    """
    now = now or timezone.now()
    try:
        plan = await _aplan(
            meta,
            fallback_models=fallback_models,
            prompt_chars=prompt_chars,
            requested_output=requested_output,
            choices=choices,
            now=now,
            media=media,
        )
    except Refusal as refusal:
        await ausage_refused(meta=meta, http_status=refusal.status, error=refusal.message)
        raise
    choice, served, fallback = plan.choice, plan.served, plan.fallback
    wallet = meta.wallet if meta.wallet is not None else await _wallet_of(meta.user)
    floor = usd_to_nanos(settings.MIN_BALANCE)
    record = _record_of(
        meta,
        choice,
        status=UsageStatus.PENDING,
        # The prompt estimate, until settlement writes the upstream's count: what an expired
        # hold is charged if the request never finishes (see hold_reconcile).
        prompt_tokens=served.prompt_tokens,
        estimated=True,
        hold_amount=served.amount,
        held_tokens=served.tokens_held(choices),
        markup=served.rates.markup,
        price=served.price,
        prices=served.rates.snapshot(),
        created_at=now,
    )

    async def take(priced: Priced, amount: int, min_available: int = floor, tokens: int | None = None) -> Hold:
        # The record rides on the hold's own statement: it must describe what is held.
        record.hold_amount, record.price, record.markup = amount, priced.price, priced.rates.markup
        record.held_tokens = priced.tokens_held(choices) if tokens is None else tokens
        record.prices, record.prompt_tokens = priced.rates.snapshot(), priced.prompt_tokens
        record.served_model, record.fallback = priced.model[:200], priced is fallback
        return await ahold_create(
            wallet=wallet,
            request_id=meta.request_id,
            min_available=min_available,
            also_insert=record,
            only_if=meta.unchanged,
            overrun_cap=priced.overrun_cap,
            amount=amount,
        )

    clamped_to = None
    hold = None
    chosen, max_output, amount = served, served.max_output, served.amount
    # With a fallback at hand, the model's hold is taken only while the available balance stays
    # at the staff threshold (one conditional statement, as ever); below it, or when the hold
    # does not fit at all, the fallback's is taken instead.
    threshold = choice.fallback_below if fallback is not None else None
    try:
        try:
            hold = await take(served, amount, max(floor, threshold or 0))
        except InsufficientFunds as thin:
            if fallback is None:
                raise
            try:
                hold = await take(fallback, fallback.amount)
                chosen, max_output, amount = fallback, fallback.max_output, fallback.amount
            except InsufficientFunds:
                if thin.available < max(floor, served.amount):
                    # What a top-up must cover is the model's hold, not the threshold.
                    raise InsufficientFunds(
                        needed=max(floor, served.amount), available=thin.available, balance=thin.balance
                    ) from None
                # Only the threshold stood in the way and the fallback does not fit either
                # (a fallback with a larger output default): the model's hold after all.
                hold = await take(served, amount)
    except Exception as failed:
        if not isinstance(failed, InsufficientFunds):
            # The hold could not be taken at all (the database is away): give the spend caps
            # back what this request reserved, or they would count a request that never ran.
            await limits.arelease(plan.reservation)
            raise
        short = failed
        rates, prompt_tokens = served.rates, served.prompt_tokens
        # Cannot cover the full output cap: a shorter answer is still worth giving when the
        # balance affords a useful number of tokens (and stays above the floor).
        # (Per choice: ``n`` choices share what is affordable.)
        affordable = affordable_output(rates, prompt_tokens=prompt_tokens, available=short.available) // choices
        if short.available >= floor and settings.PROXY_MIN_OUTPUT_TOKENS <= affordable < max_output:
            clamped = hold_nanos(rates, prompt_tokens=prompt_tokens, max_output=affordable * choices)
            try:
                hold = await take(served, clamped, tokens=prompt_tokens + affordable * choices)
                clamped_to, max_output, amount = affordable, affordable, clamped
            except InsufficientFunds as again:  # a concurrent request took the money first
                short = again
            except Exception:
                await limits.arelease(plan.reservation)
                raise
        if hold is None:
            await limits.arelease(plan.reservation)
            refused = _refused_record(meta, http_status=402, error="insufficient funds", choice=choice)
            await _arecord(refused, meta.unchanged)
            # ``needed`` is the whole request's (``failed``), not a clamped retry's: what a top-up must cover.
            raise Funds(balance=short.balance, available=short.available, needed=failed.needed) from None
    await limits.aadjust(plan.reservation, amount, tokens=record.held_tokens)
    return Begun(
        meta=meta,
        wallet=wallet,
        hold=hold,
        record=record,
        price=chosen.price,
        rates=chosen.rates,
        prompt_tokens=chosen.prompt_tokens,
        max_output=max_output,
        clamped_to=clamped_to,
        reservation=plan.reservation,
        models=chosen.models,
        routes=chosen.routes,
        served_model=chosen.model,
        fell_back=chosen is fallback,
    )


async def arequest_progress(
    *, begun: Begun, generation_id: str, output_chars: int, upstream: str = "", price: ModelPrice | None = None
) -> bool:
    """Write down, while a request runs, what a crash of this process would otherwise lose.

    The generation id — and the upstream it came from — lets ``reconcile_holds`` ask OpenRouter
    what the request really cost; the estimate of the output relayed so far, at that upstream's
    ``price``, is what it charges when there is no such lookup (output that reached the client is
    never free); and the hold's expiry moves ``HOLD_TTL`` ahead, so a stream that runs longer than
    that is not mistaken for an abandoned one. One statement; False if the hold is no longer active.
    """
    record = begun.record
    record.generation_id = generation_id[:200]
    record.completion_tokens = estimate_tokens(output_chars)
    record.upstream = upstream[:64]
    fields = ["generation_id", "completion_tokens", "upstream"]
    if price is not None and price is not record.price:
        rates = rates_for(price)
        record.price, record.prices, record.markup = price, rates.snapshot(), rates.markup
        fields += ["price", "prices", "markup"]
    return await ahold_extend(hold=begun.hold, seconds=settings.HOLD_TTL, also_save=(record, fields))


async def _abilling_price(begun: Begun, outcome: Outcome) -> ModelPrice:
    """The price of the upstream that served; a fallback model that answered is billed at its own
    price there when it has one — only a model the request named: whatever else an upstream
    reports serving is billed at the requested model's price."""
    served = outcome.price or begun.price
    upstream_model = outcome.upstream_model
    if not upstream_model or upstream_model == served.model or upstream_model not in begun.models:
        return served
    cached = routes_cached([upstream_model])
    routes = cached[0] if cached is not None else await adb.in_thread(routes_current)(upstream_model)
    at = outcome.upstream or (begun.routes[0].name if begun.routes else "")
    return next((route.price for route in routes if route.name == at), served)


@dataclass
class Settlement:
    charge: int  # nanodollars
    cost: Decimal | None  # USD before markup
    source: str
    estimated: bool
    price: ModelPrice
    rates: Rates
    usage: Usage  # (the charge is before the hold's overrun cap: see arequest_settle)


def settlement_compute(begun: Begun, outcome: Outcome, price: ModelPrice) -> Settlement:
    """What a finished request is charged at ``price``, and on what basis. No writes."""
    rates = begun.rates if price is begun.price else rates_for(price)

    def priced(cost: Decimal | None, source: str, usage: Usage, estimated: bool = False) -> Settlement:
        charge = charge_nanos(cost, markup=rates.markup, min_charge=rates.min_charge) if cost is not None else 0
        return Settlement(charge, cost, source, estimated, price, rates, usage)

    usage = outcome.usage
    if not outcome.billable:
        return priced(None, CostSource.NONE, usage or Usage())
    if usage is None:
        if outcome.trust_upstream_cost and outcome.finish_reason == "error":
            # OpenRouter's zero-completion insurance: a generation ending in an error is free.
            return priced(Decimal(0), CostSource.UPSTREAM, Usage())
        # Nothing reported (client left, stream cut): the prompt plus what was relayed, marked.
        usage = Usage(prompt_tokens=begun.prompt_tokens, completion_tokens=estimate_tokens(outcome.output_chars))
        return priced(cost_usd(rates, usage), CostSource.ESTIMATE, usage, estimated=True)
    if outcome.trust_upstream_cost and usage.cost is not None:
        return priced(usage.cost, CostSource.UPSTREAM, usage)
    return priced(cost_usd(rates, usage), CostSource.PRICE_TABLE, usage)


_SETTLED_FIELDS = [
    "status",
    "upstream_model",
    "upstream",
    "generation_id",
    "finish_reason",
    "error",
    "http_status",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "upstream_cost",
    "cost_source",
    "charge",
    "markup",
    "price",
    "prices",
    "estimated",
    "latency_ms",
    "ttfb_ms",
    "settled_at",
]
_SETTLED_BY_CHARGE = [name for name in _SETTLED_FIELDS if name != "charge"]
# The same, when the record already holds the price it is settled at (the common case): its
# price, rates snapshot and markup were written with the hold (or the last progress write).
_PRICE_FIELDS = ("price", "prices", "markup")
_SETTLED_FIELDS_SAME_PRICE = [name for name in _SETTLED_FIELDS if name not in _PRICE_FIELDS]
_SETTLED_BY_CHARGE_SAME_PRICE = [name for name in _SETTLED_BY_CHARGE if name not in _PRICE_FIELDS]


async def arequest_settle(*, begun: Begun, outcome: Outcome) -> UsageRecord:
    """Charge the request and close its record in one transaction (release when nothing is due)."""
    result = settlement_compute(begun, outcome, await _abilling_price(begun, outcome))
    usage, rates, charge = result.usage, result.rates, result.charge
    record = begun.record
    record.status = outcome.status
    record.upstream_model = outcome.upstream_model[:200]
    record.upstream = outcome.upstream[:64]
    record.generation_id = outcome.generation_id[:200]
    record.finish_reason = outcome.finish_reason[:40]
    record.error = outcome.error[:500]
    record.http_status = outcome.http_status
    record.prompt_tokens = usage.prompt_tokens
    record.completion_tokens = usage.completion_tokens
    record.reasoning_tokens = usage.reasoning_tokens
    record.cached_tokens = usage.cached_tokens
    record.cache_write_tokens = usage.cache_write_tokens
    record.upstream_cost = result.cost
    record.cost_source = result.source
    record.charge = charge  # until the settlement says what its overrun cap let it take
    record.operator_loss = 0
    # Settled at the price the record was written with (``begun.rates`` are that price's, and
    # what its ``prices`` snapshot was taken from): those three columns are already right.
    same_price = result.price is begun.price and record.price is begun.price
    if not same_price:
        record.markup = rates.markup
        record.price = result.price
        record.prices = rates.snapshot()
    record.estimated = result.estimated
    record.latency_ms = outcome.latency_ms
    record.ttfb_ms = outcome.ttfb_ms
    record.settled_at = timezone.now()
    if outcome.billable:
        description = f"{record.model} ({record.request_id})"
        # The charge actually debited, and the loss beyond the overrun cap, are decided by the
        # settlement under the wallet's lock and saved with the record by the same statement.
        closed = await ahold_settle(
            hold=begun.hold,
            amount=charge,
            description=description,
            also_save=(record, _SETTLED_BY_CHARGE_SAME_PRICE if same_price else _SETTLED_BY_CHARGE),
            charged_into=("charge", "operator_loss"),
            member_id=record.user_id if record.organization_id is not None else None,
        )
        charge = closed.charged
    else:
        fields = _SETTLED_FIELDS_SAME_PRICE if same_price else _SETTLED_FIELDS
        closed = await ahold_release(hold=begun.hold, also_save=(record, fields))
    if not closed.closed_here:
        # Someone closed the hold first (reconcile_holds, after progress writes could not reach
        # the database for HOLD_TTL): their charge stands, and so does the record explaining it
        # — which is what the client is told, not what this settlement computed.
        log.warning("request %s settled after its hold was closed; its first charge stands", record.request_id)
        await adb.in_thread(record.refresh_from_db)()
        charge = record.charge
    # The counters move to what the request really cost and used (a request that failed before
    # any output: nothing, as its settled record says).
    await limits.aadjust(begun.reservation, charge, tokens=record.prompt_tokens + record.completion_tokens)
    await limits.arelease_parallel(begun.reservation)
    return record


# --- operations -------------------------------------------------------------------------------

DEMO_MODEL = "tokentill/demo"


def demo_price_ensure() -> tuple[ModelPrice, bool]:
    """The built-in demo model's price row (created once; staff edits to it are kept)."""
    existing = ModelPrice.objects.filter(model=DEMO_MODEL).order_by("-effective_from", "-id").first()
    if existing is not None:
        return existing, False
    price = ModelPrice.objects.create(
        model=DEMO_MODEL,
        name="Tokentill demo (offline, canned replies)",
        prompt=Decimal("0.50"),
        completion=Decimal("1.50"),
        is_demo=True,
        default_max_output=512,
        context_length=8192,
        source="seed",
    )
    return price, True
