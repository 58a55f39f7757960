"""Lemon Squeezy: create a checkout (JSON:API over httpx), verify and read webhooks.

Protocol notes are in the shared reference ``lemonsqueezy.md``; section numbers below point there.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import httpx
from django.conf import settings

from core.money import loads_decimal

from .errors import ProviderError

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
        data = loads_decimal(response.content)["data"]
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


def event_id(payload: dict) -> str:
    """A stable id per business fact (§3.6): Lemon Squeezy sends no reliable event id.

    A second partial refund is a new fact (new cumulative ``refunded_amount``); a subscription
    state change is identified by the object's ``updated_at``.
    """
    name = payload["meta"]["event_name"]
    data = payload["data"]
    attributes = data.get("attributes") or {}
    if name in {"order_refunded", "subscription_payment_refunded"}:
        return f"{name}:{data['id']}:{attributes.get('refunded_amount')}"
    if name in {"order_created", "subscription_payment_success", "subscription_created"}:
        return f"{name}:{data['id']}"
    return f"{name}:{data['id']}:{attributes.get('updated_at', '')}"


def is_test_mode(payload: dict) -> bool:
    meta_flag = payload.get("meta", {}).get("test_mode")
    object_flag = (payload.get("data", {}).get("attributes") or {}).get("test_mode")
    return bool(meta_flag) or bool(object_flag)
