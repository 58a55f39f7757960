"""Live events for a user's open ``/ws/events`` connections, sent after the change commits.

Sent through the channel layer (in-memory in one process, Redis across processes) to the group
``wallet.user.<id>``, which each server process holding one of the user's connections joins once
(``accounts.fanout``); the message names its group (``"group"``) so the process can hand it to that
user's connections. Two kinds:

* ``wallet.event``: the balance after a wallet change. Always after commit: a client must never
  see money that was rolled back.
* ``credential.revoked``: one of the user's credentials ended (an API key revoked, a login's token
  family revoked, a portal session signed out) or all of them (the account disabled). Each socket
  compares it with the credential it authenticated with and closes if it is its own; the user's
  other sockets stay open. After commit too, so a socket that checks its credential on hearing it
  finds the revocation.
"""

import hashlib
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


def _addressed(user_id: int, message: dict) -> tuple[str, dict]:
    """(group, message naming that group): a process receives every group it joined on one channel."""
    group = group_for_user(user_id)
    return group, {**message, "group": group}


def balance_payload(*, balance: int, held: int, reason: str) -> dict:
    return {
        "type": "balance",
        "balance": format_usd(balance),
        "held": format_usd(held),
        "available": format_usd(balance - held),
        "reason": reason,
    }


def publish(user_id: int, payload: dict) -> None:
    # "type" routes to the consumer's handler; the client-facing body rides in "event".
    _send(user_id, {"type": "wallet.event", "event": payload})


def _send(user_id: int, message: dict) -> None:
    pending = _collecting.get()
    if pending is not None:
        pending.append((user_id, message))
        return
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(*_addressed(user_id, message))
    except Exception:  # a dead channel layer must never undo or fail a committed change
        log.exception("could not publish %s for user %s", message["type"], user_id)


def publish_balance_on_commit(user_id: int | None, *, balance: int, held: int, reason: str) -> None:
    if user_id is None:  # an organization's wallet: no user's sockets follow it
        return
    payload = balance_payload(balance=balance, held=held, reason=reason)
    transaction.on_commit(lambda: publish(user_id, payload))


def publish_on_commit(wallet, reason: str) -> None:
    publish_balance_on_commit(wallet.user_id, balance=wallet.balance, held=wallet.held, reason=reason)


# What a socket authenticated with, as (kind, id) — the form a revocation names it by. Session keys
# are secrets, so a session travels (and is kept) only as its digest.
Credential = tuple[str, str]


def api_key_credential(key_id: int) -> Credential:
    return ("api_key", str(key_id))


def token_family_credential(family_id) -> Credential:
    return ("token_family", str(family_id))


def session_credential(session_key: str) -> Credential:
    return ("session", hashlib.sha256(session_key.encode()).hexdigest())


def publish_revocation_on_commit(user_id: int, credential: Credential | None) -> None:
    """Once the revocation commits, close the user's sockets that authenticated with
    ``credential`` (every one of their sockets when it is None: the account was disabled)."""
    message = {"type": "credential.revoked", "credential": list(credential) if credential else None}
    transaction.on_commit(lambda: _send(user_id, message))


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
    for user_id, message in pending:
        try:
            await layer.group_send(*_addressed(user_id, message))
        except Exception:  # a dead channel layer must never fail a committed charge
            log.exception("could not publish %s for user %s", message["type"], user_id)


async def apublish_balance(user_id: int | None, *, balance: int, held: int, reason: str) -> None:
    """From async code, once the change has committed."""
    if user_id is None:  # an organization's wallet
        return
    payload = balance_payload(balance=balance, held=held, reason=reason)
    await send_collected([(user_id, {"type": "wallet.event", "event": payload})])
