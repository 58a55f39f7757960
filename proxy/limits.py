"""Guardrail counters in Django's cache: per-key requests per minute, per-key daily and monthly
spend caps, and per-run step and spend limits.

The cache is Redis when ``REDIS_URL`` is set, so every server process counts against the same
numbers; without it the counters are per process (fine for the embedded single process).

Spend counters hold *settled charges plus holds in flight*: a request reserves its hold against
the cap with one atomic ``incr`` *before* it reaches the upstream, and settlement moves the
counter by ``charge − hold``. Checking after the increment (and undoing it when over) means two
concurrent requests can never both squeeze under a cap — no read-then-write. A tool charge
(``POST /v1/user/charge``) reserves its amount the same way before it is posted, and gives it
back when nothing was posted (refused, or a replay). A counter missing from the cache (restart,
eviction) is rebuilt once from the key's usage records and the tool charges it made.
"""

from __future__ import annotations

import calendar
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.db.models import Q, Sum

from core.money import format_usd, parse_usd
from core.openai_errors import OpenAIError
from infra import adb
from wallet.models import Entry, EntryKind

from .models import UsageRecord, UsageStatus

DAY = 24 * 3600

log = logging.getLogger(__name__)
# The ledger entry of a tool charge made with an API key names the key here, in its metadata
# (set by proxy/v1.py, refused from callers): what a lost spend counter is rebuilt from.
CHARGE_API_KEY_FIELD = "api_key_id"


class LimitExceeded(OpenAIError):
    """A guardrail refused the request: a 429 in the OpenAI shape, with ``Retry-After``."""

    def __init__(self, message: str, code: str, retry_after: int):
        super().__init__(429, message, "rate_limit_error", code, retry_after=retry_after)


@dataclass
class Reservation:
    """Counter keys a request moved, so settlement (or a refusal) can move them back."""

    keys: list[str] = field(default_factory=list)
    amount: int = 0  # nanodollars currently reserved on each key


def _incr(key: str, delta: int, timeout: int, initial: Callable[[], int] | None = None) -> int:
    """Atomically add ``delta``; a missing counter starts from ``initial()`` (or zero)."""
    try:
        return cache.incr(key, delta)
    except ValueError:
        # add() is atomic and a no-op when another process created the key first.
        cache.add(key, initial() if initial else 0, timeout)
        return cache.incr(key, delta)


# Which counters a request moves — one answer for the checks below and for ``uses_counters``.


def _key_limits(api_key) -> dict:
    return (api_key.limits or {}) if api_key is not None else {}


def _rpm(api_key):
    return _key_limits(api_key).get("rpm") or None


def _spend_caps(api_key) -> list[tuple[str, int]]:
    """(window, cap in nanodollars) for each spend cap the key sets."""
    limits = _key_limits(api_key)
    return [
        (window, parse_usd(limits[f"{window}_spend"]))
        for window in ("daily", "monthly")
        if limits.get(f"{window}_spend") not in (None, "")
    ]


def _run_max_steps(run: str) -> int:
    return settings.RUN_MAX_STEPS if run else 0


def _run_max_spend(run: str) -> int:
    return parse_usd(settings.RUN_MAX_SPEND) if run else 0


def uses_counters(*, api_key, run: str) -> bool:
    """Would checking this request touch the cache? (Async callers run the check in a thread then.)"""
    return bool(_rpm(api_key) or _spend_caps(api_key) or _run_max_steps(run) or _run_max_spend(run))


def check_rpm(*, api_key, now: datetime) -> None:
    rpm = _rpm(api_key)
    if not rpm:
        return
    key = f"tt:rpm:{api_key.pk}:{now:%Y%m%d%H%M}"
    if _incr(key, 1, 120) > int(rpm):
        raise LimitExceeded(
            f"Rate limit reached for this API key: {rpm} requests per minute.", "rate_limit_exceeded", 60 - now.second
        )


def check_count_tokens(*, api_key, user_id: int, now: datetime) -> None:
    """A token count is free, so it is limited apart from metered requests: ``COUNT_TOKENS_RPM``
    per user, and it counts against the key's own rpm limit like any request."""
    check_rpm(api_key=api_key, now=now)
    most = settings.COUNT_TOKENS_RPM
    if _incr(f"tt:count:{user_id}:{now:%Y%m%d%H%M}", 1, 120) > most:
        raise LimitExceeded(
            f"Rate limit reached for token counting: {most} requests per minute.",
            "rate_limit_exceeded",
            60 - now.second,
        )


