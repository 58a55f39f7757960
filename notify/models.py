"""Notifications: an outbox of events, and their delivery to the operator's webhooks and users' inboxes.

* An ``Event`` is written by whatever caused it, in the SAME transaction (a payment credited, a
  key revoked, a wallet crossing its low-balance threshold — the last inside the settlement's
  own statement on PostgreSQL, see ``wallet.pg``). So an event exists if and only if its cause
  committed: nothing is lost between the two, and nothing is announced that was rolled back.
* Its id (``evt_<32 hex>``) is stable: it is the ``webhook-id`` of every delivery and retry, the
  receiver's idempotency key. ``dedup_key`` (UNIQUE, optional) makes "at most once per …" events
  (a spend cap reached in a window, an hourly summary) an insert that a repeat cannot duplicate.
* The worker (``manage.py deliver_webhooks``) *dispatches* each new event once: it freezes the
  event's JSON body (``body``: exactly the bytes signed and sent, on every retry) and creates one
  ``Delivery`` per enabled endpoint that subscribed to its type, plus one for the user's email.
* A ``Delivery`` is claimed under a lease (``lease_until``/``lease_token``, taken with ``FOR
  UPDATE SKIP LOCKED`` on PostgreSQL), so two workers never send one (event, endpoint) at once
  and a worker killed mid-send leaves it to be retried — with the same id — once the lease runs
  out. Every attempt is logged (``Attempt``).
* Users are known only through ``AUTH_USER_MODEL`` foreign keys and the payloads' dicts: this app
  sits below ``wallet``/``accounts``/``payments``/``proxy`` so every one of them can write to it.
"""

from __future__ import annotations

import base64
import secrets
import uuid

from django.conf import settings
from django.core.validators import URLValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone


class EventType(models.TextChoices):
    BALANCE_LOW = "balance.low", "Balance fell below the user's low-balance threshold"
    BALANCE_DEPLETED = "balance.depleted", "Balance too low for any request (below MIN_BALANCE)"
    PAYMENT_SUCCEEDED = "payment.succeeded", "Payment received and credited"
    PAYMENT_REFUNDED = "payment.refunded", "Payment refunded (credit clawed back)"
    PAYMENT_FAILED = "payment.failed", "Payment failed"
    PAYMENT_FLAGGED = "payment.flagged", "Payment flagged for staff (nothing credited)"
    USAGE_CAP_REACHED = "usage.cap_reached", "A spend cap refused a request"
    SUBSCRIPTION_RENEWED = "subscription.renewed", "Subscription invoice paid and credited"
    SUBSCRIPTION_CANCELLED = "subscription.cancelled", "Subscription cancelled"
    KEY_CREATED = "key.created", "API key created"
    KEY_REVOKED = "key.revoked", "API key revoked"
    USAGE_SUMMARY = "usage.summary", "Hourly usage summary per user"
    WEBHOOK_TEST = "webhook.test", "Test event (sent from the admin)"


# What an endpoint may subscribe to: every type but the test event, which goes to one endpoint
# when staff ask for it.
SUBSCRIBABLE = [choice for choice in EventType.choices if choice[0] != EventType.WEBHOOK_TEST]
PAYLOAD_VERSION = 1


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


