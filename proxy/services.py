"""State changes for proxied requests: begin (guardrails, price, hold, pending record), settle
(charge + record in one transaction), and the record of a refused request.

Every request a known user makes leaves one ``UsageRecord``: refused ones with status
``refused`` and no charge, the rest ``pending`` until ``request_settle`` closes them. Hot-path
query budget (pinned by tests): begin = the hold (one statement on PostgreSQL) + record INSERT,
each committing on its own (the wallet comes joined to the authenticated user); settle = record
UPDATE + the hold's settlement (one statement on PostgreSQL) in one transaction; the price comes
from the per-process cache in ``selectors``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.models import User
from wallet.models import Hold, Wallet
from wallet.money import usd_to_nanos
from wallet.services import (
    InsufficientFunds,
    hold_create,
    hold_release,
    hold_settle,
    usage_reconcile,
    wallet_get_or_create,
)

from . import limits
from .lib.pricing import Rates, affordable_output, charge_nanos, cost_usd, hold_nanos
from .lib.usage import Usage, estimate_tokens
from .models import CostSource, ModelPrice, UsageRecord, UsageStatus
from .selectors import model_servable, price_current, rates_for


@dataclass
class Refusal(Exception):
    """A request stopped before the upstream; rendered as an OpenAI-shaped error."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Funds(Exception):
    """Refused for insufficient funds (402, or the assistant-message refusal)."""

    balance: int  # nanodollars
    available: int  # nanodollars
    needed: int  # nanodollars


@dataclass
class RequestMeta:
    request_id: str
    user: object
    api_key: object | None
    endpoint: str  # "chat.completions" | "embeddings"
    model: str = ""
    stream: bool = False
    run: str = ""
    agent: str = ""
    tool: str = ""


@dataclass
class Begun:
    meta: RequestMeta
    wallet: Wallet
    hold: Hold
    record: UsageRecord
    price: ModelPrice
    rates: Rates
    prompt_tokens: int  # estimate, from the request size
    max_output: int
    clamped_to: int | None  # set when the output cap was lowered to what the balance affords
    reservation: limits.Reservation


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
    reached_upstream: bool = True
    latency_ms: int | None = None
    ttfb_ms: int | None = None


def _refused_record(meta: RequestMeta, *, http_status: int, error: str) -> UsageRecord:
    return UsageRecord.objects.create(
        request_id=meta.request_id,
        user=meta.user,
        api_key=meta.api_key,
        endpoint=meta.endpoint,
        model=meta.model[:200],
        stream=meta.stream,
        status=UsageStatus.REFUSED,
        http_status=http_status,
        error=error[:500],
        cost_source=CostSource.NONE,
        run=meta.run,
        agent=meta.agent,
        tool=meta.tool,
        settled_at=timezone.now(),
    )


def usage_refused(*, meta: RequestMeta, http_status: int, error: str) -> UsageRecord:
    """Record a request refused before it reached the upstream (nothing charged)."""
    return _refused_record(meta, http_status=http_status, error=error)


def _refuse(meta: RequestMeta, refusal: Refusal) -> Refusal:
    _refused_record(meta, http_status=refusal.status, error=refusal.message)
    return refusal


def _wallet_of(user) -> Wallet:
    """The user's wallet, without a query when authentication already joined it in."""
    if User.wallet.is_cached(user):
        try:
            return user.wallet
        except Wallet.DoesNotExist:  # joined and absent: created below
            pass
    return wallet_get_or_create(user=user)


