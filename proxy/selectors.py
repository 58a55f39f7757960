"""Reads for the proxy: the current price of a model, the priced model list, usage for a hold.

``price_current`` sits on the hot path of every proxied request, so it keeps what it found (and
what it did not find) in a small per-process cache for ``PROXY_PRICE_CACHE_SECONDS``. The trade-off
is deliberate: a staff price edit reaches every process within that many seconds, and no request
waits on a price query. Set it to 0 to read the table on every request.
"""

from __future__ import annotations

import threading
import time

from django.conf import settings
from django.utils import timezone

from core.pricing import Rates

from .models import ModelPrice

_cache: dict[str, tuple[float, ModelPrice | None]] = {}
_cache_lock = threading.Lock()


def _price_from_db(model: str) -> ModelPrice | None:
    price = (
        ModelPrice.objects.filter(model=model, effective_from__lte=timezone.now())
        .order_by("-effective_from", "-id")
        .first()
    )
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


def prices_enabled() -> list[ModelPrice]:
    """The price in force for every servable model, ordered by model id (for ``/v1/models``)."""
    current: dict[str, ModelPrice] = {}
    for price in ModelPrice.objects.filter(effective_from__lte=timezone.now()).order_by(
        "model", "-effective_from", "-id"
    ):
        current.setdefault(price.model, price)
    return [price for price in current.values() if price.enabled and model_servable(price)]


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
