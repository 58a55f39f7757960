"""Stripe: create a Checkout Session through the official library, verify webhooks with it.

Protocol notes are in the shared reference ``stripe.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import stripe
from django.conf import settings

from .errors import MalformedEvent, ProviderError
from .fields import Fields, load_json

if TYPE_CHECKING:
    from stripe.params.checkout import SessionCreateParams

# The library refuses signatures older than its tolerance but accepts any timestamp in the future,
# so a captured delivery signed "10 minutes from now" would stay replayable for 15 minutes. Allow
# only clock skew forward.
FUTURE_SKEW = 60  # seconds


def is_configured() -> bool:
    return bool(settings.STRIPE_API_KEY)


def _client() -> stripe.StripeClient:
    api_base = settings.STRIPE_API_BASE
    # One retry on network trouble; the idempotency key makes the retry safe.
    return stripe.StripeClient(
        settings.STRIPE_API_KEY,
        base_addresses={"api": api_base.rstrip("/")} if api_base else None,
        max_network_retries=1,
    )


@dataclass
class CreatedSession:
    provider_checkout_id: str
    url: str


def checkout_create(
    *,
    price_id: str,
    checkout_id: str,
    user_id: int,
    pack_slug: str,
    recurring: bool,
    success_url: str,
    cancel_url: str,
) -> CreatedSession:
    """A hosted Checkout Session for one pack. ``client_reference_id`` is our checkout id, and
    the deterministic idempotency key means a double click cannot open two sessions."""
    metadata = {"user_id": str(user_id), "checkout_id": checkout_id, "pack": pack_slug}
    params: SessionCreateParams = {
        "mode": "subscription" if recurring else "payment",
        "line_items": [{"price": price_id, "quantity": 1}],
        "client_reference_id": checkout_id,
        "metadata": metadata,
        "success_url": success_url,
        "cancel_url": cancel_url,
    }
    if recurring:
        # Session metadata does not reach invoices; subscription metadata does
        # (invoice.parent.subscription_details.metadata), which lets a renewal find its checkout.
        params["subscription_data"] = {"metadata": metadata}
    else:
        params["payment_intent_data"] = {"metadata": metadata}
    try:
        session = _client().v1.checkout.sessions.create(
            params=params, options={"idempotency_key": f"checkout-{checkout_id}"}
        )
    except stripe.StripeError as exc:
        status = getattr(exc, "http_status", None)
        raise ProviderError(f"Stripe refused the checkout session (HTTP {status or 'error'})") from None
    if not session.url:
        raise ProviderError("Stripe returned a checkout session without a URL")
    return CreatedSession(provider_checkout_id=session.id, url=session.url)


def verify_signature(raw_body: bytes, signature: str | None) -> None:
    """Verify ``Stripe-Signature`` with the official library (HMAC over ``t.body``, any ``v1``
    matching, timestamps older than its default 300 s refused) and refuse timestamps more than
    ``FUTURE_SKEW`` ahead of our clock.

    This is the check ``stripe.Webhook.construct_event`` runs, without its parse: the body is read
    by ``parse_event`` instead, which refuses what the library would raise on (``[]``, JSON nested
    past the recursion limit) with a reason. Raises ``stripe.SignatureVerificationError``, or
    ``ValueError`` for a body that is not UTF-8 (the signature is computed over text).
    """
    secret = settings.STRIPE_WEBHOOK_SECRET
    if not secret:
        raise stripe.SignatureVerificationError("no webhook secret configured", signature)
    stripe.WebhookSignature.verify_header(raw_body, signature, secret, stripe.Webhook.DEFAULT_TOLERANCE)
    # Read ``t`` exactly as verify_header has just done (the first ``t=`` item), so it is an int.
    items = [item.split("=", 2) for item in (signature or "").split(",")]
    timestamp = int(next(item[1] for item in items if item[0] == "t"))
    if timestamp > time.time() + FUTURE_SKEW:
        raise stripe.SignatureVerificationError(f"Timestamp {timestamp} is in the future", signature)


# --- Webhook payloads (§4, §6), read into the normalised events the services consume -------------


@dataclass(frozen=True)
class LineItem:
    price_id: str
    quantity: int
    currency: str
    amount_total: int  # cents


@dataclass(frozen=True)
class Session:
    """A Checkout Session (§2.1). ``line_items`` is not in the event: it is None until the
    services fetch it (only for a session that is not one of our own checkouts)."""

    id: str
    mode: str
    payment_status: str
    amount_total: int  # cents, tax included
    amount_tax: int  # cents
    currency: str
    client_reference_id: str
    metadata: dict[str, str]
    payment_intent: str
    subscription: str
    line_items: tuple[LineItem, ...] | None = None

    @property
    def checkout_reference(self) -> str:
        """Our checkout id: in the metadata of every session we create, and its client_reference_id
        (a Payment Link's ``?client_reference_id=`` carries a user id instead)."""
        return self.metadata.get("checkout_id") or self.client_reference_id


@dataclass(frozen=True)
class Charge:
    id: str
    amount: int  # cents
    amount_refunded: int  # cents, cumulative
    payment_intent: str


@dataclass(frozen=True)
class Invoice:
    id: str
    subscription_id: str
    subscription_metadata: dict[str, str]
    currency: str
    amount_paid: int  # cents
    amount_due: int  # cents
    tax: int  # cents: total − total_excluding_tax where both are given
    payment_intent: str
    customer: str
    attempt_count: int
    retries: bool  # Stripe will try again (next_payment_attempt is set)


@dataclass(frozen=True)
class Subscription:
    id: str


@dataclass(frozen=True)
class Event:
    event_id: str
    event_type: str
    test_mode: bool
    subject: Session | Charge | Invoice | Subscription | None  # None: an event type we do not handle


SESSION_EVENTS = {
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
}
INVOICE_EVENTS = {"invoice.payment_succeeded", "invoice.payment_failed"}


def parse_event(body: str) -> Event:
    """The delivery as a normalised event, or ``MalformedEvent`` saying which field is wrong."""
    root = Fields(load_json(body), "body")
    event_id = root.ident("id")
    event_type = root.text("type", required=True, max_length=100)
    try:
        livemode = root.flag("livemode")
        subject = _subject(event_type, root.obj("data").obj("object"))
    except MalformedEvent as exc:
        raise MalformedEvent(str(exc), event_id=event_id, event_type=event_type) from None
    return Event(event_id=event_id, event_type=event_type, test_mode=livemode is False, subject=subject)


def _subject(event_type: str, obj: Fields) -> Session | Charge | Invoice | Subscription | None:
    if event_type in SESSION_EVENTS:
        return _session(obj)
    if event_type == "charge.refunded":
        return Charge(
            id=obj.ident("id"),
            amount=obj.cents("amount"),
            amount_refunded=obj.cents("amount_refunded", required=False) or 0,
            payment_intent=obj.expandable_id("payment_intent"),
        )
    if event_type in INVOICE_EVENTS:
        return _invoice(obj)
    if event_type == "customer.subscription.deleted":
        return Subscription(id=obj.ident("id"))
    return None


def _session(obj: Fields) -> Session:
    totals = obj.optional_obj("total_details")
    return Session(
        id=obj.ident("id"),
        mode=obj.text("mode", max_length=20),
        payment_status=obj.text("payment_status", max_length=40),
        amount_total=obj.cents("amount_total", required=False) or 0,
        amount_tax=(totals.cents("amount_tax", required=False) if totals else None) or 0,
        currency=obj.text("currency", max_length=3),
        client_reference_id=obj.text("client_reference_id", max_length=200),
        metadata=obj.string_map("metadata"),
        payment_intent=obj.expandable_id("payment_intent"),
        subscription=obj.expandable_id("subscription"),
    )


def _invoice(obj: Fields) -> Invoice:
    """The subscription is ``parent.subscription_details`` since API 2025-03-31.basil, top-level
    ``subscription`` / ``subscription_details`` before."""
    parent = obj.optional_obj("parent")
    details = parent.optional_obj("subscription_details") if parent else None
    legacy = obj.optional_obj("subscription_details")
    subscription = (details.expandable_id("subscription") if details else "") or obj.expandable_id("subscription")
    metadata = (details.string_map("metadata") if details else {}) or (legacy.string_map("metadata") if legacy else {})
    total, untaxed = obj.cents("total", required=False), obj.cents("total_excluding_tax", required=False)
    return Invoice(
        id=obj.ident("id"),
        subscription_id=subscription,
        subscription_metadata=metadata,
        currency=obj.text("currency", max_length=3),
        amount_paid=obj.cents("amount_paid", required=False) or 0,
        amount_due=obj.cents("amount_due", required=False) or 0,
        tax=total - untaxed if total is not None and untaxed is not None else 0,
        payment_intent=obj.expandable_id("payment_intent"),
        customer=obj.expandable_id("customer"),
        attempt_count=obj.integer("attempt_count") or 0,
        retries=obj.integer("next_payment_attempt") is not None,
    )


def session_with_line_items(session: Session) -> Session:
    """``GET /v1/checkout/sessions/{id}/line_items``: the event does not carry them unless
    expanded, and a Payment Link's session names no checkout of ours, so what was bought is read
    from Stripe itself. Two at most: anything but exactly one line is not one credit pack anyway.

    Raises ``ProviderError`` when Stripe cannot be asked (a retry may succeed).
    """
    try:
        listed = _client().v1.checkout.sessions.line_items.list(session.id, params={"limit": 2})
    except stripe.StripeError as exc:
        status = getattr(exc, "http_status", None)
        raise ProviderError(f"Stripe did not list the session's line items (HTTP {status or 'error'})") from None
    items = []
    for item in listed.data:
        price = getattr(item, "price", None)
        items.append(
            LineItem(
                price_id=str(getattr(price, "id", "") or ""),
                quantity=int(getattr(item, "quantity", 0) or 0),
                currency=str(getattr(item, "currency", "") or ""),
                amount_total=int(getattr(item, "amount_total", 0) or 0),
            )
        )
    return replace(session, line_items=tuple(items))
