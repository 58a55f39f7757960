"""Tool charges (``POST /v1/user/charge``): one service that reserves the charge against the
caller's spend caps, posts it to the ledger and keeps the counters true.

An API key's limits hold here as on the proxy (``proxy.limits``), and so do the charged user's:
a charge is counted against the key's and the user's daily and monthly spend caps with the
proxy's atomic counters *before* it is posted, so concurrent charges cannot together pass a cap,
and the reservation is kept only for money that was actually posted — not for a 402, a 409 or a
replay. A charge made with ``X-Tokentill-Run`` is part of that run of the charged user: it is
reserved against the run's spend limit the same way, and its ledger entry is labelled with the
run (``limits.CHARGE_RUN_FIELD``).
"""

from __future__ import annotations

from django.utils import timezone

from accounts.auth import Principal
from wallet.models import Entry
from wallet.services import Posted, wallet_charge, wallet_get_or_create

from . import limits
from .org_billing import OrgBilling


def tool_charge(
    *,
    principal: Principal,
    target,
    amount: int,
    idempotency_key: str,
    description: str,
    metadata: dict,
    run: limits.RunAsk | None = None,
    org: OrgBilling | None = None,
) -> Posted:
    """Debit ``amount`` nanodollars from ``target``'s wallet now, if its available balance covers it.

    ``idempotency_key`` is the caller's ``Idempotency-Key``; it is stored namespaced on the
    target's wallet (``charge:<key>``). Raises ``wallet.services.InsufficientFunds`` (nothing
    posted: the same key retried after a top-up is charged then), ``IdempotencyConflict`` (the key
    was used for another amount), ``limits.LimitExceeded`` (a spend cap is full) or ``WalletError``.

    ``org`` (``X-Tokentill-Org``, or an organization's key): the organization's wallet is charged
    instead, within the member's spend limits there, and the entry names the member.
    """
    wallet = org.wallet if org is not None else wallet_get_or_create(user=target)
    namespaced = f"charge:{idempotency_key}"
    reservation = _reserve(principal, wallet=wallet, user=target, idempotency_key=namespaced, amount=amount, run=run)
    if org is not None:
        try:
            limits.reserve_member_spend(
                reservation,
                membership=org.membership,
                amount=amount,
                now=timezone.now(),
                api_key=principal.api_key,
                run=run.run if run is not None else "",
            )
        except limits.LimitExceeded:
            if not Entry.objects.filter(wallet=wallet, idempotency_key=namespaced).exists():
                raise
            limits.release(reservation)  # a replay: wallet_charge answers with its first result
            reservation = limits.Reservation()
    posted = None
    try:
        posted = wallet_charge(
            wallet=wallet,
            amount=amount,
            idempotency_key=namespaced,
            reference=idempotency_key,
            description=description,
            metadata=metadata,
            member_id=target.pk if org is not None else None,
        )
    finally:
        # Nothing posted (402, 409, a replay of a charge already counted, an error): the
        # reservation goes back, so a cap never counts a charge twice or one that never happened.
        limits.adjust(reservation, amount if posted is not None and not posted.replayed else 0)
    return posted


def _reserve(
    principal: Principal, *, wallet, user, idempotency_key: str, amount: int, run: limits.RunAsk | None
) -> limits.Reservation:
    """Count the charge against the key's spend caps, the charged user's (``wallet``'s) and its
    run's spend limit. The run is the charged user's, as their model calls' are.

    A full cap refuses a new charge (``LimitExceeded``, the 429), but not a replay: it posts
    nothing and must still answer its first result. Whether the key was already posted on is read
    only when the cap refuses; an entry, once there, stays (the ledger is append-only)."""
    run = run or limits.RunAsk()
    try:
        return limits.reserve_spend(
            api_key=principal.api_key,
            run=run.run,
            user_id=user.pk,
            amount=amount,
            now=timezone.now(),
            run_max_spend=run.max_spend,
            user=user,
        )
    except limits.LimitExceeded:
        if Entry.objects.filter(wallet=wallet, idempotency_key=idempotency_key).exists():
            return limits.Reservation()  # wallet_charge answers the replay (or the 409)
        raise