class Event(models.Model):
    id = models.CharField(primary_key=True, max_length=40, default=new_event_id, editable=False)
    type = models.CharField(max_length=40, choices=EventType.choices)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # What the cause wrote: the payload's ``data`` without its ``user`` block, which dispatch adds.
    data = models.JSONField(default=dict, blank=True)
    dedup_key = models.CharField(max_length=200, null=True, blank=True, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    # Set once, by dispatch: the JSON body every delivery of this event signs and sends.
    body = models.TextField(blank=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # The worker's "what is new" scan touches only undispatched rows.
            models.Index(fields=["created_at"], condition=Q(dispatched_at__isnull=True), name="event_undispatched"),
        ]

    def __str__(self):
        return f"{self.type} {self.id}"


def new_secret() -> str:
    """A Standard Webhooks signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


webhook_url_validator = URLValidator(
    schemes=["http", "https"], message="Enter an http:// or https:// URL (the receiver's full address)."
)


class Endpoint(models.Model):
    url = models.CharField(max_length=2000, validators=[webhook_url_validator], verbose_name="URL")
    description = models.CharField(max_length=200, blank=True)
    # Needed in clear to sign with (HMAC); shown to staff once, when made or regenerated.
    secret = models.CharField(max_length=100, default=new_secret, editable=False)
    event_types = models.JSONField(default=list, help_text="The event types this endpoint receives")
    enabled = models.BooleanField(default=True)
    # When deliveries started failing without a success since: long enough, and it is disabled.
    failing_since = models.DateTimeField(null=True, blank=True)
    disabled_reason = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]
        verbose_name = "webhook endpoint"

    def __str__(self):
        return self.url

    def wants(self, event_type: str) -> bool:
        return event_type in (self.event_types or [])


class Channel(models.TextChoices):
    WEBHOOK = "webhook", "Webhook"
    EMAIL = "email", "Email"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed (gave up)"
    SKIPPED = "skipped", "Skipped (nothing to send)"


class Delivery(models.Model):
    event = models.ForeignKey(Event, on_delete=models.CASCADE, related_name="deliveries")
    channel = models.CharField(max_length=10, choices=Channel.choices, default=Channel.WEBHOOK)
    endpoint = models.ForeignKey(
        Endpoint, null=True, blank=True, on_delete=models.CASCADE, related_name="deliveries"
    )  # None for email
    status = models.CharField(max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)  # in the current retry cycle (a replay starts a new one)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    # The claim: a worker owns the delivery until ``lease_until``; its result counts only with its token.
    lease_until = models.DateTimeField(null=True, blank=True)
    lease_token = models.CharField(max_length=32, blank=True)
    last_status_code = models.IntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    last_latency_ms = models.IntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["event", "endpoint"], condition=Q(endpoint__isnull=False), name="delivery_event_endpoint"
            ),
            models.UniqueConstraint(fields=["event"], condition=Q(channel="email"), name="delivery_event_email"),
            models.CheckConstraint(
                condition=Q(channel="email", endpoint__isnull=True) | Q(channel="webhook", endpoint__isnull=False),
                name="delivery_channel_matches_endpoint",
            ),
        ]
        indexes = [
            models.Index(fields=["next_attempt_at"], condition=Q(status="pending"), name="delivery_due"),
        ]

    def __str__(self):
        target = self.endpoint.url if self.endpoint is not None else "email"
        return f"{self.event_id} → {target}"


class Attempt(models.Model):
    """One try at a delivery: the log staff read per endpoint."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempt_log")
    started_at = models.DateTimeField(default=timezone.now)
    ok = models.BooleanField(default=False)
    status_code = models.IntegerField(null=True, blank=True)
    latency_ms = models.IntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self):
        return f"attempt {self.pk} of delivery {self.delivery_id}"


class Preference(models.Model):
    """Which emails a user gets. No row: all of them (the defaults)."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, primary_key=True, on_delete=models.CASCADE, related_name="notification_preference"
    )
    email_low_balance = models.BooleanField(default=True, verbose_name="Low balance")
    email_depleted = models.BooleanField(default=True, verbose_name="Balance used up")
    email_payments = models.BooleanField(default=True, verbose_name="Payments received, refunded or failed")
    email_subscription = models.BooleanField(default=True, verbose_name="Subscription renewals")
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"email preferences of {self.user_id}"


class Alert(models.Model):
    """Something staff must look at: an endpoint disabled after failing for days."""

    kind = models.CharField(max_length=40)
    message = models.TextField()
    endpoint = models.ForeignKey(Endpoint, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts")
    created_at = models.DateTimeField(default=timezone.now)
    resolved = models.BooleanField(default=False)

    class Meta:
        ordering = ["resolved", "-id"]
        verbose_name = "webhook alert"

    def __str__(self):
        return f"{self.kind}: {self.message[:60]}"


class JobMark(models.Model):
    """How far a periodic producer (the hourly usage summary) has got, so a worker that was down
    catches up, and several workers do each hour once."""

    name = models.CharField(primary_key=True, max_length=60)
    done_until = models.DateTimeField()

    def __str__(self):
        return f"{self.name} until {self.done_until:%Y-%m-%d %H:%M}"
