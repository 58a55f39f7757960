"""Guardrail counters in Django's cache: requests per minute, requests in flight
(``max_parallel``), daily and monthly spend caps and tokens per minute and per day — each for the
API key a request is made with *and* for its user (``accounts.limits``: the stricter of the
staff's limits and the user's own, counted across all the user's keys and sign-ins) — a
member's daily and monthly spend caps inside the organization a request bills (``orgs.Membership``:
what they spent from its wallet), and per-run step and spend limits. Every spend cap and token
limit is one ``_Cap`` counted by ``_reserve``: one rule, one ``usage.cap_reached`` event.

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

Token counters work like spend counters: a request reserves the tokens its hold assumes (the
prompt estimate plus the output cap × choices, ``UsageRecord.held_tokens``) before it reaches
the upstream, and settlement moves the counter to the tokens the upstream reported (prompt +
completion; none for a request that failed before any output). A lost token counter is rebuilt
from the usage records of its window: settled ones' tokens plus pending ones' held tokens.

A key's or user's requests in flight (``max_parallel``) are a counter moved +1 at admission and
−1 when the request settles (or is refused after admission). It lives ``HOLD_TTL`` from its
creation and is then rebuilt from the pending usage records — the requests really in flight — so
a process that crashed with requests counted holds their slots until then, no longer.

Requests per minute are counted only in the cache: a lost counter starts again from zero.
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
from django.db.models import F, Q, Sum

from accounts.limits import user_limits_effective
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

    keys: list[str] = field(default_factory=list)  # spend counters
    amount: int = 0  # nanodollars currently reserved on each spend counter
    step_key: str | None = None  # the run's step counter this request moved, given back on release
    parallel_keys: list[str] = field(default_factory=list)  # in-flight counters, given back when it ends
    token_keys: list[str] = field(default_factory=list)  # token counters (per minute, per day)
    tokens: int = 0  # tokens currently reserved on each token counter


def _incr(key: str, delta: int, timeout: int, initial: Callable[[], int] | None = None) -> int:
    """Atomically add ``delta``; a missing counter starts from ``initial()`` (or zero)."""
    try:
        return cache.incr(key, delta)
    except ValueError:
        # add() is atomic and a no-op when another process created the key first.
        cache.add(key, initial() if initial else 0, timeout)
        return cache.incr(key, delta)


# Whose limits a request counts against: the API key it was made with, and its user (whichever
# key or sign-in they use). One answer for the checks below and for ``uses_counters``.


@dataclass(frozen=True)
class _Subject:
    """An API key, a user, or a member inside an organization, with its limits in force: counts
    as ints, spend caps in nanodollars. A member (``organization`` set, ``ident`` the user's id)
    has daily and monthly spend caps only (``orgs.Membership``), counted on what they spent from
    the organization's wallet."""

    kind: str  # "key" | "user" | "member"
    ident: int
    limits: dict
    organization: int | None = None  # a member's organization

    @property
    def whose(self) -> str:
        return "This API key" if self.kind == "key" else "Your account"

    @property
    def of(self) -> str:
        return "this API key" if self.kind == "key" else "your account"

    def counter(self, name: str) -> str:
        # A key's counters keep the names they always had (``tt:rpm:<key id>:…``), and so do a
        # member's spend counters (``tt:member:<org id>:<user id>:<window>:…``: spend is all a
        # member's limits count).
        if self.kind == "member":
            return f"tt:member:{self.organization}:{self.ident}"
        return f"tt:{name}:{self.ident}" if self.kind == "key" else f"tt:user:{name}:{self.ident}"

    def code(self, code: str) -> str:
        return code if self.kind == "key" else f"user_{code}"

    def spend_refusal(self, window: str, cap: int) -> tuple[str, str]:
        """The message and code of a refusal by its ``window`` ("daily", "monthly") spend cap."""
        if self.kind == "member":
            message = f"You reached your {window} spend limit of ${format_usd(cap)} in this organization."
            return message, "member_spend_limit"
        return f"{self.whose} reached its {window} spend cap of ${format_usd(cap)}.", self.code("spend_cap_reached")

    def records(self) -> Q:
        if self.kind == "member":
            return Q(organization_id=self.organization, user_id=self.ident)
        return Q(api_key_id=self.ident) if self.kind == "key" else Q(user_id=self.ident)

    def tool_charges(self) -> Q:
        """The tool charges it made (a key: on any wallet — a billing key charges others; a
        member: on the organization's wallet, the entries naming them) or that were made on its
        wallet (a user)."""
        if self.kind == "key":
            return Q(**{f"metadata__{CHARGE_API_KEY_FIELD}": self.ident})
        if self.kind == "member":
            return Q(wallet__organization_id=self.organization, member_id=self.ident)
        return Q(wallet__user_id=self.ident)


def _key_limits(api_key) -> dict:
    return (api_key.limits or {}) if api_key is not None else {}


def _key_subject(api_key) -> _Subject | None:
    if api_key is None:
        return None
    raw = _key_limits(api_key)
    # Unset is spelled null, "" or (for counts) 0; a spend cap of "0" is a cap: nothing may be spent.
    limits = {name: int(raw[name]) for name in ("rpm", "max_parallel", "tpm", "tpd") if raw.get(name)}
    for window in ("daily", "monthly"):
        if raw.get(f"{window}_spend") not in (None, ""):
            limits[f"{window}_spend"] = parse_usd(raw[f"{window}_spend"])
    return _Subject("key", api_key.pk, limits)


def _user_subject(user) -> _Subject | None:
    if user is None:
        return None
    limits = user_limits_effective(user)
    return _Subject("user", user.pk, limits) if limits else None


def _member_subject(membership) -> _Subject | None:
    """A member's spend caps inside their organization (``orgs.Membership``; None: no membership,
    as for an organization's own key, whose limits are the key's)."""
    if membership is None:
        return None
    caps = (("daily_spend", membership.daily_spend), ("monthly_spend", membership.monthly_spend))
    limits = {name: cap for name, cap in caps if cap is not None}
    return _Subject("member", membership.user_id, limits, membership.organization_id) if limits else None


def subjects_of(api_key, user) -> list[_Subject]:
    """The key's and the user's limits in force (parsed from their JSON and settings). A request
    works them out once and hands them to each check (``subjects=``): asked of every check, they
    were worked out five times a request whenever limits applied."""
    return [subject for subject in (_key_subject(api_key), _user_subject(user)) if subject is not None]


def _subjects(api_key, user, subjects: list[_Subject] | None) -> list[_Subject]:
    return subjects_of(api_key, user) if subjects is None else subjects


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


def uses_counters(
    *, api_key, run: str, run_max_steps: int = 0, run_max_spend: int = 0, user=None, subjects=None
) -> bool:
    """Would checking this request touch the cache? (Async callers run the check in a thread then.)"""
    return bool(
        any(subject.limits for subject in _subjects(api_key, user, subjects))
        or _run_max_steps(run, api_key, run_max_steps)
        or _run_max_spend(run, api_key, run_max_spend)
    )


def check_rpm(*, api_key, now: datetime, user=None, subjects=None) -> None:
    """Count one request against the key's and the user's requests per minute (a refused request
    counts too: retrying at once does not help)."""
    for subject in _subjects(api_key, user, subjects):
        rpm = subject.limits.get("rpm")
        if rpm and _incr(f"{subject.counter('rpm')}:{now:%Y%m%d%H%M}", 1, 120) > rpm:
            raise LimitExceeded(
                f"Rate limit reached for {subject.of}: {rpm} requests per minute.",
                subject.code("rate_limit_exceeded"),
                60 - now.second,
            )


def acquire_parallel(*, api_key, user=None, subjects=None) -> list[str]:
    """Count one more request in flight for the key and for the user, or raise ``LimitExceeded``
    at once (and count nothing). Returns the counters moved, given back by ``release``."""
    moved: list[str] = []
    for subject in _subjects(api_key, user, subjects):
        most = subject.limits.get("max_parallel")
        if not most:
            continue
        key = subject.counter("parallel")
        records = subject.records()

        def in_flight(records=records) -> int:
            return UsageRecord.objects.filter(records, status=UsageStatus.PENDING).count()

        moved.append(key)
        if _incr(key, 1, settings.HOLD_TTL, in_flight) > most:
            for each in moved:
                _give_back_step(each)
            raise LimitExceeded(
                f"{subject.whose} already has {most} request{'s' if most != 1 else ''} in flight (max_parallel).",
                subject.code("max_parallel_reached"),
                1,
            )
    return moved


def check_count_tokens(*, api_key, user, now: datetime) -> None:
    """A token count is free, so it is limited apart from metered requests: ``COUNT_TOKENS_RPM``
    per user, and it counts against the key's and the user's own rpm limits like any request."""
    check_rpm(api_key=api_key, now=now, user=user)
    most = settings.COUNT_TOKENS_RPM
    if _incr(f"tt:count:{user.pk}:{now:%Y%m%d%H%M}", 1, 120) > most:
        raise LimitExceeded(
            f"Rate limit reached for token counting: {most} requests per minute.",
            "rate_limit_exceeded",
            60 - now.second,
        )


def _window_start(now: datetime, window: str) -> datetime:
    if window == "minute":
        return now.replace(second=0, microsecond=0)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if window == "daily" else day.replace(day=1)


def _seconds_to_reset(now: datetime, window: str) -> int:
    start = _window_start(now, window)
    if window == "minute":
        end = start + timedelta(minutes=1)
    elif window == "daily":
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


def _tokens_used(records: Q) -> int:
    """Tokens of the matching requests: what settled ones used, what pending ones' holds assume."""
    row = UsageRecord.objects.filter(records).aggregate(
        used=Sum(F("prompt_tokens") + F("completion_tokens"), filter=~Q(status=UsageStatus.PENDING)),
        held=Sum("held_tokens", filter=Q(status=UsageStatus.PENDING)),
    )
    return int((row["used"] or 0) + (row["held"] or 0))


def _run_spent(user_id: int, run: str) -> int:
    """What the user's run spent: its requests and the tool charges labelled with it."""
    return _spent(Q(user_id=user_id, run=run), Q(wallet__user_id=user_id, **{f"metadata__{CHARGE_RUN_FIELD}": run}))


def _run_steps_taken(user_id: int, run: str) -> int:
    """Model calls of the user's run that were admitted (a refused request is no step)."""
    return UsageRecord.objects.filter(user_id=user_id, run=run).exclude(status=UsageStatus.REFUSED).count()


@dataclass(frozen=True)
class _Cap:
    """One counter with a ceiling: a spend cap or a token limit of a key, a user or a run."""

    key: str
    limit: int
    timeout: int  # seconds the counter is kept
    initial: Callable[[], int]  # what a lost counter is rebuilt from
    message: str
    code: str
    retry_after: int
    scope: str  # "api_key" | "user" | "member" | "run"
    unit: str  # "usd" | "tokens"
    organization: int | None = None  # a member's cap: the organization it is inside


def _reserve(caps: list[_Cap], amount: int, keys: list[str], *, user_id: int, api_key, run: str) -> None:
    """Add ``amount`` to each cap's counter, recording each key moved in ``keys``; at the first
    one over its limit, raise ``LimitExceeded`` (the caller gives back what ``keys`` holds).
    Checking after the increment means concurrent requests can never both squeeze under a cap."""
    for cap in caps:
        total = _incr(cap.key, amount, cap.timeout, cap.initial)
        keys.append(cap.key)
        if total > cap.limit:
            notices.cap_reached(
                user_id=user_id,
                api_key=api_key,
                run=run,
                counter=cap.key,
                limit=cap.limit,
                code=cap.code,
                message=cap.message,
                retry_after=cap.retry_after,
                scope=cap.scope,
                unit=cap.unit,
                organization_id=cap.organization,
            )
            raise LimitExceeded(cap.message, cap.code, cap.retry_after)


_SCOPES = {"key": "api_key", "user": "user", "member": "member"}


def _spend_caps(subject: _Subject, now: datetime) -> list[_Cap]:
    caps = []
    for window in ("daily", "monthly"):
        cap = subject.limits.get(f"{window}_spend")
        if cap is None:
            continue
        start = _window_start(now, window)
        records, tools = subject.records(), subject.tool_charges()
        message, code = subject.spend_refusal(window, cap)
        caps.append(
            _Cap(
                key=f"{subject.counter('spend')}:{window}:{start:%Y%m%d}",
                limit=cap,
                timeout=_seconds_to_reset(now, window) + DAY,
                initial=partial(_spent, records & Q(created_at__gte=start), tools & Q(created_at__gte=start)),
                message=message,
                code=code,
                retry_after=_seconds_to_reset(now, window),
                scope=_SCOPES[subject.kind],
                unit="usd",
                organization=subject.organization,
            )
        )
    return caps


def _token_caps(subject: _Subject, now: datetime) -> list[_Cap]:
    caps = []
    for name, window, stamp, per in (("tpm", "minute", "%Y%m%d%H%M", "minute"), ("tpd", "daily", "%Y%m%d", "day")):
        most = subject.limits.get(name)
        if not most:
            continue
        start = _window_start(now, window)
        records = subject.records()
        caps.append(
            _Cap(
                key=f"{subject.counter('tokens')}:{name}:{start:{stamp}}",
                limit=most,
                timeout=_seconds_to_reset(now, window) + 60,
                initial=partial(_tokens_used, records & Q(created_at__gte=start)),
                message=(
                    f"{subject.whose} reached its limit of {most} tokens per {per} "
                    "(requests in flight count the tokens their holds assume)."
                ),
                code=subject.code("token_limit_reached"),
                retry_after=_seconds_to_reset(now, window),
                scope=_SCOPES[subject.kind],
                unit="tokens",
            )
        )
    return caps


def reserve_spend(
    *,
    api_key,
    run: str,
    user_id: int,
    amount: int,
    now: datetime,
    run_max_spend: int = 0,
    user=None,
    subjects=None,
) -> Reservation:
    """Count ``amount`` (a hold, or a tool charge) against the key's and the user's spend caps
    and the run's spend limit (``run_max_spend``: the request's own, in nanodollars; 0 for none)."""
    reservation = Reservation(amount=amount)
    caps = [cap for subject in _subjects(api_key, user, subjects) for cap in _spend_caps(subject, now)]
    run_cap = _run_max_spend(run, api_key, run_max_spend)
    if run_cap:
        caps.append(
            _Cap(
                key=_run_key(user_id, run, "spend"),
                limit=run_cap,
                timeout=RUN_TTL,
                initial=lambda: _run_spent(user_id, run),
                message=f"This agent run reached its spend limit of ${format_usd(run_cap)}.",
                code="run_spend_limit",
                retry_after=3600,
                scope="run",
                unit="usd",
            )
        )
    try:
        _reserve(caps, amount, reservation.keys, user_id=user_id, api_key=api_key, run=run)
    except LimitExceeded:
        release(reservation)
        raise
    return reservation


def reserve_tokens(reservation: Reservation, *, api_key, user, tokens: int, now: datetime, subjects=None) -> None:
    """Count ``tokens`` (what a request's hold assumes) against the key's and the user's tokens
    per minute and per day, onto ``reservation``; over one, raise ``LimitExceeded`` having given
    back these tokens (the caller releases the rest of the reservation)."""
    caps = [cap for subject in _subjects(api_key, user, subjects) for cap in _token_caps(subject, now)]
    reservation.tokens = tokens
    try:
        _reserve(caps, tokens, reservation.token_keys, user_id=user.pk, api_key=api_key, run="")
    except LimitExceeded:
        _move(reservation.token_keys, -tokens)
        reservation.token_keys, reservation.tokens = [], 0
        raise


def member_uses_counters(membership) -> bool:
    """Would ``reserve_member_spend`` touch the cache? (See ``uses_counters``.)"""
    return _member_subject(membership) is not None


def reserve_member_spend(
    reservation: Reservation, *, membership, amount: int, now: datetime, api_key, run: str = ""
) -> None:
    """Count ``amount`` against the member's spend caps inside the organization the request bills
    (``membership``: ``orgs.Membership``, or None for an organization's own key), onto
    ``reservation`` (so settlement moves them with the key's and the user's); over one, raise
    ``LimitExceeded`` having given back everything ``reservation`` holds."""
    subject = _member_subject(membership)
    if subject is None:
        return
    try:
        _reserve(_spend_caps(subject, now), amount, reservation.keys, user_id=subject.ident, api_key=api_key, run=run)
    except LimitExceeded:
        release(reservation)
        raise


def _move(keys: list[str], delta: int) -> None:
    if delta:
        for key in keys:
            try:
                cache.incr(key, delta)
            except ValueError:  # the window's counter expired meanwhile; nothing to correct
                pass


def adjust(reservation: Reservation, new_amount: int, tokens: int | None = None) -> None:
    """Move every reserved spend counter to ``new_amount`` (a clamped hold, or the final charge),
    and the token counters to ``tokens`` when given (the clamped hold's, or the tokens used)."""
    _move(reservation.keys, new_amount - reservation.amount)
    reservation.amount = new_amount
    if tokens is not None:
        _move(reservation.token_keys, tokens - reservation.tokens)
        reservation.tokens = tokens


def release(reservation: Reservation) -> None:
    """The request did not happen: its reservations, its run step and its slots are given back."""
    adjust(reservation, 0, 0)
    if reservation.step_key is not None:
        _give_back_step(reservation.step_key)
        reservation.step_key = None
    release_parallel(reservation)


def release_parallel(reservation: Reservation) -> None:
    """The request is over: its in-flight slots are given back."""
    for key in reservation.parallel_keys:
        _give_back_step(key)
    reservation.parallel_keys = []


def _give_back_step(key: str) -> None:
    try:
        cache.decr(key)
    except ValueError:  # expired meanwhile: nothing to give back to
        pass


async def aadjust(reservation: Reservation, new_amount: int, tokens: int | None = None) -> None:
    """``adjust`` for async callers: a reservation that moved no counter needs no cache trip.

    Best effort: it runs beside money that has already moved (a hold taken, a charge committed),
    and a cache (Redis) that fails then must not fail the request — the client would retry and
    pay twice. The counter is left where it was, which the next window starts afresh from.
    """
    spend_moves = reservation.keys and new_amount != reservation.amount
    token_moves = tokens is not None and reservation.token_keys and tokens != reservation.tokens
    if spend_moves or token_moves:
        try:
            await adb.in_thread(adjust)(reservation, new_amount, tokens)
        except Exception:
            log.exception(
                "counters %s could not be moved to %s (tokens %s)",
                reservation.keys + reservation.token_keys,
                new_amount,
                tokens,
            )
    reservation.amount = new_amount
    if tokens is not None:
        reservation.tokens = tokens


async def arelease(reservation: Reservation) -> None:
    """``release`` for async callers, best effort likewise (see ``aadjust``)."""
    await aadjust(reservation, 0, 0)
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
    if reservation.parallel_keys:
        try:
            await adb.in_thread(release_parallel)(reservation)
        except Exception:
            log.exception("in-flight counters %s could not be given back", reservation.parallel_keys)
        reservation.parallel_keys = []


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