def _window_start(now: datetime, window: str) -> datetime:
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if window == "daily" else day.replace(day=1)


def _seconds_to_reset(now: datetime, window: str) -> int:
    start = _window_start(now, window)
    if window == "daily":
        end = start + timedelta(days=1)
    else:
        end = start + timedelta(days=calendar.monthrange(start.year, start.month)[1])
    return max(int((end - now).total_seconds()), 1)


def _spent_since(api_key_id: int, since: datetime) -> int:
    """What the key spent since ``since``, in nanodollars: its requests' charges plus the holds of
    those still in flight, and the tool charges it made (on any wallet: a billing key charges others)."""
    row = UsageRecord.objects.filter(api_key_id=api_key_id, created_at__gte=since).aggregate(
        charged=Sum("charge", filter=~Q(status=UsageStatus.PENDING)),
        held=Sum("hold_amount", filter=Q(status=UsageStatus.PENDING)),
    )
    tools = Entry.objects.filter(
        kind=EntryKind.CHARGE, created_at__gte=since, **{f"metadata__{CHARGE_API_KEY_FIELD}": api_key_id}
    ).aggregate(debited=Sum("amount"))
    return (row["charged"] or 0) + (row["held"] or 0) - (tools["debited"] or 0)  # debits are negative


def reserve_spend(*, api_key, run: str, user_id: int, amount: int, now: datetime) -> Reservation:
    """Count ``amount`` (a hold) against the key's spend caps and the run's spend limit."""
    reservation = Reservation(amount=amount)
    caps: list[tuple[str, int, int, Callable[[], int] | None, str, str, int]] = []
    for window, cap in _spend_caps(api_key):
        start = _window_start(now, window)
        key = f"tt:spend:{api_key.pk}:{window}:{start:%Y%m%d}"
        key_id = api_key.pk
        caps.append(
            (
                key,
                cap,
                _seconds_to_reset(now, window) + DAY,
                lambda key_id=key_id, start=start: _spent_since(key_id, start),
                f"This API key reached its {window} spend cap of ${format_usd(cap)}.",
                "spend_cap_reached",
                _seconds_to_reset(now, window),
            )
        )
    run_cap = _run_max_spend(run)
    if run_cap:
        caps.append(
            (
                f"tt:run:{user_id}:{run}:spend",
                run_cap,
                7 * DAY,
                None,
                f"This agent run reached its spend limit of ${format_usd(run_cap)}.",
                "run_spend_limit",
                3600,
            )
        )
    for key, cap, timeout, initial, message, code, retry_after in caps:
        total = _incr(key, amount, timeout, initial)
        reservation.keys.append(key)
        if total > cap:
            release(reservation)
            raise LimitExceeded(message, code, retry_after)
    return reservation


def adjust(reservation: Reservation, new_amount: int) -> None:
    """Move every reserved counter to ``new_amount`` (a clamped hold, or the final charge)."""
    delta = new_amount - reservation.amount
    if delta:
        for key in reservation.keys:
            try:
                cache.incr(key, delta)
            except ValueError:  # the window's counter expired meanwhile; nothing to correct
                pass
    reservation.amount = new_amount


def release(reservation: Reservation) -> None:
    adjust(reservation, 0)


async def aadjust(reservation: Reservation, new_amount: int) -> None:
    """``adjust`` for async callers: a reservation that moved no counter needs no cache trip.

    Best effort: it runs beside money that has already moved (a hold taken, a charge committed),
    and a cache (Redis) that fails then must not fail the request — the client would retry and
    pay twice. The counter is left where it was, which the next window starts afresh from.
    """
    if reservation.keys and new_amount != reservation.amount:
        try:
            await adb.in_thread(adjust)(reservation, new_amount)
        except Exception:
            log.exception("spend counters %s could not be moved to %s", reservation.keys, new_amount)
    reservation.amount = new_amount


async def arelease(reservation: Reservation) -> None:
    await aadjust(reservation, 0)


def check_run_steps(*, run: str, user_id: int) -> None:
    max_steps = _run_max_steps(run)
    if not max_steps:
        return
    steps = _incr(f"tt:run:{user_id}:{run}:steps", 1, 7 * DAY)
    if steps > max_steps:
        raise LimitExceeded(f"This agent run reached its limit of {max_steps} steps.", "run_step_limit", 3600)
