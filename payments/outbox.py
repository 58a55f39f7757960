"""What payments tell the operator's systems and the buyer: events into notify's outbox.

Each function is called inside the webhook event's processing transaction, so its event commits
with the payment row and the wallet change it describes, or not at all. Payloads are documented
in docs/api.md ("Outbound webhooks"); amounts are 9-place USD strings.
"""

from __future__ import annotations

from core.money import format_usd
from notify.models import EventType
from notify.services import event_emit

from .models import Payment, Subscription


def _payment(payment: Payment) -> dict:
    return {
        "id": payment.provider_payment_id,
        "provider": payment.provider,
        "amount": format_usd(payment.gross),
        "currency": payment.currency,
        "credit": format_usd(payment.credit),
        "pack": payment.pack.slug if payment.pack is not None else None,
        "subscription": payment.subscription.provider_subscription_id if payment.subscription is not None else None,
        "status": payment.status,
        "test_mode": payment.test_mode,
    }


def _subscription(subscription: Subscription) -> dict:
    return {
        "id": subscription.provider_subscription_id,
        "provider": subscription.provider,
        "pack": subscription.pack.slug,
        "credit": format_usd(subscription.credit),
        "status": subscription.status,
    }


def payment_succeeded(payment: Payment) -> None:
    """A payment credited its wallet; a subscription invoice is also a ``subscription.renewed``."""
    event_emit(type=EventType.PAYMENT_SUCCEEDED, user_id=payment.user_id, data={"payment": _payment(payment)})
    if payment.subscription is not None:
        event_emit(
            type=EventType.SUBSCRIPTION_RENEWED,
            user_id=payment.user_id,
            data={"subscription": _subscription(payment.subscription), "payment": _payment(payment)},
        )


def payment_refunded(payment: Payment, *, refunded_now: int, clawed_back_now: int) -> None:
    """More of a payment was refunded (``refunded_now`` nanodollars this time; the payload's
    ``payment.refunded`` is the running total)."""
    event_emit(
        type=EventType.PAYMENT_REFUNDED,
        user_id=payment.user_id,
        data={
            "payment": {**_payment(payment), "refunded": format_usd(payment.refunded_amount)},
            "refunded": format_usd(refunded_now),
            "clawed_back": format_usd(clawed_back_now),
        },
    )


def payment_flagged(payment: Payment, *, reason: str) -> None:
    event_emit(
        type=EventType.PAYMENT_FLAGGED,
        user_id=payment.user_id,
        data={"payment": _payment(payment), "reason": reason},
    )


def payment_failed(
    *, user_id: int | None, provider: str, reference: str, amount: int, currency: str, reason: str
) -> None:
    """A payment did not go through (nothing was credited): a bank debit that failed, or a
    subscription renewal the card declined."""
    event_emit(
        type=EventType.PAYMENT_FAILED,
        user_id=user_id,
        data={
            "provider": provider,
            "reference": reference,
            "amount": format_usd(amount),
            "currency": currency.upper(),
            "reason": reason,
        },
    )


def subscription_cancelled(subscription: Subscription) -> None:
    event_emit(
        type=EventType.SUBSCRIPTION_CANCELLED,
        user_id=subscription.user_id,
        data={"subscription": _subscription(subscription)},
    )
