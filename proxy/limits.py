"""Guardrail counters in Django's cache: per-key requests per minute, requests in flight
(``max_parallel``), daily and monthly spend caps, and per-run step and spend limits.

A run (``X-Tokentill-Run``, a user's own label) is limited by the tightest of three: the request's
own ``X-Tokentill-Run-Max-Steps``/``-Max-Spend`` headers, the API key's ``run_max_steps``/
``run_max_spend``, and the operator's ``RUN_MAX_STEPS``/``RUN_MAX_SPEND`` — so a request can only
tighten what the key and the operator allow. Its counters are the user's, whoever's key is used:
steps count model calls that were admitted (a refused one gives its step back), spend counts
model charges and holds in flight plus tool charges made with the run's label (``CHARGE_RUN_FIELD``
in the ledger entry's metadata), on whichever wallet the run's user owns.

The cache is Redis when ``REDIS_URL`` is set, so every server process counts against the same
numbers; without it the counters are per process (fine for the embedded single process).

Spend counters hold *settled charges plus holds in flight*: a request reserves its hold against
the cap with one atomic ``incr`` *before* it reaches the upstream, and settlement moves the
counter by ``charge − hold``. Checking after the increment (and undoing it when over) means two
concurrent requests can never both squeeze under a cap — no read-then-write. A tool charge
(``POST /v1/user/charge``) reserves its amount the same way before it is posted, and gives it
back when nothing was posted (refused, or a replay). A counter missing from the cache (restart,
eviction) is rebuilt once from the usage records and tool charges it counts: a key's from those
made with the key, a run's from those labelled with the run. A run's counters move only while
some run limit applies to a request, so requests of one run should carry the same limits.

A key's requests in flight (``max_parallel``) are a counter moved +1 at admission and −1 when the
request settles (or is refused after admission). It lives ``HOLD_TTL`` from its creation and is
then rebuilt from the key's pending usage records — the requests really in flight — so a process
that crashed with requests counted holds their slots until then, no longer.
"""

from __future__ import annotations

import calendar
import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

from django.conf import settings
from django.core.cache import cache
from django.db.models import Q, Sum

from core.money import MoneyError, format_usd, parse_usd
from core.openai_errors import OpenAIError
from infra import adb
from wallet.models import Entry, EntryKind

from . import notices
from .models import UsageRecord, UsageStatus

DAY = 24 * 3600

log = logging.getLogger(__name__)
# The ledger entry of a tool charge made with an API key names the key here, in its metadata
# (set by proxy/v1.py, refused from callers): what a lost spend counter is rebuilt from.
CHARGE_API_KEY_FIELD = "api_key_id"
# Likewise the run a tool charge was made in (its X-Tokentill-Run): what a run's spend is made of.
CHARGE_RUN_FIELD = "tokentill_run"

RUN_HEADER = "X-Tokentill-Run"
RUN_MAX_STEPS_HEADER = "X-Tokentill-Run-Max-Steps"
RUN_MAX_SPEND_HEADER = "X-Tokentill-Run-Max-Spend"
MAX_RUN_ID = 200  # characters of X-Tokentill-Run kept (the usage record's column)
MAX_RUN_STEPS = 10**9
RUN_TTL = 7 * DAY  # seconds a run's counters are kept; after that they are rebuilt from the records
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")


class InvalidRunHeader(ValueError):
    def __init__(self, header: str, message: str):
        super().__init__(message)
        self.header, self.message = header, message


@dataclass(frozen=True)
class RunAsk:
    """A request's run: its id and the limits the request itself sets (0: none of its own)."""

    run: str = ""
    max_steps: int = 0
    max_spend: int = 0  # nanodollars


def run_ask_parse(headers: Mapping[str, str]) -> RunAsk:
    """The run headers of a request (``headers`` looked up by lower-case name), strictly: steps a
    positive ASCII integer, spend a positive decimal string of at most 9 places. A limit needs a
    run to apply to. Raises ``InvalidRunHeader`` naming the header at fault."""
    run = (headers.get(RUN_HEADER.lower()) or "")[:MAX_RUN_ID]
    steps_raw = headers.get(RUN_MAX_STEPS_HEADER.lower())
    spend_raw = headers.get(RUN_MAX_SPEND_HEADER.lower())
    steps = spend = 0
    if steps_raw is not None:
        text = steps_raw.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 10 and 0 < int(text) <= MAX_RUN_STEPS):
            message = f"{RUN_MAX_STEPS_HEADER} must be a whole number of model calls from 1 to {MAX_RUN_STEPS}."
            raise InvalidRunHeader(RUN_MAX_STEPS_HEADER, message)
        steps = int(text)
    if spend_raw is not None:
        text = spend_raw.strip()
        try:
            spend = parse_usd(text) if _DECIMAL.fullmatch(text) else 0
        except MoneyError:
            spend = 0
        if spend <= 0:
            message = f'{RUN_MAX_SPEND_HEADER} must be a positive USD amount such as "0.50" (at most 9 decimal places).'
            raise InvalidRunHeader(RUN_MAX_SPEND_HEADER, message)
    for header, given in ((RUN_MAX_STEPS_HEADER, steps_raw), (RUN_MAX_SPEND_HEADER, spend_raw)):
        if given is not None and not run:
            raise InvalidRunHeader(header, f"{header} limits a run: send {RUN_HEADER} with it.")
    return RunAsk(run=run, max_steps=steps, max_spend=spend)


