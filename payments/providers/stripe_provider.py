"""Stripe: create a Checkout Session through the official library, verify webhooks with it.

Protocol notes are in the shared reference ``stripe.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import stripe
from django.conf import settings

from core.money import loads_decimal

from .errors import ProviderError


def is_configured() -> bool:
    return bool(settings.STRIPE_API_KEY)


def _client() -> stripe.StripeClient:
    base = {"api": settings.STRIPE_API_BASE.rstrip("/")} if settings.STRIPE_API_BASE else None
    # One retry on network trouble; the idempotency key makes the retry safe.
    return stripe.StripeClient(settings.STRIPE_API_KEY, base_addresses=base, max_network_retries=1)


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
    params: dict = {
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


def event_from_request(raw_body: bytes, signature: str | None) -> dict:
    """Verify ``Stripe-Signature`` (HMAC over ``t.body``, timestamps older than the library's
    default 300 s tolerance refused) and return the event as plain JSON with Decimal numbers.

    Raises ``stripe.SignatureVerificationError`` or ``ValueError``.
    """
    if not settings.STRIPE_WEBHOOK_SECRET:
        raise stripe.SignatureVerificationError("no webhook secret configured", signature)
    stripe.Webhook.construct_event(raw_body, signature, settings.STRIPE_WEBHOOK_SECRET)
    event = loads_decimal(raw_body)
    if not isinstance(event, dict) or not event.get("id") or not event.get("type"):
        raise ValueError("not a Stripe event")
    return event
