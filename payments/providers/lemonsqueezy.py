"""Lemon Squeezy: create a checkout (JSON:API over httpx), verify and read webhooks.

Protocol notes are in the shared reference ``lemonsqueezy.md``; section numbers below point there.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from django.conf import settings

from core.money import loads_decimal

from .errors import MalformedEvent, ProviderError
from .fields import MAX_ID_LENGTH, Fields, load_json

TIMEOUT = httpx.Timeout(15.0, connect=5.0)
JSONAPI = "application/vnd.api+json"


def is_configured() -> bool:
    return bool(settings.LEMONSQUEEZY_API_KEY and settings.LEMONSQUEEZY_STORE_ID)


@dataclass
class CreatedCheckout:
    provider_checkout_id: str
    url: str


def checkout_create(*, variant_id: str, checkout_id: str, user_id: int, redirect_url: str) -> CreatedCheckout:
    """``POST /v1/checkouts`` (§2). Our ids ride in ``checkout_data.custom`` and come back as
    ``meta.custom_data``; they only say whose wallet — what is credited comes from the order."""
    body = {
        "data": {
            "type": "checkouts",
            "attributes": {
                "product_options": {"redirect_url": redirect_url, "enabled_variants": [int(variant_id)]},
                "checkout_options": {"embed": False},
                "checkout_data": {"custom": {"user_id": str(user_id), "checkout_id": checkout_id}},
                "test_mode": settings.PAYMENTS_TEST_MODE,
            },
            "relationships": {
                "store": {"data": {"type": "stores", "id": str(settings.LEMONSQUEEZY_STORE_ID)}},
                "variant": {"data": {"type": "variants", "id": str(variant_id)}},
            },
        }
    }
    headers = {
        "Accept": JSONAPI,
        "Content-Type": JSONAPI,
        "Authorization": f"Bearer {settings.LEMONSQUEEZY_API_KEY}",
    }
    url = settings.LEMONSQUEEZY_API_URL.rstrip("/") + "/v1/checkouts"
    try:
        with httpx.Client(timeout=TIMEOUT) as client:
            response = client.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise ProviderError(f"Lemon Squeezy could not be reached ({type(exc).__name__})") from None
    if not response.is_success:
        raise ProviderError(f"Lemon Squeezy refused the checkout (HTTP {response.status_code})")
    try:
        # Read without checks: a document of another shape raises one of the errors caught below.
        document: Any = loads_decimal(response.content)
        data = document["data"]
        return CreatedCheckout(provider_checkout_id=str(data["id"]), url=str(data["attributes"]["url"]))
    except (ValueError, KeyError, TypeError):
        raise ProviderError("Lemon Squeezy answered with an unexpected checkout document") from None


def signature_valid(raw_body: bytes, signature: str | None) -> bool:
    """§3.2: hex HMAC-SHA256 of the exact received bytes, compared in constant time."""
    secret = settings.LEMONSQUEEZY_WEBHOOK_SECRET
    if not secret or not signature:
        return False
    expected = hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature.strip().lower())


# --- Webhook payloads (§3.4–3.5), read into the normalised events the services consume ----------


@dataclass(frozen=True)
class Paid:
    """What an order or a subscription invoice says was paid. Cents are USD where named so;
    ``total`` and ``refunded_amount`` are in the object's own currency, as refunds are counted."""

    currency: str
    total_usd: int
    tax_usd: int
    tax_inclusive: bool
    total: int
    refunded_amount: int


@dataclass(frozen=True)
class Order(Paid):
    """``data.type = "orders"`` (``order_created``, ``order_refunded``)."""

    id: str
    number: str
    status: str
    variant_id: str


@dataclass(frozen=True)
class Invoice(Paid):
    """``data.type = "subscription-invoices"`` (``subscription_payment_success``, ``…_refunded``)."""

    id: str
    status: str
    subscription_id: str


@dataclass(frozen=True)
class Subscription:
    id: str
    status: str
    variant_id: str
    updated_at: datetime | None  # the provider's time of this state: deliveries are not ordered


@dataclass(frozen=True)
class Event:
    event_type: str  # meta.event_name
    event_id: str
    test_mode: bool
    custom: dict[str, str]  # meta.custom_data: our user_id / checkout_id, as strings
    subject: Order | Subscription | Invoice | None  # None: an event type we do not handle