class LimitExceeded(OpenAIError):
    """A guardrail refused the request: a 429 in the OpenAI shape, with ``Retry-After``."""

    def __init__(self, message: str, code: str, retry_after: int):
        super().__init__(429, message, "rate_limit_error", code, retry_after=retry_after)


@dataclass
class Reservation:
    """Counter keys a request moved, so settlement (or a refusal) can move them back."""

    keys: list[str] = field(default_factory=list)
    amount: int = 0  # nanodollars currently reserved on each key
    step_key: str | None = None  # the run's step counter this request moved, given back on release
    parallel_key: str | None = None  # the key's in-flight counter, given back when the request ends


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


def _max_parallel(api_key):
    return _key_limits(api_key).get("max_parallel") or None


def _tightest(*limits: int) -> int:
    """The smallest of the limits that are set (positive); 0 when none is."""
    return min((limit for limit in limits if limit > 0), default=0)


def _run_max_steps(run: str, api_key=None, asked: int = 0) -> int:
    if not run:
        return 0
    return _tightest(asked, _key_limits(api_key).get("run_max_steps") or 0, settings.RUN_MAX_STEPS)


def _run_max_spend(run: str, api_key=None, asked: int = 0) -> int:
    """Nanodollars; the request's own (``asked``), the key's and the operator's, tightest wins."""
    if not run:
        return 0
    key_limit = _key_limits(api_key).get("run_max_spend")
    return _tightest(asked, parse_usd(key_limit) if key_limit else 0, parse_usd(settings.RUN_MAX_SPEND))


def _run_key(user_id: int, run: str, counter: str) -> str:
    # The run id is any client string (spaces, 200 characters): hashed, it makes a valid cache key.
    return f"tt:run:{user_id}:{hashlib.sha256(run.encode()).hexdigest()[:32]}:{counter}"


def uses_counters(*, api_key, run: str, run_max_steps: int = 0, run_max_spend: int = 0) -> bool:
    """Would checking this request touch the cache? (Async callers run the check in a thread then.)"""
    return bool(
        _rpm(api_key)
        or _max_parallel(api_key)
        or _spend_caps(api_key)
        or _run_max_steps(run, api_key, run_max_steps)
        or _run_max_spend(run, api_key, run_max_spend)
    )


def check_rpm(*, api_key, now: datetime) -> None:
    rpm = _rpm(api_key)
    if not rpm:
        return
    key = f"tt:rpm:{api_key.pk}:{now:%Y%m%d%H%M}"
    if _incr(key, 1, 120) > int(rpm):
        raise LimitExceeded(
            f"Rate limit reached for this API key: {rpm} requests per minute.", "rate_limit_exceeded", 60 - now.second
        )


def acquire_parallel(*, api_key) -> str | None:
    """Count one more request in flight for the key, or raise ``LimitExceeded`` at once (and
    count nothing). Returns the counter moved, given back by ``release``."""
    most = _max_parallel(api_key)
    if not most:
        return None
    key = f"tt:parallel:{api_key.pk}"
    key_id = api_key.pk

    def in_flight() -> int:
        return UsageRecord.objects.filter(api_key_id=key_id, status=UsageStatus.PENDING).count()

    if _incr(key, 1, settings.HOLD_TTL, in_flight) > int(most):
        _give_back_step(key)
        raise LimitExceeded(
            f"This API key already has {most} request{'s' if int(most) != 1 else ''} in flight (max_parallel).",
            "max_parallel_reached",
            1,
        )
    return key


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


