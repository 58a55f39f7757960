"""The price table: which version is current, what it costs a client, and how it changes.

A price is never edited in place. A change (admin form, ``sync_prices``) inserts a new
``ModelPrice`` row with a later ``effective_from``; the version in force at an instant is the one
with the latest ``effective_from`` not after it. Usage records point at the row they were charged
with, so history stays re-derivable. The one column changed in place is ``enabled``: it says
whether a model is sold *now*, not what it costs, and no charge is ever derived from it.

Versions form a *series* per (model, upstream): the same model may be sold through several
upstreams at different prices, each series with its own history. The default upstream's series
is the one with no upstream (``upstream IS NULL``), which is why series are matched NULL-safely.

Reads (``prices_*`` selectors) and writes (``price_version_*`` / ``prices_*`` services) live
together here because they share the one rule above; the proxy's hot-path lookup is
``proxy.selectors.price_current``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation, localcontext

from django.conf import settings
from django.db import models as db
from django.db import transaction
from django.db.models import Exists, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from core.money import MoneyError, usd_to_nanos
from core.numbers import MAX_INT, parse_whole

from .models import PER_MILLION, ModelPrice, Upstream
from .selectors import newer_in_force, price_cache_clear, prices_current, same_series, series_of

# What a version *is*: every column a new version copies from its predecessor unless told
# otherwise. ``enabled`` is carried too, so re-pricing never silently starts or stops a sale.
VERSIONED_FIELDS = (
    "name",
    "prompt",
    "completion",
    "reasoning",
    "cache_read",
    "cache_write",
    "request_fee",
    "min_charge",
    "markup",
    "default_max_output",
    "context_length",
    "is_demo",
    "priority",
    "image_tokens",
    "image_low_tokens",
    "audio_tokens",
    "file_tokens",
    "overrun_cap",
)
RATE_FIELDS = ("prompt", "completion", "reasoning", "cache_read", "cache_write")
_RATE_QUANTUM = Decimal(1).scaleb(-12)  # ModelPrice rates keep 12 decimal places …
_RATE_LIMIT = Decimal(10) ** 12  # … and 24 digits in all


class PriceError(ValueError):
    """A price that cannot be stored: negative, not a number, or finer than the table keeps."""


# ``prices_set_enabled``'s default: every upstream's series of the models named.
EVERY_UPSTREAM = "every"

# --- selectors ---------------------------------------------------------------------------------


def prices_current_enabled(*, now: datetime | None = None, include_demo: bool = True) -> list[ModelPrice]:
    """Models on sale at ``now``: for each, the current version of its first candidate (the
    series tried first: lowest priority, the default upstream on a tie), if one is enabled and
    served by an enabled upstream. One query.

    A disabled current version hides its series even when an older version was enabled: the
    latest decision wins. ``first_seen`` (the model's oldest version at any upstream) is
    annotated for the OpenAI ``created`` field.
    """
    first_seen = ModelPrice.objects.filter(model=OuterRef("model")).order_by("effective_from").values("effective_from")
    queryset = prices_current(now=now).filter(Q(upstream__isnull=True) | Q(upstream__enabled=True), enabled=True)
    if not include_demo:
        queryset = queryset.filter(is_demo=False)
    queryset = queryset.annotate(first_seen=Subquery(first_seen[:1])).order_by(
        "model", "priority", db.F("upstream__name").asc(nulls_first=True)
    )
    first: dict[str, ModelPrice] = {}
    for price in queryset:
        first.setdefault(price.model, price)
    return list(first.values())


def prices_latest(*, models: list[str] | None = None, upstream: Upstream | None = None) -> dict[str, ModelPrice]:
    """The most recent version of each model's series at ``upstream`` (None: the default
    upstream), scheduled ones included: what a new version copies."""
    newer = same_series().filter(effective_from__gt=OuterRef("effective_from"))
    queryset = ModelPrice.objects.filter(series_of(upstream)).exclude(Exists(newer))
    if models is not None:
        queryset = queryset.filter(model__in=models)
    return {price.model: price for price in queryset}


def prices_with_state(queryset: QuerySet[ModelPrice], *, now: datetime | None = None) -> QuerySet[ModelPrice]:
    """Annotate ``superseded`` (a newer version is in force) for listing every version at once."""
    now = now or timezone.now()
    return queryset.annotate(superseded=Exists(newer_in_force(now)))


def price_is_current(price: ModelPrice, *, now: datetime | None = None) -> bool:
    return prices_current(now=now).filter(pk=price.pk).exists()


def price_history(*, model: str, upstream: Upstream | int | None = None) -> QuerySet[ModelPrice]:
    """Every version of one series, newest first."""
    return ModelPrice.objects.filter(series_of(upstream), model=model).order_by("-effective_from", "-id")


def price_routes(*, model: str, now: datetime | None = None) -> list[ModelPrice]:
    """The current version of each of ``model``'s series, in the order the proxy tries them
    (disabled ones included, for staff to see)."""
    rows = prices_current(now=now).filter(model=model).select_related("upstream")
    return sorted(rows, key=lambda price: (price.priority, price.upstream_id is not None, price.upstream_name))


def _plain(value: Decimal) -> str:
    """A decimal string without exponent or trailing zeros, as OpenRouter writes prices."""
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def price_public_rates(price: ModelPrice) -> dict[str, str]:
    """What a client pays, markup included: USD per prompt/completion token and per request.

    Exact decimal arithmetic with room to spare (a 24-digit rate times a 4-place markup factor
    needs more than the default 28 significant digits); the charge itself is rounded to a
    nanodollar only once, per request, by the proxy.
    """
    with localcontext() as ctx:
        ctx.prec = 60
        factor = 1 + Decimal(price.effective_markup())
        return {
            "prompt": _plain(price.prompt / PER_MILLION * factor),
            "completion": _plain(price.completion / PER_MILLION * factor),
            "request": _plain(Decimal(price.request_fee).scaleb(-9) * factor),
        }


# --- services ----------------------------------------------------------------------------------


def price_validate(price: ModelPrice) -> None:
    if not price.model or not price.model.strip():
        raise PriceError("a price needs a model id")
    for name in RATE_FIELDS:
        value = getattr(price, name)
        if isinstance(value, int) and not isinstance(value, bool):
            value = Decimal(value)  # the column default is a plain 0
        if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
            raise PriceError(f"{name} must be a non-negative decimal rate, not {value!r}")
        if value >= _RATE_LIMIT or value.quantize(_RATE_QUANTUM) != value:
            raise PriceError(f"{name}={value} does not fit the price table (12 decimal places per 1M tokens)")
    for name in ("request_fee", "min_charge"):
        value = getattr(price, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PriceError(f"{name} must be a non-negative number of nanodollars, not {value!r}")
    if price.markup is not None and (not Decimal(price.markup).is_finite() or price.markup < 0):
        raise PriceError(f"markup must be a non-negative fraction, not {price.markup!r}")
    if price.is_demo and price.upstream_id is not None:
        raise PriceError("the demo model is served in-process: it cannot name an upstream")
    if price.overrun_cap is not None and (
        not isinstance(price.overrun_cap, int) or isinstance(price.overrun_cap, bool) or price.overrun_cap < 0
    ):
        raise PriceError(f"overrun_cap must be a non-negative number of nanodollars, not {price.overrun_cap!r}")


@transaction.atomic
def price_version_save(*, price: ModelPrice, source: str, effective_from: datetime | None = None) -> ModelPrice:
    """Insert ``price`` as a new version (even if it was loaded from an existing row).

    Resetting the primary key turns Django's save into an INSERT, so the row it was loaded from
    — and every usage record pointing at it — is left exactly as it was.
    """
    price_validate(price)
    price.pk = None
    price._state.adding = True
    price.effective_from = effective_from or timezone.now()
    price.source = source
    price.save(force_insert=True)
    # The proxy keeps prices in a short per-process cache; this process drops it at once, others
    # within PROXY_PRICE_CACHE_SECONDS.
    transaction.on_commit(price_cache_clear)
    return price


def price_version_create(
    *,
    model: str,
    source: str,
    effective_from: datetime | None = None,
    upstream: Upstream | None = None,
    **values,
) -> ModelPrice:
    """A new version of ``model``'s series at ``upstream`` (None: the default upstream): the
    latest version's columns, overridden by ``values``."""
    unknown = set(values) - set(VERSIONED_FIELDS) - {"enabled"}
    if unknown:
        raise PriceError(f"not a price column: {', '.join(sorted(unknown))}")
    previous = prices_latest(models=[model], upstream=upstream).get(model)
    price = ModelPrice(model=model, upstream=upstream)
    if previous is not None:
        for name in (*VERSIONED_FIELDS, "enabled"):
            setattr(price, name, getattr(previous, name))
    for name, value in values.items():
        setattr(price, name, value)
    return price_version_save(price=price, source=source, effective_from=effective_from)