ORDER_EVENTS = {"order_created", "order_refunded"}
SUBSCRIPTION_EVENTS = {
    "subscription_created",
    "subscription_updated",
    "subscription_cancelled",
    "subscription_resumed",
    "subscription_expired",
}
INVOICE_EVENTS = {"subscription_payment_success", "subscription_payment_refunded"}


def parse_event(body: str) -> Event:
    """The delivery as a normalised event, or ``MalformedEvent`` saying which field is wrong.

    Every field a handler reads is checked here, type by type, so processing never meets a
    ``KeyError`` or a float where cents belong; the money rules (what a total may be) stay in the
    services.
    """
    root = Fields(load_json(body), "body")
    meta = root.obj("meta")
    name = meta.text("event_name", required=True, max_length=60)
    try:
        data = root.obj("data")
        object_id = data.ident("id")
        attributes = data.optional_obj("attributes")
        subject = _subject(name, object_id, data)
        test_mode = bool(meta.flag("test_mode")) or bool(attributes and attributes.flag("test_mode"))
        return Event(
            event_type=name,
            event_id=_event_id(name, object_id, attributes),
            test_mode=test_mode,
            custom=meta.string_map("custom_data"),
            subject=subject,
        )
    except MalformedEvent as exc:
        # The event id is derived from the object, so an unreadable object has none we could trust.
        raise MalformedEvent(str(exc), event_type=name) from None


def _subject(name: str, object_id: str, data: Fields) -> Order | Subscription | Invoice | None:
    """The object of an event we handle (its ``attributes`` required); None for any other."""
    if name in ORDER_EVENTS:
        return _order(object_id, data.obj("attributes"))
    if name in SUBSCRIPTION_EVENTS:
        return _subscription(object_id, data.obj("attributes"))
    if name in INVOICE_EVENTS:
        return _invoice(object_id, data.obj("attributes"))
    return None


def _paid(attributes: Fields) -> dict:
    return {
        "currency": attributes.text("currency", required=True, max_length=3),
        "total_usd": attributes.cents("total_usd"),
        "tax_usd": attributes.cents("tax_usd", required=False) or 0,
        "tax_inclusive": bool(attributes.flag("tax_inclusive")),
        "total": attributes.cents("total"),
        "refunded_amount": attributes.cents("refunded_amount", required=False) or 0,
    }


def _order(object_id: str, attributes: Fields) -> Order:
    item = attributes.optional_obj("first_order_item")
    return Order(
        id=object_id,
        number=str(attributes.integer("order_number") or object_id),
        status=attributes.text("status", required=True, max_length=40),
        variant_id=item.ident("variant_id", required=False) if item else "",
        **_paid(attributes),
    )


def _subscription(object_id: str, attributes: Fields) -> Subscription:
    return Subscription(
        id=object_id,
        status=attributes.text("status", max_length=40),
        variant_id=attributes.ident("variant_id", required=False),
        updated_at=attributes.timestamp("updated_at"),
    )


def _invoice(object_id: str, attributes: Fields) -> Invoice:
    return Invoice(
        id=object_id,
        status=attributes.text("status", required=True, max_length=40),
        subscription_id=attributes.ident("subscription_id"),
        **_paid(attributes),
    )


def _event_id(name: str, object_id: str, attributes: Fields | None) -> str:
    """A stable id per business fact (§3.6): Lemon Squeezy sends no reliable event id.

    A second partial refund is a new fact (new cumulative ``refunded_amount``); a subscription
    state change is identified by the object's ``updated_at``.
    """
    if name in {"order_refunded", "subscription_payment_refunded"}:
        refunded = attributes.cents("refunded_amount", required=False) if attributes else None
        found = f"{name}:{object_id}:{refunded}"
    elif name in {"order_created", "subscription_payment_success", "subscription_created"}:
        found = f"{name}:{object_id}"
    else:
        updated_at = attributes.text("updated_at", max_length=40) if attributes else ""
        found = f"{name}:{object_id}:{updated_at}"
    if len(found) > MAX_ID_LENGTH:
        raise MalformedEvent(f"data.id is too long to identify the event ({len(found)} characters)")
    return found
