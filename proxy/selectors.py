"""Reads for the proxy: how a model is served (its routes and their prices), the priced model
list, usage for a hold.

``routes_current`` sits on the hot path of every proxied request, so it keeps what it found (and
what it did not find) in a small per-process cache for ``PROXY_PRICE_CACHE_SECONDS``: one query
per model and period reads every upstream's price series for the model with the upstream's row
joined in, so choosing an upstream costs a request no query. The trade-off is deliberate: a
staff edit of a price or an upstream reaches every process within that many seconds, and no
request waits on a query. Set it to 0 to read the table on every request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import models as db
from django.db.models import Exists, OuterRef, Q, QuerySet, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from core.media import Allowance
from core.money import usd_to_nanos
from core.pricing import Rates

from . import upstream
from .models import DEMO_UPSTREAM, AgentRoute, ModelAlias, ModelFallback, ModelPrice, Upstream

_cache: dict[str, tuple[float, list[Route]]] = {}
_cache_lock = threading.Lock()
_tiers: tuple[float, Tiers] | None = None


@dataclass(frozen=True)
class Route:
    """One way to serve a model: an upstream, and the price version the model has there."""

    price: ModelPrice
    config: upstream.UpstreamConfig | None = None  # a staff-added upstream; None: the default or the demo

    @property
    def is_demo(self) -> bool:
        return self.price.is_demo

    @property
    def upstream(self) -> upstream.UpstreamConfig:
        """Whom to call (the default upstream read from the settings now, not when cached)."""
        return self.config or upstream.default()

    @property
    def name(self) -> str:
        return DEMO_UPSTREAM if self.is_demo else self.upstream.name


def _routes_from_db(model: str) -> list[Route]:
    """The model's candidates, in the order they are tried: for each upstream, the version in
    force of its price series — if that version is enabled and the upstream is too."""
    routes = []
    for price in prices_current().filter(model=model).select_related("upstream"):
        # The newest version decides: disabling a model is done by adding a disabled version.
        if not price.enabled:
            continue
        if price.upstream is None:
            routes.append(Route(price))
        elif price.upstream.enabled:
            routes.append(Route(price, upstream.config_of(price.upstream)))
    # Priority first; on a tie the default upstream, then by name, so the order never depends on
    # the database's.
    routes.sort(key=lambda route: (route.price.priority, route.config is not None, route.name))
    return routes


def _series_id(ref):
    # The default upstream's series has no upstream; 0 is no Upstream's id, so NULL-safe equality
    # between an outer and an inner row's upstream is equality of these.
    return Coalesce(ref, Value(0), output_field=db.BigIntegerField())


def same_series():
    """Rows of the outer row's series (same model and upstream), for correlated subqueries."""
    return ModelPrice.objects.alias(series=_series_id("upstream")).filter(
        model=OuterRef("model"), series=_series_id(OuterRef("upstream"))
    )


def series_of(upstream: Upstream | int | None) -> Q:
    """The rows of ``upstream``'s series (``None``: the default upstream's)."""
    return Q(upstream__isnull=True) if upstream is None else Q(upstream=upstream)


def newer_in_force(now: datetime):
    """A later version of the same series that is already in force at ``now``."""
    return same_series().filter(effective_from__lte=now, effective_from__gt=OuterRef("effective_from"))


def prices_current(*, now: datetime | None = None) -> QuerySet[ModelPrice]:
    """The version in force at ``now`` of every series (model and upstream), enabled or not, in
    one query: THE rule of which price is in force (the proxy's routes, ``/v1/models``, the admin
    and ``sync_prices`` all read it from here).

    A version's instant is unique within its series, so "no newer version in force" picks exactly
    one row per series; a correlated NOT EXISTS is portable between SQLite and PostgreSQL, unlike
    ``DISTINCT ON``.
    """
    now = now or timezone.now()
    return ModelPrice.objects.filter(effective_from__lte=now).exclude(Exists(newer_in_force(now)))


def _routes(model: str) -> list[Route]:
    ttl = settings.PROXY_PRICE_CACHE_SECONDS
    if ttl <= 0:
        return _routes_from_db(model)
    now = time.monotonic()
    cached = _cache.get(model)
    if cached is not None and cached[0] > now:
        return cached[1]
    routes = _routes_from_db(model)
    with _cache_lock:
        if len(_cache) > 10_000:  # unknown model names are cached too; never let them pile up
            _cache.clear()
        _cache[model] = (now + ttl, routes)
    return routes


def routes_current(model: str) -> list[Route]:
    """The routes ``model`` can be served by now, first choice first ([] if it is not sold)."""
    return [route for route in _routes(model) if model_servable(route.price)]


def routes_uncached(model: str) -> list[Route]:
    """``routes_current`` read from the table now, for staff screens that must not see a stale
    cache."""
    return [route for route in _routes_from_db(model) if model_servable(route.price)]


def price_current(model: str) -> ModelPrice | None:
    """The price version of ``model``'s first route, or None if it is unknown or disabled."""
    routes = _routes(model)
    return routes[0].price if routes else None


def routes_cached(models: list[str]) -> list[list[Route]] | None:
    """The cached routes of ``models`` if every one is cached and fresh, else None — so async
    callers know whether a lookup would need the database."""
    if settings.PROXY_PRICE_CACHE_SECONDS <= 0:
        return None
    now = time.monotonic()
    found = []
    for model in models:
        cached = _cache.get(model)
        if cached is None or cached[0] <= now:
            return None
        found.append([route for route in cached[1] if model_servable(route.price)])
    return found