def price_differs(old: ModelPrice, new: ModelPrice) -> list[str]:
    """Names of the versioned columns that differ (``enabled`` is not one of them)."""
    return [name for name in VERSIONED_FIELDS if getattr(old, name) != getattr(new, name)]


def prices_set_enabled(
    *,
    models: list[str] | set[str],
    enabled: bool,
    now: datetime | None = None,
    upstream: Upstream | str | None = EVERY_UPSTREAM,
) -> int:
    """Start or stop selling ``models``, in place, on the current and any scheduled versions —
    through every upstream (the default), or only through ``upstream`` (None: the default one).

    Editing ``enabled`` in place is the one exception to "never rewrite a version": it is an
    availability switch, not a price, and no charge is derived from it. Scheduled (future)
    versions are switched too, or a disabled model would come back on sale when one takes effect.
    """
    now = now or timezone.now()
    current = prices_current(now=now).filter(model__in=list(models))
    if upstream != EVERY_UPSTREAM:
        current = current.filter(series_of(upstream))
    changed = 0
    with transaction.atomic():
        for model, upstream_id, since in current.values_list("model", "upstream_id", "effective_from"):
            changed += (
                ModelPrice.objects.filter(series_of(upstream_id), model=model, effective_from__gte=since)
                .exclude(enabled=enabled)
                .update(enabled=enabled)
            )
        transaction.on_commit(price_cache_clear)
    return changed


