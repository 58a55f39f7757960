"""Outbound webhooks, delivered by the worker to loopback receivers: signed so off-the-shelf code
verifies them, retried with backoff, given up after about a day, endpoints disabled after failing
for days, crash-safe (a worker killed mid-delivery loses nothing) and never sent twice at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from itertools import pairwise

import pytest
from django.core import mail
from django.db import transaction
from django.utils import timezone
from standardwebhooks import Webhook

from notify import services
from notify.models import Alert, Attempt, Delivery, DeliveryStatus, Endpoint, Event
from notify.services import MAX_ATTEMPTS, RETRY_DELAYS, endpoint_create, event_emit
from notify.worker import Worker
from tests.conftest import race
from tests.live import BASE_DIR, free_port, shared_database_url
from tests.webhook_receiver import Reply, receiver


@pytest.fixture
def hooks():
    with receiver() as running:
        yield running


def emit(user=None, type="key.created", data=None) -> Event:
    with transaction.atomic():
        event_emit(type=type, user_id=user.pk if user else None, data=data or {"api_key": {"id": 1}})
    return Event.objects.order_by("-created_at").first()


def deliver(**options) -> int:
    worker = Worker(**options)
    try:
        return worker.run_once()
    finally:
        worker.close()


def make_due() -> None:
    """Skip the backoff wait: every pending delivery is due now."""
    Delivery.objects.filter(status=DeliveryStatus.PENDING).update(next_attempt_at=timezone.now())


def endpoint(url: str, *types: str) -> Endpoint:
    return endpoint_create(url=url, event_types=list(types or ["key.created"]))


@pytest.mark.django_db
def test_a_delivery_is_signed_so_the_standardwebhooks_library_verifies_it(hooks, alice):
    hook = endpoint(hooks.script("/ok", Reply(200)))
    event = emit(alice, data={"api_key": {"id": 7, "prefix": "tt_abc"}})

    assert deliver() == 2  # one event dispatched, one delivery attempted

    (received,) = hooks.to("/ok")
    payload = Webhook(hook.secret).verify(received.body, received.headers)  # raises unless signed right
    assert received.webhook_id == event.id and event.id.startswith("evt_")
    assert payload["id"] == event.id and payload["type"] == "key.created" and payload["version"] == 1
    assert payload["timestamp"].endswith("Z")
    assert payload["data"] == {"api_key": {"id": 7, "prefix": "tt_abc"}, "user": {"id": alice.pk, "email": alice.email}}
    assert received.headers["content-type"] == "application/json"
    assert received.headers["webhook-signature"].startswith("v1,")
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == (DeliveryStatus.DELIVERED, 1, 200)
    assert delivery.last_latency_ms is not None and delivery.lease_token == ""
    (attempt,) = Attempt.objects.all()
    assert attempt.ok and attempt.status_code == 200


@pytest.mark.django_db
def test_a_signature_made_with_another_secret_does_not_verify(hooks, alice):
    endpoint(hooks.script("/ok", Reply(200)))
    emit(alice)
    deliver()
    (received,) = hooks.to("/ok")
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(Endpoint.objects.get().secret[:-8] + "AAAAAAA=").verify(received.body, received.headers)


def test_the_signature_matches_the_specs_worked_example():
    """The Standard Webhooks reference example, signed by our header builder."""
    from datetime import UTC, datetime

    from notify.sender import signed_headers

    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    headers = signed_headers(
        secret=secret,
        event_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        body='{"test": 2432232314}',
        at=datetime.fromtimestamp(1614265330, tz=UTC),
    )
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


@pytest.mark.django_db
def test_a_receiver_answering_500_gets_the_same_event_again_after_a_backoff(hooks, alice):
    endpoint(hooks.script("/flaky", Reply(500), Reply(200)))
    event = emit(alice)

    before = timezone.now()
    deliver()
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == (DeliveryStatus.PENDING, 1, 500)
    assert delivery.last_error == "HTTP 500"
    # The first retry waits 10 s, ±25 % jitter.
    assert before + timedelta(seconds=7.5) <= delivery.next_attempt_at <= timezone.now() + timedelta(seconds=12.5)
    deliver()
    assert len(hooks.to("/flaky")) == 1  # not due yet

    make_due()
    deliver()
    first, second = hooks.to("/flaky")
    assert first.webhook_id == second.webhook_id == event.id
    assert first.body == second.body  # the same frozen body, re-signed with this attempt's timestamp
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.DELIVERED, 2)
    assert [a.ok for a in Attempt.objects.order_by("id")] == [False, True]


@pytest.mark.django_db
def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt_retried_later(hooks, alice):
    endpoint(hooks.script("/slow", Reply(200, delay=3)))
    emit(alice)
    deliver(timeout=0.5)
    delivery = Delivery.objects.get()
    assert delivery.status == DeliveryStatus.PENDING and delivery.attempts == 1
    assert delivery.last_error.startswith("timed out") and delivery.last_status_code is None


@pytest.mark.django_db
def test_a_refused_connection_is_a_failed_attempt_retried_later(alice):
    endpoint(f"http://127.0.0.1:{free_port()}/nobody-listens")
    emit(alice)
    deliver()
    delivery = Delivery.objects.get()
    assert delivery.status == DeliveryStatus.PENDING and delivery.attempts == 1
    assert "ConnectError" in delivery.last_error


@pytest.mark.django_db
def test_a_slow_receiver_within_the_timeout_is_delivered_beside_a_fast_one(hooks, alice):
    slow = endpoint(hooks.script("/slow", Reply(200, delay=1.5)))
    fast = endpoint(hooks.script("/fast", Reply(200)))
    emit(alice)
    deliver()
    by_endpoint = {d.endpoint_id: d for d in Delivery.objects.all()}
    assert {d.status for d in by_endpoint.values()} == {DeliveryStatus.DELIVERED}
    assert by_endpoint[slow.pk].last_latency_ms >= 1500
    assert by_endpoint[fast.pk].last_latency_ms < by_endpoint[slow.pk].last_latency_ms


def test_the_retry_schedule_backs_off_exponentially_for_about_a_day():
    seconds = [delay.total_seconds() for delay in RETRY_DELAYS]
    assert seconds[:4] == [10, 30, 90, 270]
    assert all(later >= earlier for earlier, later in pairwise(seconds))
    assert 20 * 3600 <= sum(seconds) <= 30 * 3600
    for attempts in range(1, MAX_ATTEMPTS):
        base = RETRY_DELAYS[attempts - 1]
        for _ in range(20):
            assert base * 0.75 <= services.retry_delay(attempts) <= base * 1.25


@pytest.mark.django_db
def test_after_the_last_retry_the_delivery_is_marked_failed(hooks, alice):
    endpoint(hooks.script("/down", Reply(500)))
    emit(alice)
    for _ in range(MAX_ATTEMPTS):
        make_due()
        deliver()
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.FAILED, MAX_ATTEMPTS)
    make_due()
    deliver()
    assert len(hooks.to("/down")) == MAX_ATTEMPTS  # given up: no more attempts


@pytest.mark.django_db
def test_a_receivers_retry_after_is_honoured(hooks, alice):
    endpoint(hooks.script("/busy", Reply(503, headers={"Retry-After": "600"})))
    emit(alice)
    before = timezone.now()
    deliver()
    assert Delivery.objects.get().next_attempt_at >= before + timedelta(seconds=600)


@pytest.mark.django_db
def test_an_endpoint_failing_for_days_is_disabled_and_staff_are_alerted(
    hooks, alice, settings, django_capture_on_commit_callbacks
):
    settings.STAFF_ALERT_EMAILS = ["ops@example.com"]
    hook = endpoint(hooks.script("/dead", Reply(500)))
    emit(alice)
    deliver()
    hook.refresh_from_db()
    assert hook.enabled and hook.failing_since is not None  # one failure: not yet

    Endpoint.objects.filter(pk=hook.pk).update(failing_since=timezone.now() - timedelta(days=3, minutes=1))
    make_due()
    with django_capture_on_commit_callbacks(execute=True):
        deliver()
    hook.refresh_from_db()
    assert not hook.enabled and "3 days" in hook.disabled_reason
    (alert,) = Alert.objects.all()
    assert alert.endpoint == hook and not alert.resolved
    (staff_mail,) = mail.outbox
    assert staff_mail.to == ["ops@example.com"] and hook.url in staff_mail.body

    # Its pending delivery waits while it is disabled (new events are not sent to it), and goes
    # again when staff enable it.
    emit(alice)
    make_due()
    deliver()
    assert len(hooks.to("/dead")) == 2 and Delivery.objects.count() == 1
    services.endpoint_enable(endpoint=hook)
    hooks.script("/dead", Reply(200))
    make_due()
    deliver()
    assert Delivery.objects.get().status == DeliveryStatus.DELIVERED
    hook.refresh_from_db()
    assert hook.enabled and hook.failing_since is None


@pytest.mark.django_db
def test_a_410_gone_disables_the_endpoint_at_once(hooks, alice):
    hook = endpoint(hooks.script("/gone", Reply(410)))
    emit(alice)
    deliver()
    hook.refresh_from_db()
    assert not hook.enabled and "410" in hook.disabled_reason
    assert Alert.objects.filter(endpoint=hook).count() == 1


@pytest.mark.django_db
def test_an_event_goes_only_to_enabled_endpoints_that_chose_its_type(hooks, alice):
    endpoint(hooks.script("/keys", Reply(200)), "key.created", "key.revoked")
    endpoint(hooks.script("/money", Reply(200)), "payment.succeeded")
    off = endpoint(hooks.script("/off", Reply(200)), "key.created")
    Endpoint.objects.filter(pk=off.pk).update(enabled=False)
    emit(alice, type="key.revoked")
    deliver()
    assert [r.path for r in hooks.received] == ["/keys"]


@pytest.mark.django_db
def test_replay_sends_a_delivered_event_again_under_its_id(hooks, alice):
    endpoint(hooks.script("/ok", Reply(200)))
    event = emit(alice)
    deliver()
    delivery = Delivery.objects.get()
    assert services.delivery_replay(delivery=delivery)
    assert not services.delivery_replay(delivery=delivery)  # already pending: the worker has it
    deliver()
    assert [r.webhook_id for r in hooks.to("/ok")] == [event.id, event.id]


@pytest.mark.django_db
def test_an_event_written_in_a_rolled_back_transaction_never_exists(hooks, alice):
    endpoint(hooks.script("/ok", Reply(200)))
    with pytest.raises(RuntimeError), transaction.atomic():
        event_emit(type="key.created", user_id=alice.pk, data={})
        raise RuntimeError("the cause failed")
    assert deliver() == 0 and not Event.objects.exists()


def test_an_unknown_event_type_is_refused_at_entry():
    with pytest.raises(services.NotifyError, match=r"unknown event type 'balance\.lowish'"):
        event_emit(type="balance.lowish", user_id=None, data={})


# --- crashes and concurrency --------------------------------------------------------------------------


def run_worker_process() -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL"}}
    env.update(
        DATABASE_URL=shared_database_url(), DJANGO_SETTINGS_MODULE="config.settings", PYTHONDONTWRITEBYTECODE="1"
    )
    command = [sys.executable, "manage.py", "deliver_webhooks", "--once"]
    return subprocess.Popen(command, cwd=BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_delivery_loses_nothing_and_the_retry_keeps_the_event_id(hooks, alice):
    # Three events; the receiver hangs on the first request it gets and answers the others.
    endpoint(hooks.script("/hook", Reply(hang=True), Reply(200)))
    events = [emit(alice, data={"n": n}) for n in range(3)]

    worker = run_worker_process()
    try:
        hooks.wait_for(3)
        deadline = time.monotonic() + 30
        while Delivery.objects.filter(status=DeliveryStatus.DELIVERED).count() < 2:  # the other two are recorded
            assert time.monotonic() < deadline, "the answered deliveries were not recorded"
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)  # mid-delivery: no cleanup, no finally blocks
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
    hooks.released.set()  # the hung request's socket is gone; let its handler finish
    hooks.wait_idle()
    hung_id = hooks.received[0].webhook_id

    stuck = Delivery.objects.get(status=DeliveryStatus.PENDING)
    assert stuck.event_id == hung_id and stuck.attempts == 1 and stuck.lease_until > timezone.now()
    assert deliver() == 0  # still leased to the dead worker: nobody else sends it meanwhile

    Delivery.objects.filter(pk=stuck.pk).update(lease_until=timezone.now() - timedelta(seconds=1))  # the lease runs out
    deliver()
    assert Delivery.objects.filter(status=DeliveryStatus.DELIVERED).count() == 3
    ids = [r.webhook_id for r in hooks.received]
    assert sorted(set(ids)) == sorted(e.id for e in events)
    assert [i for i in ids if ids.count(i) > 1] == [hung_id, hung_id]  # the only repeat: the retry, same id
    assert hooks.overlaps == []


@pytest.mark.django_db(transaction=True)
def test_two_workers_never_deliver_one_event_at_once(hooks, alice):
    endpoint(hooks.script("/hook", Reply(200, delay=0.02)))
    endpoint(hooks.script("/other", Reply(200)))
    events = [emit(alice, data={"n": n}) for n in range(24)]

    def work(_index: int) -> int:
        done = 0
        worker = Worker(concurrency=3)
        try:
            while (did := worker.run_once()) or Delivery.objects.filter(status=DeliveryStatus.PENDING).exists():
                done += did
        finally:
            worker.close()
        return done

    results = race(work, 3)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert hooks.overlaps == []
    for path in ("/hook", "/other"):
        ids = [r.webhook_id for r in hooks.to(path)]
        assert sorted(ids) == sorted(e.id for e in events)  # each exactly once
    assert Delivery.objects.filter(status=DeliveryStatus.DELIVERED).count() == 48
    assert Attempt.objects.count() == 48
