"""Crash recovery for metered requests, run by ``manage.py reconcile_holds``.

* ``hold_reconcile`` closes a hold its server process abandoned (it crashed, or could not reach
  the database for ``HOLD_TTL``): charged what OpenRouter's generation lookup reports where there
  is one, else a marked estimate of the prompt and the output relayed, never silently dropped.
* ``estimate_reconcile`` replaces a settled *estimate* (a client that left, a stream cut off) by
  what the upstream later says the generation cost, moving only the difference, once.

Both re-derive the charge from the usage record's own price snapshot, so a price edited since
never changes what an old request costs.
"""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from core.pricing import Rates, charge_nanos, cost_usd
from core.usage import Usage, count, reported_cost
from wallet.models import Hold, HoldStatus
from wallet.services import hold_release, hold_settle, usage_reconcile

from .models import CostSource, UsageRecord, UsageStatus
from .selectors import rates_for


def _rates_from_snapshot(record: UsageRecord) -> Rates:
    snap = record.prices or {}
    if not snap and record.price is not None:
        return rates_for(record.price)
    return Rates(
        prompt=Decimal(snap.get("prompt", "0")),
        completion=Decimal(snap.get("completion", "0")),
        reasoning=Decimal(snap.get("reasoning", "0")),
        cache_read=Decimal(snap.get("cache_read", "0")),
        cache_write=Decimal(snap.get("cache_write", "0")),
        request_fee=int(snap.get("request_fee", 0)),
        min_charge=int(snap.get("min_charge", 0)),
        markup=Decimal(snap.get("markup", str(settings.MARKUP))),
    )


def _apply_generation(record: UsageRecord, generation: dict | None) -> Decimal | None:
    """Copy the upstream's own account of a generation onto the record; its cost, or None if it
    has none."""
    if not isinstance(generation, dict):
        return None
    cost = reported_cost(generation, "total_cost")
    if cost is None:
        return None
    record.prompt_tokens = count(generation.get("native_tokens_prompt") or generation.get("tokens_prompt"))
    record.completion_tokens = count(generation.get("native_tokens_completion") or generation.get("tokens_completion"))
    record.reasoning_tokens = count(generation.get("native_tokens_reasoning"))
    record.cached_tokens = count(generation.get("native_tokens_cached"))
    record.upstream_cost = cost
    record.cost_source = CostSource.RECONCILED
    record.estimated = False
    record.status = UsageStatus.CANCELLED if generation.get("cancelled") else UsageStatus.OK
    record.finish_reason = str(generation.get("finish_reason") or "")[:40]
    return cost


def hold_reconcile(*, hold: Hold, generation: dict | None) -> str:
    """Close one expired hold; ``generation`` is the upstream's lookup (OpenRouter) or None.

    Never silently dropped: with a lookup the record is charged the upstream's ``total_cost``;
    without one it is charged the estimate of its prompt and the output relayed (marked
    ``estimated``); a hold with no usage record at all is released.

    The hold is locked and checked again first — still active, still expired — and the record read
    under that lock: between the command picking the hold and getting here (a generation lookup
    takes seconds) the request may have settled, or written its progress and so pushed the expiry
    out. Then it is left alone, and the ledger and its record keep agreeing. (Hold before record,
    the order the proxy's settlement takes them in.)
    """
    with transaction.atomic(savepoint=False):
        still = Hold.objects.select_for_update().filter(
            pk=hold.pk, status=HoldStatus.ACTIVE, expires_at__lte=timezone.now()
        )
        if not still.exists():
            return f"{hold.request_id}: left alone (it settled, or its request is still running)"
        record = UsageRecord.objects.filter(request_id=hold.request_id).first()
        if record is None:
            hold_release(hold=hold)
            return f"{hold.request_id}: released (no usage record)"
        rates = _rates_from_snapshot(record)
        upstream_cost = _apply_generation(record, generation)
        if upstream_cost is not None:
            how = "settled from the upstream's generation lookup"
        else:
            # completion_tokens is the estimate of what was relayed, as of the request's last
            # progress write (arequest_progress); zero if it never got that far.
            usage = Usage(prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens)
            record.upstream_cost = upstream_cost = cost_usd(rates, usage)
            record.cost_source = CostSource.ESTIMATE
            record.estimated = True
            record.status = UsageStatus.UPSTREAM_ERROR
            record.error = "never settled by its server process; charged an estimate of its prompt and output relayed"
            how = "settled at an estimate of its prompt and output relayed"
        cost = charge_nanos(upstream_cost, markup=rates.markup, min_charge=rates.min_charge)
        record.settled_at = timezone.now()
        hold.refresh_from_db(fields=["overrun_cap"])
        closed = hold_settle(
            hold=hold,
            amount=cost,
            description=f"{record.model} ({record.request_id}, reconciled)",
            member_id=record.user_id if record.organization_id is not None else None,
        )
        # The hold's overrun cap applies here as at the proxy: the rest is the operator's loss.
        record.charge, record.operator_loss = closed.charged, closed.loss
        record.save()
    return f"{hold.request_id}: {how}, charged {record.charge} nanodollars"


def estimates_to_reconcile(*, settled_before, limit: int, upstreams: list[str] | None = None):
    """Settled requests charged an estimate that the upstream can still account for — served by
    one of ``upstreams`` (their names on the records), when given."""
    records = UsageRecord.objects.filter(
        cost_source=CostSource.ESTIMATE, estimated=True, settled_at__lte=settled_before
    )
    if upstreams is not None:
        records = records.filter(upstream__in=upstreams)
    return (
        records.exclude(generation_id="")
        .select_related("user__wallet", "organization__wallet")
        .order_by("settled_at", "pk")[:limit]
    )


def estimate_reconcile(*, record: UsageRecord, generation: dict | None) -> str:
    """Replace a settled estimate with what the upstream says the generation cost.

    The estimate was already debited (a disconnected client had output that is never free), so
    only the difference moves, through ``wallet.services.usage_reconcile``, once per request.
    """
    estimated_charge = record.charge
    upstream_cost = _apply_generation(record, generation)
    if upstream_cost is None:
        return f"{record.request_id}: generation {record.generation_id} not available upstream; estimate kept"
    rates = _rates_from_snapshot(record)
    cost = charge_nanos(upstream_cost, markup=rates.markup, min_charge=rates.min_charge)
    hold = Hold.objects.filter(request_id=record.request_id).only("amount", "overrun_cap").first()
    with transaction.atomic(savepoint=False):
        posted = usage_reconcile(
            # The wallet the request was billed to: its organization's, or its user's.
            wallet=record.organization.wallet if record.organization is not None else record.user.wallet,
            request_id=record.request_id,
            delta=cost - estimated_charge,
            description=f"{record.model} ({record.request_id}): estimate replaced by the upstream's cost",
            hold_amount=hold.amount if hold is not None else 0,
            overrun_cap=hold.overrun_cap if hold is not None else None,
            charged=estimated_charge,
        )
        # What moved (the hold's overrun cap may have kept some of it off the wallet).
        moved = -posted.entry.amount if posted is not None else 0
        record.charge = estimated_charge + moved
        record.operator_loss = max(cost - record.charge, 0)
        record.save()
    return f"{record.request_id}: estimate {estimated_charge} replaced by {record.charge} nanodollars"
