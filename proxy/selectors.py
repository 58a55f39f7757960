"""Reads for the proxy: which price is in force (``prices_current``, the one rule), and the current
price of a model as the hot path reads it.

``price_current`` sits on the hot path of every proxied request, so it keeps what it found (and
what it did not find) in a small per-process cache for ``PROXY_PRICE_CACHE_SECONDS``. The trade-off
is deliberate: a staff price edit reaches every process within that many seconds, and no request
waits on a price query. Set it to 0 to read the table on every request.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

from django.conf import settings
from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone

from core.pricing import Rates

from .models import ModelPrice


def newer_in_force(now: datetime):
    """A later version of the same model that is already in force at ``now``."""
    return ModelPrice.objects.filter(
        model=OuterRef("model"), effective_from__lte=now, effective_from__gt=OuterRef("effective_from")
    )


def prices_current(*, now: datetime | None = None) -> QuerySet[ModelPrice]:
    """The version in force at ``now`` for every model, enabled or not, in one query: THE rule of
    which price is in force (the proxy's lookup, ``/v1/models``, the admin and ``sync_prices`` all
    read it from here).

    ``(model, effective_from)`` is unique, so "no newer version in force" picks exactly one row
    per model; a correlated NOT EXISTS is portable between SQLite and PostgreSQL, unlike
    ``DISTINCT ON``.
    """
    now = now or timezone.now()
    return ModelPrice.objects.filter(effective_from__lte=now).exclude(Exists(newer_in_force(now)))


_cache: dict[str, tuple[float, ModelPrice | None]] = {}
_cache_lock = threading.Lock()


def _price_from_db(model: str) -> ModelPrice | None:
    price = prices_current().filter(model=model).first()
    # The newest version decides: disabling a model is done by adding a disabled version.
    return price if price is not None and price.enabled else None


def price_current(model: str) -> ModelPrice | None:
    """The price version in force for ``model`` now, or None if it is unknown or disabled."""
    ttl = settings.PROXY_PRICE_CACHE_SECONDS
    if ttl <= 0:
        return _price_from_db(model)
    now = time.monotonic()
    cached = _cache.get(model)
    if cached is not None and cached[0] > now:
        return cached[1]
    price = _price_from_db(model)
    with _cache_lock:
        if len(_cache) > 10_000:  # unknown model names are cached too; never let them pile up
            _cache.clear()
        _cache[model] = (now + ttl, price)
    return price


def prices_cached(models: list[str]) -> list[ModelPrice | None] | None:
    """The cached prices of ``models`` (None entries for unknown models) if every one is cached
    and fresh, else None — so async callers know whether a lookup would need the database."""
    if settings.PROXY_PRICE_CACHE_SECONDS <= 0:
        return None
    now = time.monotonic()
    found = []
    for model in models:
        cached = _cache.get(model)
        if cached is None or cached[0] <= now:
            return None
        found.append(cached[1])
    return found


def price_cache_clear() -> None:
    with _cache_lock:
        _cache.clear()


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
