"""Staff manage webhook endpoints in the admin: validated URL and event types, the signing secret
shown once (or regenerated), a test event, the delivery log with replay, and the dashboard's list
of failing endpoints."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.admin.utils import quote
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone

from notify.models import Delivery, DeliveryStatus, Endpoint, Event
from notify.services import endpoint_create, event_types_clean

pytestmark = pytest.mark.django_db

ADD = "/admin/notify/endpoint/add/"


@pytest.fixture
def staff_client(staff):
    client = Client()
    client.force_login(staff)
    return client


def test_creating_an_endpoint_shows_its_secret_once(staff_client):
    response = staff_client.post(
        ADD,
        {"url": "https://ops.example.com/hooks", "event_types": ["balance.low", "payment.succeeded"], "enabled": "on"},
    )
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    endpoint = Endpoint.objects.get()
    assert endpoint.event_types == ["balance.low", "payment.succeeded"]
    shown = re.search(rb"data-endpoint-secret[^>]*>(whsec_[A-Za-z0-9+/=]+)<", response.content).group(1).decode()
    assert shown == endpoint.secret

    change = staff_client.get(f"/admin/notify/endpoint/{endpoint.pk}/change/")
    assert change.status_code == 200 and endpoint.secret.encode() not in change.content
    assert endpoint.secret.encode() not in staff_client.get("/admin/notify/endpoint/").content


@pytest.mark.parametrize(
    "url", ["ftp://ops.example.com/hooks", "javascript:alert(1)", "ops.example.com/hooks", "file:///etc/passwd", ""]
)
def test_a_url_that_is_not_http_or_https_is_refused(staff_client, url):
    response = staff_client.post(ADD, {"url": url, "event_types": ["balance.low"], "enabled": "on"})
    assert response.status_code == 200 and not Endpoint.objects.exists()
    assert b"errorlist" in response.content
    if url:
        assert b"Enter an http:// or https:// URL" in response.content


def test_an_unknown_event_type_is_refused(staff_client):
    response = staff_client.post(ADD, {"url": "https://ops.example.com", "event_types": ["balance.lowish"]})
    assert b"Select a valid choice. balance.lowish is not one of the available choices." in response.content
    assert not Endpoint.objects.exists()
    with pytest.raises(ValidationError, match=r"Unknown event type: 'balance\.lowish'"):
        event_types_clean(["balance.low", "balance.lowish"])
    with pytest.raises(ValidationError, match="at least one"):
        endpoint_create(url="https://ops.example.com", event_types=[])


def test_regenerating_the_secret_shows_the_new_one_once_and_replaces_the_old(staff_client):
    endpoint = endpoint_create(url="https://ops.example.com", event_types=["key.created"])
    old = endpoint.secret
    assert staff_client.get(f"/admin/notify/endpoint/{endpoint.pk}/secret/").status_code == 302  # GET never acts
    endpoint.refresh_from_db()
    assert endpoint.secret == old

    response = staff_client.post(f"/admin/notify/endpoint/{endpoint.pk}/secret/")
    endpoint.refresh_from_db()
    assert endpoint.secret != old and endpoint.secret.encode() in response.content
    assert old.encode() not in response.content


def test_send_a_test_event_queues_it_for_that_endpoint_only(staff_client):
    target = endpoint_create(url="https://a.example.com", event_types=["key.created"])
    endpoint_create(url="https://b.example.com", event_types=["key.created"])
    response = staff_client.post(f"/admin/notify/endpoint/{target.pk}/test/")
    assert response.status_code == 302
    (delivery,) = Delivery.objects.all()
    assert delivery.endpoint == target and delivery.event.type == "webhook.test"
    assert delivery.event.body and delivery.event.dispatched_at is not None


def test_the_delivery_log_shows_each_attempt_and_replay_queues_a_finished_one(staff_client):
    endpoint = endpoint_create(url="https://ops.example.com", event_types=["key.created"])
    staff_client.post(f"/admin/notify/endpoint/{endpoint.pk}/test/")
    delivery = Delivery.objects.get()
    Delivery.objects.filter(pk=delivery.pk).update(
        status=DeliveryStatus.FAILED, attempts=11, last_status_code=500, last_latency_ms=42, finished_at=timezone.now()
    )
    log = staff_client.get(f"/admin/notify/delivery/?endpoint__id__exact={endpoint.pk}")
    assert log.status_code == 200 and b"webhook.test" in log.content and b"42" in log.content

    response = staff_client.post(
        "/admin/notify/delivery/", {"action": "replay", "_selected_action": [delivery.pk]}, follow=True
    )
    assert b"Queued 1 delivery" in response.content
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 0)
    assert staff_client.get(f"/admin/notify/delivery/{delivery.pk}/change/").status_code == 200


def test_the_outbox_is_read_only_in_the_admin(staff_client, alice):
    from notify.services import event_emit

    event_emit(type="key.created", user_id=alice.pk, data={})
    # quote(): the admin's own escaping of a text key — "evt_23…" read raw is "evt#…" to it.
    event_id = quote(Event.objects.get().pk)
    assert staff_client.get(f"/admin/notify/event/{event_id}/change/").status_code == 200
    assert staff_client.post(f"/admin/notify/event/{event_id}/delete/").status_code == 403


def test_the_dashboard_lists_failing_and_disabled_endpoints(staff_client):
    failing = endpoint_create(url="https://failing.example.com", event_types=["key.created"])
    Endpoint.objects.filter(pk=failing.pk).update(failing_since=timezone.now() - timedelta(hours=5))
    dead = endpoint_create(url="https://dead.example.com", event_types=["key.created"])
    Endpoint.objects.filter(pk=dead.pk).update(enabled=False, disabled_reason="every delivery failed for 3 days")
    endpoint_create(url="https://fine.example.com", event_types=["key.created"])

    html = staff_client.get("/admin/").content.decode()
    assert "1 webhook endpoint failing, 1 disabled for failing" in html
    assert "https://failing.example.com" in html and "https://dead.example.com" in html
    assert "https://fine.example.com" not in html