# --- synchronisation from an upstream price list -------------------------------------------------

# OpenRouter pricing key → our column. Values are USD per token (per request for ``request``).
_OPENROUTER_RATES = {
    "prompt": "prompt",
    "completion": "completion",
    "internal_reasoning": "reasoning",
    "input_cache_read": "cache_read",
    "input_cache_write": "cache_write",
}


@dataclass(frozen=True)
class PriceOffer:
    """One model as the upstream prices it, already in our units."""

    model: str
    name: str
    rates: dict[str, Decimal]  # column → USD per 1M tokens
    request_fee: int  # nanodollars per request
    context_length: int | None
    max_output: int | None  # the upstream's max completion tokens, if it says


def _decimal(value: object, what: str) -> Decimal:
    # Strings are the documented form; Decimal/int appear only if the JSON was parsed with
    # parse_float=Decimal. A float here would already have lost the exact price.
    if isinstance(value, bool) or not isinstance(value, (str, Decimal, int)):
        raise PriceError(f"{what} is {value!r}, not a decimal string")
    try:
        result = Decimal(str(value).strip())
    except InvalidOperation:
        raise PriceError(f"{what}={value!r} is not a decimal number") from None
    if not result.is_finite() or result < 0:
        raise PriceError(f"{what}={value!r} is not a non-negative price")
    return result


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _positive_int(value: object, what: str) -> int | None:
    """A token count from a price file: an integer, or a string of digits (CSV); blank is none."""
    if value is None or value == "":
        return None
    try:
        return parse_whole(value.strip() if isinstance(value, str) else value, minimum=1, maximum=MAX_INT)
    except ValueError:
        raise PriceError(f"{what}={value!r} is not a positive whole number") from None


def offer_from_price_file(item: object) -> PriceOffer:
    """Parse one entry of a static price file (JSON or CSV; the README's "Static price files"),
    or raise ``PriceError``. Rates are USD per 1M tokens, as the admin shows them; ``request`` is
    USD per request. ``id``, ``prompt`` and ``completion`` are required."""
    if not isinstance(item, dict):
        raise PriceError("entry is not an object")
    model = item.get("id")
    if not isinstance(model, str) or not model.strip() or len(model.strip()) > 200:
        raise PriceError(f"entry has no usable id ({model!r})")
    model = model.strip()
    rates = {}
    for column in RATE_FIELDS:
        raw = item.get(column)
        if raw is None or raw == "":
            if column in ("prompt", "completion"):
                raise PriceError(f"{model}: no {column} rate")
            raw = "0"
        per_million = _decimal(raw, f"{model}: {column}")
        if per_million >= _RATE_LIMIT or per_million.quantize(_RATE_QUANTUM) != per_million:
            raise PriceError(f"{model}: {column}={raw} is finer than the price table keeps (12 decimal places)")
        rates[column] = per_million
    try:
        request_fee = usd_to_nanos(_decimal(item.get("request") or "0", f"{model}: request"))
    except MoneyError as exc:
        raise PriceError(f"{model}: request: {exc}") from None
    name = item.get("name") if isinstance(item.get("name"), str) else ""
    return PriceOffer(
        model=model,
        name=name.strip()[:200],
        rates=rates,
        request_fee=request_fee,
        context_length=_positive_int(item.get("context_length"), f"{model}: context_length"),
        max_output=_positive_int(item.get("max_output"), f"{model}: max_output"),
    )


