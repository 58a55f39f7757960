"""State changes for notifications: writing events into the outbox, dispatching them to
deliveries, claiming deliveries, recording what each attempt did, and staff's actions.

Delivery policy (read before changing anything here):

* ``event_emit`` joins the caller's transaction: the event commits with its cause or not at all.
  Nothing here is sent from a request; the worker (``manage.py deliver_webhooks``) polls the outbox.
* Dispatch freezes an event's body once and fans it out to one ``Delivery`` per enabled endpoint
  that wants its type, plus the user's email when the type has one. Claimed with ``SKIP LOCKED``
  so two workers dispatch different events; ``(event, endpoint)`` is UNIQUE besides.
* A claim is a lease: one short transaction marks the rows with a token and ``lease_until`` and
  counts the attempt; the HTTP request (or SMTP send) happens after it, in no transaction; the
  result is written only under the same token. A worker killed mid-send leaves the lease to run
  out, and the next claim retries the delivery with the same event id. The lease is longer than
  the worst case of one attempt (``sender.TIMEOUT``), so no two workers send one delivery at once.
* On PostgreSQL the claim is ``SELECT … FOR UPDATE SKIP LOCKED`` then the UPDATE; on SQLite the
  same code runs in an IMMEDIATE transaction, which takes the database's write lock at BEGIN, so
  claims are serialized there (and ``skip_locked`` is ignored).
* Retries back off exponentially with ±25 % jitter for about a day (``RETRY_DELAYS``), then the
  delivery is ``failed``. An endpoint failing continuously for ``DISABLE_AFTER`` (or answering
  410 Gone) is disabled and staff are alerted.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from . import emails
from .models import (
    PAYLOAD_VERSION,
    SUBSCRIBABLE,
    Alert,
    Attempt,
    Channel,
    Delivery,
    DeliveryStatus,
    Endpoint,
    Event,
    EventType,
    JobMark,
    Preference,
    new_secret,
    webhook_url_validator,
)

if TYPE_CHECKING:
    from django.contrib.auth.models import _User  # the AUTH_USER_MODEL, as emails explains

log = logging.getLogger(__name__)

# Delay after the n-th failed attempt (exponential, ×3, capped at 8 h), before jitter: the
# eleventh attempt comes about 25 hours after the first, and a failure then is final.
RETRY_DELAYS = [timedelta(seconds=min(10 * 3**n, 8 * 3600)) for n in range(10)]
MAX_ATTEMPTS = len(RETRY_DELAYS) + 1
JITTER = 0.25  # each delay is drawn from ±25 % around the schedule
DISABLE_AFTER = timedelta(days=3)  # an endpoint failing without a success this long is disabled
MAX_RETRY_AFTER = timedelta(hours=8)  # a receiver's Retry-After is honoured up to this


class NotifyError(Exception):
    pass


# --- writing to the outbox ------------------------------------------------------------------------


def event_emit(*, type: str, user_id: int | None, data: dict, dedup_key: str | None = None) -> None:
    """Write an event into the outbox, inside the caller's transaction (the event commits with its
    cause). With ``dedup_key`` a second event under the same key is silently not written."""
    if type not in EventType.values:
        raise NotifyError(f"unknown event type {type!r}")
    event = Event(type=type, user_id=user_id, data=data, dedup_key=dedup_key)
    if dedup_key is None:
        event.save(force_insert=True)
    else:
        # ON CONFLICT DO NOTHING: a repeat must not raise inside (and so poison) the caller's transaction.
        Event.objects.bulk_create([event], ignore_conflicts=True)


def event_emit_once(*, type: str, user_id: int | None, data: dict, dedup_key: str, ttl: int) -> None:
    """``event_emit`` for a condition that repeats many times a second (every refused request of a
    full spend cap): the cache remembers the key for ``ttl`` seconds so repeats cost no database
    write; the UNIQUE ``dedup_key`` stays the guarantee. Its own transaction, best effort — the
    request it describes has already been refused and must stay refused, not fail."""
    remembered = f"tt:notify:{dedup_key}"
    try:
        if not cache.add(remembered, 1, ttl):
            return
        with transaction.atomic():
            event_emit(type=type, user_id=user_id, data=data, dedup_key=dedup_key)
    except Exception:
        log.exception("could not write the %s event %s", type, dedup_key)
        with suppress(Exception):  # the cache itself may be what failed
            cache.delete(remembered)  # so that the next repeat tries again


# --- dispatch ---------------------------------------------------------------------------------------


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def event_body(event: Event) -> str:
    """The JSON body of every delivery of ``event``: the Standard Webhooks envelope (``type``,
    ``timestamp``, ``data``) plus our ``id`` and payload ``version``. ``data.user`` is the user as
    of dispatch. Keys sorted, no spaces: the same bytes whichever database stored the data."""
    user = event.user
    data = {**event.data, "user": {"id": user.pk, "email": user.email} if user is not None else None}
    envelope = {
        "id": event.id,
        "type": event.type,
        "version": PAYLOAD_VERSION,
        "timestamp": _timestamp(event.created_at),
        "data": data,
    }
    return json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def events_dispatch(*, limit: int = 200, now: datetime | None = None) -> int:
    """Freeze the bodies of new events and create their deliveries; how many were dispatched."""
    now = now or timezone.now()
    with transaction.atomic():
        batch = list(
            Event.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(dispatched_at__isnull=True)
            .select_related("user")
            .order_by("created_at", "id")[:limit]
        )
        if not batch:
            return 0
        endpoints = list(Endpoint.objects.filter(enabled=True))
        deliveries: list[Delivery] = []
        for event in batch:
            event.body, event.dispatched_at = event_body(event), now
            deliveries.extend(
                Delivery(event=event, endpoint=endpoint, channel=Channel.WEBHOOK, next_attempt_at=now, created_at=now)
                for endpoint in endpoints
                if endpoint.wants(event.type)
            )
            if emails.has_email(event):
                deliveries.append(Delivery(event=event, channel=Channel.EMAIL, next_attempt_at=now, created_at=now))
        Delivery.objects.bulk_create(deliveries, ignore_conflicts=True)
        Event.objects.bulk_update(batch, ["body", "dispatched_at"])
    return len(batch)


# --- claiming and recording -------------------------------------------------------------------------


def deliveries_claim(*, limit: int, lease: timedelta, now: datetime | None = None) -> tuple[str, list[Delivery]]:
    """Lease up to ``limit`` due deliveries to the caller: (the lease's token, the deliveries)."""
    now = now or timezone.now()
    token = secrets.token_hex(16)
    with transaction.atomic():
        due = (
            Delivery.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(status=DeliveryStatus.PENDING, next_attempt_at__lte=now)
            .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
            .filter(Q(endpoint__isnull=True) | Q(endpoint__enabled=True))
            .order_by("next_attempt_at", "id")
        )
        ids = list(due.values_list("id", flat=True)[:limit])
        if ids:
            Delivery.objects.filter(id__in=ids).update(
                lease_until=now + lease, lease_token=token, attempts=F("attempts") + 1
            )
    if not ids:
        return token, []
    claimed = Delivery.objects.filter(id__in=ids, lease_token=token).select_related("event", "event__user", "endpoint")
    return token, list(claimed.order_by("next_attempt_at", "id"))


@dataclass(frozen=True)
class Result:
    """What one attempt did."""

    ok: bool
    status_code: int | None = None
    latency_ms: int | None = None
    error: str = ""
    retry_after: timedelta | None = None  # the receiver's Retry-After, if it sent one
    skipped: bool = False  # nothing to send (an email the user turned off): final, not a failure


def retry_delay(attempts: int, retry_after: timedelta | None = None) -> timedelta:
    """The pause after the ``attempts``-th failed attempt: the schedule with jitter, or the
    receiver's Retry-After when that is longer (up to ``MAX_RETRY_AFTER``)."""
    base = RETRY_DELAYS[min(attempts, len(RETRY_DELAYS)) - 1]
    delay = base * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311 (jitter, not a secret)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


def delivery_record(*, delivery: Delivery, token: str, result: Result, now: datetime | None = None) -> Delivery:
    """Log the attempt and move the delivery on: delivered, retried later, or given up. Counts
    only while ``token`` still holds the lease (a worker whose lease ran out changes nothing but
    the log). Endpoint health moves with it; see ``_endpoint_health``."""
    now = now or timezone.now()
    fields: dict = {
        "lease_until": None,
        "lease_token": "",
        "last_status_code": result.status_code,
        "last_error": result.error[:500],
        "last_latency_ms": result.latency_ms,
    }
    if result.ok or result.skipped:
        fields.update(status=DeliveryStatus.DELIVERED if result.ok else DeliveryStatus.SKIPPED, finished_at=now)
    elif delivery.attempts >= MAX_ATTEMPTS:
        fields.update(status=DeliveryStatus.FAILED, finished_at=now)
    else:
        fields["next_attempt_at"] = now + retry_delay(delivery.attempts, result.retry_after)
    with transaction.atomic():
        Attempt.objects.create(
            delivery=delivery,
            started_at=now - timedelta(milliseconds=result.latency_ms or 0),
            ok=result.ok,
            status_code=result.status_code,
            latency_ms=result.latency_ms,
            error=result.error[:500],
        )
        mine = Delivery.objects.filter(pk=delivery.pk, lease_token=token).update(**fields)
        if mine and not result.skipped and delivery.endpoint is not None:
            _endpoint_health(delivery.endpoint, ok=result.ok, gone=result.status_code == 410, now=now)
    if mine:
        for name, value in fields.items():
            setattr(delivery, name, value)
    return delivery


def _endpoint_health(endpoint: Endpoint, *, ok: bool, gone: bool, now: datetime) -> None:
    """A success clears ``failing_since``; a failure sets it if unset. An endpoint failing since
    ``DISABLE_AFTER`` ago — or answering 410 Gone, the receiver's own "stop" — is disabled (its
    pending deliveries wait; re-enabling it resumes them) and staff are alerted, once."""
    if ok:
        Endpoint.objects.filter(pk=endpoint.pk, failing_since__isnull=False).update(failing_since=None)
        return
    Endpoint.objects.filter(pk=endpoint.pk, failing_since__isnull=True).update(failing_since=now)
    if gone:
        reason = "the receiver answered 410 Gone"
        stale = Q()
    else:
        reason = f"every delivery failed for {DISABLE_AFTER.days} days"
        stale = Q(failing_since__lte=now - DISABLE_AFTER)
    disabled = Endpoint.objects.filter(stale, pk=endpoint.pk, enabled=True).update(
        enabled=False, disabled_reason=reason
    )
    if disabled:
        _alert(
            kind="endpoint_disabled",
            message=f"Webhook endpoint {endpoint.url} was disabled: {reason}.",
            endpoint=endpoint,
        )


def _alert(*, kind: str, message: str, endpoint: Endpoint | None = None) -> Alert:
    alert = Alert.objects.create(kind=kind, message=message, endpoint=endpoint)
    staff_email_on_commit(area="webhooks", kind=kind, message=message)
    return alert


def staff_email_on_commit(*, area: str, kind: str, message: str) -> None:
    """Email ``STAFF_ALERT_EMAILS`` about an alert once its record commits (none: nobody to tell)."""
    recipients = list(settings.STAFF_ALERT_EMAILS)
    if recipients:
        subject = f"[{settings.APP_TITLE}] {area}: {kind.replace('_', ' ')}"
        # robust: a mail outage must not undo the record of what happened.
        transaction.on_commit(lambda: send_mail(subject, message, settings.DEFAULT_FROM_EMAIL, recipients), robust=True)


# --- staff --------------------------------------------------------------------------------------------


def event_types_clean(raw: Iterable[str]) -> list[str]:
    """The event types an endpoint may subscribe to, checked: an unknown one is refused by name."""
    known = {value for value, _label in SUBSCRIBABLE}
    chosen = list(dict.fromkeys(raw))
    unknown = [value for value in chosen if value not in known]
    if unknown:
        raise ValidationError(
            f"Unknown event type{'s' if len(unknown) > 1 else ''}: {', '.join(map(repr, unknown))}. "
            f"Known: {', '.join(sorted(known))}."
        )
    if not chosen:
        raise ValidationError("Choose at least one event type.")
    return chosen


def endpoint_create(*, url: str, event_types: Iterable[str], description: str = "", enabled: bool = True) -> Endpoint:
    webhook_url_validator(url)
    endpoint = Endpoint(url=url, event_types=event_types_clean(event_types), description=description, enabled=enabled)
    endpoint.save()
    return endpoint


def endpoint_secret_regenerate(*, endpoint: Endpoint) -> Endpoint:
    """A new signing secret; deliveries from now on are signed with it (the old one stops working)."""
    endpoint.secret = new_secret()
    Endpoint.objects.filter(pk=endpoint.pk).update(secret=endpoint.secret)
    return endpoint


def endpoint_enable(*, endpoint: Endpoint) -> Endpoint:
    """Staff turn an endpoint (back) on: its failure streak starts afresh."""
    Endpoint.objects.filter(pk=endpoint.pk).update(enabled=True, failing_since=None, disabled_reason="")
    endpoint.refresh_from_db()
    return endpoint


def endpoint_send_test(*, endpoint: Endpoint, now: datetime | None = None) -> Delivery:
    """A ``webhook.test`` event for this one endpoint, delivered by the worker like any other."""
    now = now or timezone.now()
    with transaction.atomic():
        event = Event(
            type=EventType.WEBHOOK_TEST, data={"endpoint": endpoint.pk, "message": "Test event"}, created_at=now
        )
        event.body, event.dispatched_at = event_body(event), now
        event.save(force_insert=True)
        return Delivery.objects.create(event=event, endpoint=endpoint, next_attempt_at=now, created_at=now)


def delivery_replay(*, delivery: Delivery, now: datetime | None = None) -> bool:
    """Send a finished delivery again (same event id and body) with a fresh retry cycle. False if
    it is still pending (the worker has it in hand already)."""
    now = now or timezone.now()
    return bool(
        Delivery.objects.exclude(status=DeliveryStatus.PENDING)
        .filter(pk=delivery.pk)
        .update(
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            lease_until=None,
            lease_token="",
            finished_at=None,
        )
    )


def alert_resolve(*, alert: Alert) -> None:
    Alert.objects.filter(pk=alert.pk).update(resolved=True)


# --- users' choices -----------------------------------------------------------------------------------


def preference_get(*, user) -> Preference:
    """The user's email choices (the defaults, unsaved, when they never chose)."""
    return Preference.objects.filter(user=user).first() or Preference(user=user)


def preference_update(*, user, **choices: bool) -> Preference:
    unknown = set(choices) - set(emails.PREFERENCE_FIELDS)
    if unknown:
        raise NotifyError(f"unknown email preference {sorted(unknown)}")
    preference, _ = Preference.objects.update_or_create(user=user, defaults=choices)
    return preference


def unsubscribe(*, token: str) -> tuple[_User, str] | None:
    """One click from an email: turn that kind of email off for the token's user. Idempotent.
    Returns (user, the preference field turned off), or None for a token that is not ours."""
    found = emails.unsubscribe_token_read(token)
    if found is None:
        return None
    user, field = found
    Preference.objects.update_or_create(user=user, defaults={field: False})
    return user, field


# --- periodic producers -------------------------------------------------------------------------------

MAX_CATCH_UP = timedelta(hours=24)


def job_hours_due(*, name: str, now: datetime | None = None) -> list[datetime]:
    """The whole hours (their starts) job ``name`` has not done yet, oldest first — at most a day
    back. Read only: ``job_hour_done`` moves the mark after the hour's events are written."""
    now = now or timezone.now()
    this_hour = now.replace(minute=0, second=0, microsecond=0)
    mark = JobMark.objects.filter(name=name).values_list("done_until", flat=True).first()
    start = max(mark or this_hour - timedelta(hours=1), this_hour - MAX_CATCH_UP)
    hours = []
    while start < this_hour:
        hours.append(start)
        start += timedelta(hours=1)
    return hours


def job_hour_done(*, name: str, hour: datetime) -> None:
    """Mark the hour starting at ``hour`` done (call inside the transaction that wrote its events)."""
    until = hour + timedelta(hours=1)
    updated = JobMark.objects.filter(name=name, done_until__lt=until).update(done_until=until)
    if not updated:
        JobMark.objects.bulk_create([JobMark(name=name, done_until=until)], ignore_conflicts=True)


def endpoints_want(event_type: str) -> bool:
    """Does any enabled endpoint subscribe to ``event_type``? (Producers of optional events ask.)"""
    return any(endpoint.wants(event_type) for endpoint in Endpoint.objects.filter(enabled=True).only("event_types"))
