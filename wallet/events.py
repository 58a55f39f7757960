"""Live balance events: after a wallet change commits, tell the user's open WebSocket connections.

Sent through the channel layer (in-memory in one process, Redis across processes) to the group
``wallet.user.<id>``, which ``/ws/events`` connections join. Always after commit: a client must
never see money that was rolled back.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from core.money import format_usd

log = logging.getLogger(__name__)

# Set by ``collected()``: committed events wait in this list for an async caller to send them.
_collecting: ContextVar[list | None] = ContextVar("wallet_events_collecting", default=None)


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
    pending = _collecting.get()
    if pending is not None:
        pending.append((user_id, payload))
        return
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


@contextmanager
def collected() -> Iterator[list]:
    """Keep the events committed inside the block instead of sending them from this thread.

    For sync code run from an event loop (the proxy's worker-thread calls): sending from the
    worker would bounce into the loop and back (``async_to_sync``) while the thread waits. The
    caller hands the list to ``send_collected`` on the loop once the block has returned. Only
    committed events are ever collected — they are added by the same ``on_commit`` hooks.
    """
    pending: list = []
    token = _collecting.set(pending)
    try:
        yield pending
    finally:
        _collecting.reset(token)


async def send_collected(pending: list) -> None:
    layer = get_channel_layer() if pending else None
    if layer is None:
        return
    for user_id, payload in pending:
        try:
            await layer.group_send(group_for_user(user_id), {"type": "wallet.event", "event": payload})
        except Exception:  # a dead channel layer must never fail a committed charge
            log.exception("could not publish balance event for user %s", user_id)


async def apublish_balance(user_id: int, *, balance: int, held: int, reason: str) -> None:
    """From async code, once the change has committed."""
    await send_collected([(user_id, balance_payload(balance=balance, held=held, reason=reason))])
