"""The delivery worker's loop (``manage.py deliver_webhooks``). Several may run at once.

Each round: run the periodic producers that are due (the hourly usage summary), dispatch new
events into deliveries, claim the deliveries that are due under a lease, send them side by side
in threads (network only — no database there), then record each result under the lease's token.
A round with nothing to do sleeps ``interval`` seconds; one that was busy goes again at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime

from django.db import close_old_connections, transaction

from . import emails, sender, services
from .models import Channel, Delivery

log = logging.getLogger(__name__)

# Hourly producers other apps register (``register_hourly``): name → (event type, producer). A
# producer writes the events of the hour [start, start + 1 h) with ``services.event_emit`` and
# dedup keys; it runs only while some enabled endpoint subscribes to its event type.
_hourly: dict[str, tuple[str, Callable[[datetime], None]]] = {}


def register_hourly(name: str, event_type: str, producer: Callable[[datetime], None]) -> None:
    """Called from an app's ``ready()``: this app cannot import the apps above it."""
    _hourly[name] = (event_type, producer)


def run_hourly(now: datetime | None = None) -> int:
    """Produce every hour each registered producer has not yet done; how many hours ran."""
    done = 0
    for name, (event_type, producer) in _hourly.items():
        hours = services.job_hours_due(name=name, now=now)
        if not hours:
            continue
        wanted = services.endpoints_want(event_type)
        for hour in hours:
            with transaction.atomic():
                if wanted:
                    producer(hour)
                services.job_hour_done(name=name, hour=hour)
            done += 1
    return done


@dataclass
class Worker:
    concurrency: int = 4
    timeout: float = sender.TIMEOUT
    batch: int = 50
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._http = sender.client(self.timeout)
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="deliver")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def run_once(self) -> int:
        """One round; the number of things it did (events dispatched + deliveries attempted)."""
        run_hourly()
        dispatched = services.events_dispatch()
        attempted = 0
        while not self.stop.is_set():
            token, claimed = services.deliveries_claim(limit=self.concurrency, lease=sender.LEASE)
            if not claimed:
                break
            self._deliver(token, claimed)
            attempted += len(claimed)
            if attempted >= self.batch:
                break
        return dispatched + attempted

    def run_forever(self, interval: float) -> None:
        while not self.stop.is_set():
            # Between rounds, as Django does between requests: a connection the database dropped
            # (a restart, CONN_MAX_AGE) is replaced instead of failing every round after it.
            close_old_connections()
            try:
                busy = self.run_once()
            except Exception:  # a database hiccup: log it, wait, go on (nothing is lost: the outbox holds it)
                log.exception("deliver_webhooks round failed")
                busy = 0
            if not busy:
                self.stop.wait(interval)

    def _deliver(self, token: str, claimed: list[Delivery]) -> None:
        # Render (database reads) here, send in the threads, and record each result as soon as
        # its attempt ends: a slow receiver does not hold up the record of a fast one.
        futures = {self._pool.submit(self._attempt_for(delivery)): delivery for delivery in claimed}
        for future in as_completed(futures):
            delivery, result = futures[future], future.result()
            services.delivery_record(delivery=delivery, token=token, result=result)
            _log(delivery, result)

    def _attempt_for(self, delivery: Delivery) -> Callable[[], services.Result]:
        try:
            return self._prepare(delivery)
        except Exception as exc:  # a template or data error: a failed attempt, retried and logged, not a stuck lease
            log.exception("could not prepare delivery %s", delivery.pk)
            failed = services.Result(ok=False, error=f"could not prepare: {type(exc).__name__}: {exc}"[:500])
            return lambda: failed

    def _prepare(self, delivery: Delivery) -> Callable[[], services.Result]:
        event = delivery.event
        if delivery.channel == Channel.EMAIL:
            preference = services.preference_get(user=event.user) if event.user is not None else None
            if not emails.wanted(event, preference):
                return lambda: services.Result(ok=False, skipped=True, error="not wanted: unsubscribed or no address")
            mail = emails.message(event)
            return lambda: sender.send_email(mail)
        endpoint = delivery.endpoint
        if endpoint is None:  # the channel_matches_endpoint constraint rules it out
            raise ValueError(f"webhook delivery {delivery.pk} has no endpoint")
        return lambda: sender.post(
            self._http, url=endpoint.url, secret=endpoint.secret, event_id=event.id, body=event.body
        )


def _log(delivery: Delivery, result: services.Result) -> None:
    target = delivery.endpoint.url if delivery.endpoint is not None else "email"
    if result.ok:
        log.info("delivered %s %s to %s", delivery.event.type, delivery.event_id, target)
    elif not result.skipped:
        log.warning(
            "delivery of %s to %s failed (attempt %s): %s", delivery.event_id, target, delivery.attempts, result.error
        )