def _spent(records: Q, tool_charges: Q) -> int:
    """Nanodollars spent by the matching requests — charges, plus the holds of those still in
    flight — and the matching tool charges."""
    row = UsageRecord.objects.filter(records).aggregate(
        charged=Sum("charge", filter=~Q(status=UsageStatus.PENDING)),
        held=Sum("hold_amount", filter=Q(status=UsageStatus.PENDING)),
    )
    tools = Entry.objects.filter(tool_charges, kind=EntryKind.CHARGE).aggregate(debited=Sum("amount"))
    return int((row["charged"] or 0) + (row["held"] or 0) - (tools["debited"] or 0))  # debits are negative


def _spent_since(api_key_id: int, since: datetime) -> int:
    """What the key spent since ``since``: its requests and the tool charges it made (on any
    wallet: a billing key charges others)."""
    return _spent(
        Q(api_key_id=api_key_id, created_at__gte=since),
        Q(created_at__gte=since, **{f"metadata__{CHARGE_API_KEY_FIELD}": api_key_id}),
    )


def _run_spent(user_id: int, run: str) -> int:
    """What the user's run spent: its requests and the tool charges labelled with it."""
    return _spent(Q(user_id=user_id, run=run), Q(wallet__user_id=user_id, **{f"metadata__{CHARGE_RUN_FIELD}": run}))


def _run_steps_taken(user_id: int, run: str) -> int:
    """Model calls of the user's run that were admitted (a refused request is no step)."""
    return UsageRecord.objects.filter(user_id=user_id, run=run).exclude(status=UsageStatus.REFUSED).count()


def reserve_spend(
    *, api_key, run: str, user_id: int, amount: int, now: datetime, run_max_spend: int = 0
) -> Reservation:
    """Count ``amount`` (a hold, or a tool charge) against the key's spend caps and the run's
    spend limit (``run_max_spend``: the request's own, in nanodollars; 0 for none)."""
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
                partial(_spent_since, key_id, start),
                f"This API key reached its {window} spend cap of ${format_usd(cap)}.",
                "spend_cap_reached",
                _seconds_to_reset(now, window),
            )
        )
    run_cap = _run_max_spend(run, api_key, run_max_spend)
    if run_cap:
        caps.append(
            (
                _run_key(user_id, run, "spend"),
                run_cap,
                RUN_TTL,
                lambda: _run_spent(user_id, run),
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
            notices.cap_reached(
                user_id=user_id,
                api_key=api_key,
                run=run,
                counter=key,
                limit=cap,
                code=code,
                message=message,
                retry_after=retry_after,
            )
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
    """The request did not happen: its reservation, its run step and its slot are given back."""
    adjust(reservation, 0)
    if reservation.step_key is not None:
        _give_back_step(reservation.step_key)
        reservation.step_key = None
    release_parallel(reservation)


def release_parallel(reservation: Reservation) -> None:
    """The request is over: its in-flight slot is given back."""
    if reservation.parallel_key is not None:
        _give_back_step(reservation.parallel_key)
        reservation.parallel_key = None


def _give_back_step(key: str) -> None:
    try:
        cache.decr(key)
    except ValueError:  # expired meanwhile: nothing to give back to
        pass


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
    """``release`` for async callers, best effort likewise (see ``aadjust``)."""
    await aadjust(reservation, 0)
    if reservation.step_key is not None:
        try:
            await adb.in_thread(_give_back_step)(reservation.step_key)
        except Exception:
            log.exception("run step counter %s could not be given back", reservation.step_key)
        reservation.step_key = None
    await arelease_parallel(reservation)


async def arelease_parallel(reservation: Reservation) -> None:
    """``release_parallel`` for async callers, best effort (see ``aadjust``); no cache trip for a
    request that took no slot."""
    if reservation.parallel_key is not None:
        try:
            await adb.in_thread(_give_back_step)(reservation.parallel_key)
        except Exception:
            log.exception("in-flight counter %s could not be given back", reservation.parallel_key)
        reservation.parallel_key = None


def check_run_steps(*, run: str, user_id: int, api_key=None, run_max_steps: int = 0) -> str | None:
    """Count this model call as a step of its run, or raise ``LimitExceeded`` (and count nothing).
    Returns the counter moved, for the caller to give back if the request does not happen."""
    max_steps = _run_max_steps(run, api_key, run_max_steps)
    if not max_steps:
        return None
    key = _run_key(user_id, run, "steps")
    steps = _incr(key, 1, RUN_TTL, lambda: _run_steps_taken(user_id, run))
    if steps > max_steps:
        _give_back_step(key)  # a refused request is no step: a run whose limit is raised may go on
        raise LimitExceeded(f"This agent run reached its limit of {max_steps} steps.", "run_step_limit", 3600)
    return key
