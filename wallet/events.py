"""Live balance events: after a wallet change commits, tell the user's open WebSocket connections.

Sent through the channel layer (in-memory in one process, Redis across processes) to the group
``wallet.user.<id>``, which ``/ws/events`` connections join. Always after commit: a client must
never see money that was rolled back.
"""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from .money import format_usd

log = logging.getLogger(__name__)


def group_for_user(user_id: int) -> str:
    return f"wallet.user.{user_id}"


def balance_payload(*, balance: int, held: int, reason: str) -> dict:
    return {
        "type": "balance",
        "balance": format_usd(balance),
        "held": format_usd(held),
        "available": format_usd(balance - held),
        "reason": reason,
    }


def publish(user_id: int, payload: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        # "type" routes to the consumer's handler; the client-facing body rides in "event".
        async_to_sync(layer.group_send)(group_for_user(user_id), {"type": "wallet.event", "event": payload})
    except Exception:  # a dead channel layer must never undo or fail a committed payment
        log.exception("could not publish balance event for user %s", user_id)


def publish_balance_on_commit(user_id: int, *, balance: int, held: int, reason: str) -> None:
    payload = balance_payload(balance=balance, held=held, reason=reason)
    transaction.on_commit(lambda: publish(user_id, payload))


def publish_on_commit(wallet, reason: str) -> None:
    publish_balance_on_commit(wallet.user_id, balance=wallet.balance, held=wallet.held, reason=reason)