def price_cache_clear() -> None:
    global _tiers
    with _cache_lock:
        _cache.clear()
        _tiers = None


# --- aliases, fallbacks and agent routes ------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """An alias's or a model's fallback, as the proxy reads it."""

    fallback: str  # a model or an alias ("" for none)
    fallback_below: int | None  # nanodollars


@dataclass(frozen=True)
class Tiers:
    """Every alias, model fallback and agent route: small tables, read whole."""

    aliases: dict[str, tuple[str, Rule]]  # alias name -> (its model, its fallback rule)
    fallbacks: dict[str, Rule]  # model -> its fallback rule
    agents: dict[str, str]  # X-Tokentill-Agent label -> alias name


@dataclass(frozen=True)
class Choice:
    """How a request is served: the model, and the fallback it may drop to."""

    asked: str  # the name it is routed by: its agent's alias when mapped, else the model it sent
    alias: str  # the alias that name is ("" when it is a model)
    model: str  # the price-table model that serves it
    fallback: str  # the price-table model that serves it when the wallet runs low ("" for none)
    fallback_below: int | None  # nanodollars: an available balance under this falls back too


def _tiers_from_db() -> Tiers:
    aliases = {row.name: (row.model, Rule(row.fallback, row.fallback_below)) for row in ModelAlias.objects.all()}
    fallbacks = {row.model: Rule(row.fallback, row.fallback_below) for row in ModelFallback.objects.all()}
    agents = dict(AgentRoute.objects.values_list("agent", "alias__name"))
    return Tiers(aliases, fallbacks, agents)


def tiers_current() -> Tiers:
    """The aliases, fallbacks and agent routes, cached per process like the routes (three
    queries once per ``PROXY_PRICE_CACHE_SECONDS``; none in between)."""
    global _tiers
    ttl = settings.PROXY_PRICE_CACHE_SECONDS
    if ttl <= 0:
        return _tiers_from_db()
    cached = _tiers
    now = time.monotonic()
    if cached is not None and cached[0] > now:
        return cached[1]
    tiers = _tiers_from_db()
    with _cache_lock:
        _tiers = (now + ttl, tiers)
    return tiers


def tiers_cached() -> Tiers | None:
    """The cached tiers if fresh, else None (an async caller then reads them in a thread)."""
    cached = _tiers
    if settings.PROXY_PRICE_CACHE_SECONDS <= 0 or cached is None or cached[0] <= time.monotonic():
        return None
    return cached[1]


def choice_of(tiers: Tiers, *, model: str, agent: str = "") -> Choice:
    """Resolve what a request asked for. An agent mapped by staff overrides the model; an alias
    names its model; the fallback is the alias's own, else its model's, and an alias given as a
    fallback is read as its model — one hop, never further (validation keeps aliases from
    naming aliases, so this never loops)."""
    asked = tiers.agents.get(agent, model) if agent else model
    alias = tiers.aliases.get(asked)
    if alias is not None:
        served, rule = alias[0], alias[1]
        if not rule.fallback:
            rule = tiers.fallbacks.get(served, rule)
    else:
        served, rule = asked, tiers.fallbacks.get(asked, Rule("", None))
    fallback = rule.fallback
    if fallback in tiers.aliases:
        fallback = tiers.aliases[fallback][0]
    if fallback == served:
        fallback = ""
    return Choice(
        asked, asked if alias is not None else "", served, fallback, rule.fallback_below if fallback else None
    )


def upstreams_configured() -> list[upstream.UpstreamConfig]:
    """The default upstream, then every enabled staff-added one (one query)."""
    return [upstream.default(), *(upstream.config_of(row) for row in Upstream.objects.filter(enabled=True))]


def model_servable(price: ModelPrice | None) -> bool:
    """The built-in demo model answers only while no upstream is configured."""
    return price is not None and not (price.is_demo and settings.UPSTREAM_API_KEY)


def rates_for(price: ModelPrice) -> Rates:
    return Rates(
        prompt=price.prompt,
        completion=price.completion,
        reasoning=price.reasoning,
        cache_read=price.cache_read,
        cache_write=price.cache_write,
        request_fee=price.request_fee,
        min_charge=price.min_charge,
        markup=price.effective_markup(),
    )


def allowance_for(price: ModelPrice) -> Allowance:
    """Prompt tokens a hold at ``price`` assumes per non-text part: the price row's own, else the
    operator's ``HOLD_*_TOKENS``."""

    def either(own: int | None, default: int) -> int:
        return own if own is not None else default

    return Allowance(
        image=either(price.image_tokens, settings.HOLD_IMAGE_TOKENS),
        image_low=either(price.image_low_tokens, settings.HOLD_IMAGE_LOW_TOKENS),
        audio=either(price.audio_tokens, settings.HOLD_AUDIO_TOKENS),
        file=either(price.file_tokens, settings.HOLD_FILE_TOKENS),
    )


def overrun_cap_for(price: ModelPrice) -> int:
    """Nanodollars a request held at ``price`` may settle above its hold: the row's, else
    ``HOLD_OVERRUN_CAP``."""
    return price.overrun_cap if price.overrun_cap is not None else usd_to_nanos(settings.HOLD_OVERRUN_CAP)