def offer_from_openrouter(item: object) -> PriceOffer:
    """Parse one entry of OpenRouter's ``GET /models`` ``data`` list, or raise ``PriceError``."""
    if not isinstance(item, dict):
        raise PriceError("entry is not an object")
    model = item.get("id")
    if not isinstance(model, str) or not model.strip() or len(model) > 200:
        raise PriceError(f"entry has no usable id ({model!r})")
    pricing = item.get("pricing")
    if not isinstance(pricing, dict):
        raise PriceError(f"{model}: no pricing object")
    rates = {}
    for key, column in _OPENROUTER_RATES.items():
        per_token = _decimal(pricing.get(key, "0"), f"{model}: pricing.{key}")
        with localcontext() as ctx:
            ctx.prec = 60
            per_million = per_token * PER_MILLION
        if per_million >= _RATE_LIMIT or per_million.quantize(_RATE_QUANTUM) != per_million:
            raise PriceError(f"{model}: pricing.{key}={per_token} is finer than the price table keeps")
        rates[column] = per_million
    try:
        request_fee = usd_to_nanos(_decimal(pricing.get("request", "0"), f"{model}: pricing.request"))
    except MoneyError as exc:
        raise PriceError(f"{model}: pricing.request: {exc}") from None
    top_provider = item.get("top_provider") if isinstance(item.get("top_provider"), dict) else {}
    name = item.get("name") if isinstance(item.get("name"), str) else ""
    return PriceOffer(
        model=model,
        name=name[:200],
        rates=rates,
        request_fee=request_fee,
        context_length=_count(item.get("context_length")),
        max_output=_count(top_provider.get("max_completion_tokens")),
    )


def default_max_output_for(offer: PriceOffer) -> int:
    """Output tokens the hold assumes when a request sets no ``max_tokens``.

    The model's own maximum can be 100k+ tokens; holding for that would refuse every modest
    wallet, so the hold assumes PROXY_DEFAULT_MAX_OUTPUT, or less when the model cannot produce
    that much. Operators may raise it per model in the admin; sync never overwrites their choice.
    """
    default = settings.PROXY_DEFAULT_MAX_OUTPUT
    return min(offer.max_output, default) if offer.max_output else default


@dataclass
class SyncResult:
    new: list[str] = field(default_factory=list)
    changed: list[tuple[str, list[str]]] = field(default_factory=list)  # (model, columns changed)
    unchanged: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.new) + len(self.changed) + len(self.unchanged)


# Columns the upstream owns; markup, min_charge, enabled and default_max_output are the
# operator's and are carried over from the previous version untouched.
_SYNCED_FIELDS = ("name", *RATE_FIELDS, "request_fee", "context_length")


@transaction.atomic(durable=True)
def prices_sync(
    *,
    offers: list[PriceOffer],
    enable_new: bool = False,
    disable_missing: bool = False,
    dry_run: bool = False,
    source: str = "sync_prices",
    now: datetime | None = None,
    upstream: Upstream | None = None,
) -> SyncResult:
    """Bring ``upstream``'s price series (None: the default upstream's) in line with ``offers``:
    new versions only where something changed.

    Idempotent: a second run with the same offers writes nothing. New models start disabled
    unless ``enable_new`` — an operator decides what they sell. Models missing from the offers
    are kept (usage records need them) and, with ``disable_missing``, taken off sale through this
    upstream. A dry run does all of it and rolls back, so its report is exactly what a real run
    would do. Other upstreams' series are never touched.
    """
    now = now or timezone.now()
    result = SyncResult()
    latest = prices_latest(upstream=upstream)
    for offer in offers:
        offered = {
            "name": offer.name,
            **offer.rates,
            "request_fee": offer.request_fee,
            "context_length": offer.context_length,
        }
        previous = latest.get(offer.model)
        if previous is None:
            price_version_create(
                model=offer.model,
                source=source,
                effective_from=now,
                upstream=upstream,
                enabled=enable_new,
                default_max_output=default_max_output_for(offer),
                **offered,
            )
            result.new.append(offer.model)
            continue
        differs = [name for name in _SYNCED_FIELDS if getattr(previous, name) != offered[name]]
        if not differs:
            result.unchanged.append(offer.model)
            continue
        price_version_create(model=offer.model, source=source, effective_from=now, upstream=upstream, **offered)
        result.changed.append((offer.model, differs))
    if disable_missing:
        # Compared in Python: an upstream list of hundreds of ids would not fit in one SQL IN.
        listed = {offer.model for offer in offers}
        selling = prices_current(now=now).filter(series_of(upstream), enabled=True, is_demo=False)
        on_sale = selling.values_list("model", flat=True)
        result.disabled = sorted(set(on_sale) - listed)
        prices_set_enabled(models=result.disabled, enabled=False, now=now, upstream=upstream)
    if dry_run:
        transaction.set_rollback(True)
    return result
