"""Balance alerts: ``balance.low`` and ``balance.depleted``, once per crossing, never per request.

Every balance change already knows the balance before and after it (the settlement statement
returns the new balance, and ``before = after + amount``); an alert fires exactly when that step
crosses a line from at-or-above to below:

* low: the wallet's ``low_balance_threshold`` (None → the operator's ``LOW_BALANCE_THRESHOLD``,
  0 → never);
* depleted: ``MIN_BALANCE``, the floor a request needs (with ``MIN_BALANCE`` 0: a balance of zero
  or less).

Because changes to one wallet are serialized on its row, their before/after pairs chain into one
sequence, so however many settlements race, exactly one of them crosses each line on the way
down. Rising back above a line re-arms it with no state to keep: the next fall crosses again.
The event is written in the same transaction as the change (``notify`` is an outbox). The
balance is what is watched, not balance − held: holds come and go with each request in flight,
and an alert on them would flap.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache

from django.conf import settings
from django.db import transaction

from core.money import MoneyError, format_usd, parse_usd, usd_to_nanos
from notify.models import EventType
from notify.services import event_emit, preference_update

from .models import Wallet


@lru_cache(maxsize=8)
def _lines(low_default: Decimal, min_balance: Decimal) -> tuple[int, int, str]:
    """(the default low threshold, the depleted line, MIN_BALANCE as shown), in nanodollars."""
    floor = usd_to_nanos(min_balance)
    return usd_to_nanos(low_default), max(floor, 1), format_usd(floor)


def lines() -> tuple[int, int, str]:
    return _lines(settings.LOW_BALANCE_THRESHOLD, settings.MIN_BALANCE)


def threshold_in_force(wallet_threshold: int | None) -> int:
    return lines()[0] if wallet_threshold is None else wallet_threshold


def crossings(*, before: int, after: int, wallet_threshold: int | None) -> list[tuple[str, dict]]:
    """The (event type, data) pairs a balance change from ``before`` to ``after`` crosses.

    ``wallet.pg``'s settlement statement computes the same in SQL (its ``alerts`` part); the
    contract tests hold the two to the same events.
    """
    if after >= before:
        return []
    low_default, depleted, min_balance = lines()
    found = []
    threshold = low_default if wallet_threshold is None else wallet_threshold
    if threshold > 0 and after < threshold <= before:
        found.append((EventType.BALANCE_LOW.value, {"balance": format_usd(after), "threshold": format_usd(threshold)}))
    if after < depleted <= before:
        found.append((EventType.BALANCE_DEPLETED.value, {"balance": format_usd(after), "min_balance": min_balance}))
    return found


def emit_crossings(*, user_id: int | None, before: int, after: int, wallet_threshold: int | None) -> None:
    """Write the crossed lines' events into the outbox, in the caller's transaction. (An
    organization's wallet, ``user_id`` None, has no one to alert by email.)"""
    if user_id is None:
        return
    for event_type, data in crossings(before=before, after=after, wallet_threshold=wallet_threshold):
        event_emit(type=event_type, user_id=user_id, data=data)


class InvalidThreshold(ValueError):
    pass


def threshold_parse(raw: str) -> int | None:
    """A threshold as a user types it: blank → the operator's default (None); else a non-negative
    USD amount such as "5" or "2.50" (at most 9 decimal places); "0" turns the alert off."""
    text = (raw or "").strip()
    if not text:
        return None
    if not all(ch.isdigit() or ch == "." for ch in text) or text.count(".") > 1 or text.strip(".") == "":
        raise InvalidThreshold(f'{raw!r} is not an amount of money: write it like "5" or "2.50".')
    try:
        return parse_usd(text)
    except MoneyError as exc:
        raise InvalidThreshold(f"{raw!r} is not an amount of money: {exc}.") from None


def alert_settings_save(*, user, threshold: int | None, emails: dict[str, bool]) -> None:
    """The user's low-balance threshold (None: the operator's default) and email choices, together."""
    if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0):
        raise InvalidThreshold("a threshold is a non-negative number of nanodollars")
    with transaction.atomic():
        Wallet.objects.get_or_create(user=user)
        Wallet.objects.filter(user=user).update(low_balance_threshold=threshold)
        preference_update(user=user, **emails)