def request_begin(
    *,
    meta: RequestMeta,
    fallback_models: list[str] | None = None,
    prompt_chars: int,
    requested_output: int | None,
    now: datetime | None = None,
) -> Begun:
    """Check guardrails, price the request and reserve its cost, or raise ``Refusal``/``Funds``.

    The order is the cheap-to-expensive one: model and key rules (no writes), rate counters
    (cache), spend caps (cache reservation), then the hold (one conditional UPDATE).
    """
    now = now or timezone.now()
    models = [meta.model, *(m for m in fallback_models or [] if m != meta.model)]
    prices = []
    for model in models:
        price = price_current(model)
        if not model_servable(price):
            raise _refuse(meta, Refusal(400, f"The model `{model}` does not exist.", code="model_not_found"))
        if price.is_demo and meta.endpoint != "chat.completions":
            raise _refuse(
                meta, Refusal(400, f"The demo model `{model}` only answers chat completions.", code="model_not_found")
            )
        prices.append(price)
    allowed = (meta.api_key.limits or {}).get("allowed_models") if meta.api_key is not None else None
    if allowed is not None:
        for model in models:
            if model not in allowed:
                raise _refuse(
                    meta,
                    Refusal(
                        403, f"This API key may not use the model `{model}`.", "permission_error", "model_not_allowed"
                    ),
                )
    try:
        limits.check_rpm(api_key=meta.api_key, now=now)
        limits.check_run_steps(run=meta.run, user_id=meta.user.pk)
    except limits.LimitExceeded as exc:
        raise _refuse(meta, Refusal(429, exc.message, "rate_limit_error", exc.code, retry_after=exc.retry_after))

    prompt_tokens = estimate_tokens(prompt_chars)
    # With fallbacks any listed model may answer: reserve for the dearest.
    price = max(
        prices,
        key=lambda p: hold_nanos(
            rates_for(p), prompt_tokens=prompt_tokens, max_output=requested_output or p.default_max_output
        ),
    )
    rates = rates_for(price)
    max_output = requested_output or price.default_max_output
    amount = hold_nanos(rates, prompt_tokens=prompt_tokens, max_output=max_output)
    try:
        reservation = limits.reserve_spend(
            api_key=meta.api_key, run=meta.run, user_id=meta.user.pk, amount=amount, now=now
        )
    except limits.LimitExceeded as exc:
        raise _refuse(meta, Refusal(429, exc.message, "rate_limit_error", exc.code, retry_after=exc.retry_after))

    wallet = _wallet_of(meta.user)
    floor = usd_to_nanos(settings.MIN_BALANCE)
    clamped_to = None
    short: InsufficientFunds | None = None
    # No transaction around the hold and the record: each commits on its own, so the wallet row
    # is locked only for the hold's own statement, and BEGIN/COMMIT round trips are saved. A
    # crash between the two leaves a hold without a record, which ``reconcile_holds`` releases.
    try:
        hold = hold_create(wallet=wallet, amount=amount, request_id=meta.request_id, min_available=floor)
    except InsufficientFunds as exc:
        # Cannot cover the full output cap: a shorter answer is still worth giving when the
        # balance affords a useful number of tokens (and stays above the floor).
        affordable = affordable_output(rates, prompt_tokens=prompt_tokens, available=exc.available)
        hold = None
        short = exc
        if exc.available >= floor and settings.PROXY_MIN_OUTPUT_TOKENS <= affordable < max_output:
            clamped = hold_nanos(rates, prompt_tokens=prompt_tokens, max_output=affordable)
            try:
                hold = hold_create(wallet=wallet, amount=clamped, request_id=meta.request_id, min_available=floor)
                clamped_to, max_output, amount, short = affordable, affordable, clamped, None
            except InsufficientFunds as again:  # a concurrent request took the money first
                short = again
    if hold is None:
        _refused_record(meta, http_status=402, error="insufficient funds")
    else:
        record = UsageRecord.objects.create(
            request_id=meta.request_id,
            user=meta.user,
            api_key=meta.api_key,
            endpoint=meta.endpoint,
            model=meta.model,
            stream=meta.stream,
            status=UsageStatus.PENDING,
            # The prompt estimate, until settlement writes the upstream's count: what an
            # expired hold is charged if the request never finishes (see holds_reconcile).
            prompt_tokens=prompt_tokens,
            estimated=True,
            hold_amount=amount,
            markup=rates.markup,
            price=price,
            prices=rates.snapshot(),
            run=meta.run,
            agent=meta.agent,
            tool=meta.tool,
            created_at=now,
        )
    if short is not None:
        limits.release(reservation)
        raise Funds(balance=short.balance, available=short.available, needed=short.needed)
    limits.adjust(reservation, amount)
    return Begun(
        meta=meta,
        wallet=wallet,
        hold=hold,
        record=record,
        price=price,
        rates=rates,
        prompt_tokens=prompt_tokens,
        max_output=max_output,
        clamped_to=clamped_to,
        reservation=reservation,
    )


def _billing_rates(begun: Begun, upstream_model: str) -> tuple[ModelPrice, Rates]:
    """A fallback that answered is billed at its own price when we have one."""
    if upstream_model and upstream_model != begun.price.model:
        other = price_current(upstream_model)
        if other is not None:
            return other, rates_for(other)
    return begun.price, begun.rates


@dataclass
class Settlement:
    charge: int  # nanodollars
    cost: Decimal | None  # USD before markup
    source: str
    estimated: bool
    price: ModelPrice
    rates: Rates
    usage: Usage


def settlement_compute(begun: Begun, outcome: Outcome) -> Settlement:
    """What a finished request is charged, and on what basis. No writes."""
    price, rates = _billing_rates(begun, outcome.upstream_model)

    def priced(cost: Decimal | None, source: str, usage: Usage, estimated: bool = False) -> Settlement:
        charge = charge_nanos(cost, markup=rates.markup, min_charge=rates.min_charge) if cost is not None else 0
        return Settlement(charge, cost, source, estimated, price, rates, usage)

    usage = outcome.usage
    if not outcome.reached_upstream:
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


def request_settle(*, begun: Begun, outcome: Outcome) -> UsageRecord:
    """Charge the request and close its record in one transaction (release when nothing is due)."""
    result = settlement_compute(begun, outcome)
    usage, rates, charge = result.usage, result.rates, result.charge
    record = begun.record
    record.status = outcome.status
    record.upstream_model = outcome.upstream_model[:200]
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
    record.charge = charge
    record.markup = rates.markup
    record.price = result.price
    record.prices = rates.snapshot()
    record.estimated = result.estimated
    record.latency_ms = outcome.latency_ms
    record.ttfb_ms = outcome.ttfb_ms
    record.settled_at = timezone.now()
    # The record is written first and the wallet touched last: the wallet row's lock is then
    # held only for the settle statement and the commit (see wallet.services).
    with transaction.atomic(savepoint=False):
        record.save(
            update_fields=[
                "status",
                "upstream_model",
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
        )
        if outcome.reached_upstream:
            hold_settle(hold=begun.hold, amount=charge, description=f"{record.model} ({record.request_id})")
        else:
            hold_release(hold=begun.hold)
    limits.adjust(begun.reservation, charge)
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


def _rates_from_snapshot(record: UsageRecord) -> Rates:
    snap = record.prices or {}
    if not snap and record.price is not None:
        return rates_for(record.price)
    return Rates(
        prompt=Decimal(snap.get("prompt", "0")),
        completion=Decimal(snap.get("completion", "0")),
        reasoning=Decimal(snap.get("reasoning", "0")),
        cache_read=Decimal(snap.get("cache_read", "0")),
        cache_write=Decimal(snap.get("cache_write", "0")),
        request_fee=int(snap.get("request_fee", 0)),
        min_charge=int(snap.get("min_charge", 0)),
        markup=Decimal(snap.get("markup", str(settings.MARKUP))),
    )


def _count(value) -> int:
    return max(int(value), 0) if isinstance(value, (int, Decimal)) and not isinstance(value, bool) else 0


def _apply_generation(record: UsageRecord, generation: dict | None) -> bool:
    """Copy the upstream's own account of a generation onto the record; False if it has none."""
    cost = generation.get("total_cost") if generation else None
    if not isinstance(cost, (int, Decimal)) or isinstance(cost, bool) or cost < 0:
        return False
    record.prompt_tokens = _count(generation.get("native_tokens_prompt") or generation.get("tokens_prompt"))
    record.completion_tokens = _count(generation.get("native_tokens_completion") or generation.get("tokens_completion"))
    record.reasoning_tokens = _count(generation.get("native_tokens_reasoning"))
    record.cached_tokens = _count(generation.get("native_tokens_cached"))
    record.upstream_cost = Decimal(cost)
    record.cost_source = CostSource.RECONCILED
    record.estimated = False
    record.status = UsageStatus.CANCELLED if generation.get("cancelled") else UsageStatus.OK
    record.finish_reason = str(generation.get("finish_reason") or "")[:40]
    return True


def hold_reconcile(*, hold: Hold, generation: dict | None) -> str:
    """Close one expired hold; ``generation`` is the upstream's lookup (OpenRouter) or None.

    Never silently dropped: with a lookup the record is charged the upstream's ``total_cost``;
    without one it is charged the estimate of its prompt (marked ``estimated``); a hold with no
    usage record at all is released.
    """
    record = UsageRecord.objects.filter(request_id=hold.request_id).first()
    if record is None:
        hold_release(hold=hold)
        return f"{hold.request_id}: released (no usage record)"
    rates = _rates_from_snapshot(record)
    if _apply_generation(record, generation):
        how = "settled from the upstream's generation lookup"
    else:
        usage = Usage(prompt_tokens=record.prompt_tokens)
        record.completion_tokens = 0
        record.upstream_cost = cost_usd(rates, usage)
        record.cost_source = CostSource.ESTIMATE
        record.estimated = True
        record.status = UsageStatus.UPSTREAM_ERROR
        record.error = "never settled by its server process; charged an estimate of its prompt"
        how = "settled at an estimate of its prompt"
    record.charge = charge_nanos(record.upstream_cost, markup=rates.markup, min_charge=rates.min_charge)
    record.settled_at = timezone.now()
    with transaction.atomic(savepoint=False):
        hold_settle(hold=hold, amount=record.charge, description=f"{record.model} ({record.request_id}, reconciled)")
        record.save()
    return f"{hold.request_id}: {how}, charged {record.charge} nanodollars"


def estimates_to_reconcile(*, settled_before, limit: int):
    """Settled requests charged an estimate that the upstream can still account for."""
    return (
        UsageRecord.objects.filter(cost_source=CostSource.ESTIMATE, estimated=True, settled_at__lte=settled_before)
        .exclude(generation_id="")
        .select_related("user__wallet")
        .order_by("settled_at", "pk")[:limit]
    )


def estimate_reconcile(*, record: UsageRecord, generation: dict | None) -> str:
    """Replace a settled estimate with what the upstream says the generation cost.

    The estimate was already debited (a disconnected client had output that is never free), so
    only the difference moves, through ``wallet.services.usage_reconcile``, once per request.
    """
    estimated_charge = record.charge
    if not _apply_generation(record, generation):
        return f"{record.request_id}: generation {record.generation_id} not available upstream; estimate kept"
    rates = _rates_from_snapshot(record)
    record.charge = charge_nanos(record.upstream_cost, markup=rates.markup, min_charge=rates.min_charge)
    with transaction.atomic(savepoint=False):
        record.save()
        usage_reconcile(
            wallet=record.user.wallet,
            request_id=record.request_id,
            delta=record.charge - estimated_charge,
            description=f"{record.model} ({record.request_id}): estimate replaced by the upstream's cost",
        )
    return f"{record.request_id}: estimate {estimated_charge} replaced by {record.charge} nanodollars"
