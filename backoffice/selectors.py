"""Reads behind the staff dashboard: one database aggregate per panel, the same SQL on SQLite and
PostgreSQL. Money stays integer nanodollars (upstream cost is the one Decimal USD figure, as the
upstream reports it) until the template renders it.

Definitions used on the page:

* revenue = money received for credit given: Σ gross of real (non-test) payments that credited a
  wallet; fees, net and refunds (Σ refunded) of those same payments.
* flagged = real payments stored ``flagged`` (the amount did not buy a pack, or nobody to credit):
  money received for which nothing was credited, listed apart — count and what is still held
  (gross − refunded) — until staff resolve them: crediting the pack
  (``payments.services.payment_flagged_credit``) makes one revenue, refunding it in full at the
  provider leaves nothing held.
* charged = every debit the business earns from, by kind: model usage (Σ what usage records
  debited) plus tool charges (Σ ``charge`` entries, ``/v1/user/charge``). Refund clawbacks are
  not earnings, they undo a top-up.
* upstream cost = Σ what the upstream billed for the usage; tool charges have none we know of.
* margin = charged − upstream cost (what the markup and the tools earned in the period).
* operator loss = Σ what requests cost beyond what their hold's overrun cap let the wallet pay
  (``UsageRecord.operator_loss``): upstream cost no user was charged for. It is already inside
  the margin (the upstream cost counts it, the charge does not); shown apart so it is seen.
* net margin = net − refunds − upstream cost: cash kept after the processor and the upstream
  were paid. The two differ because credit is bought before it is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Count, F, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from core.money import usd_to_nanos
from notify.models import Alert as NotifyAlert
from notify.models import Delivery, DeliveryStatus, Endpoint
from payments.models import EventStatus, Payment, PaymentStatus, StaffAlert, WebhookEvent
from proxy import rollups, routing
from proxy.selectors import upstreams_configured
from wallet.models import Entry, EntryKind, Hold, HoldStatus, Wallet

PERIODS = (7, 30, 90)
DEFAULT_PERIOD = 30
NEGATIVE_WALLETS_SHOWN = 50

_USAGE_TOTALS = [
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "upstream_cost",  # USD
    "charge",  # nanodollars
    "operator_loss",  # nanodollars
]


def period_start(days: int, *, now: datetime | None = None) -> datetime:
    return (now or timezone.now()) - timedelta(days=days)


@dataclass(frozen=True)
class Money:
    payments: int  # that credited a wallet
    gross: int  # nanodollars
    fee: int
    net: int
    refunded: int
    flagged: int  # flagged payments with money still held
    flagged_held: int  # nanodollars received for them and not refunded
    charged_usage: int  # nanodollars debited for model usage
    charged_tools: int  # nanodollars debited as tool charges
    tool_charges: int
    upstream_cost_usd: Decimal
    requests: int
    operator_loss: int = 0  # nanodollars the overrun cap kept off users' wallets
    loss_requests: int = 0

    @property
    def charged(self) -> int:
        return self.charged_usage + self.charged_tools

    @property
    def upstream_cost(self) -> int:
        """Nanodollars, half-up: the unit every other figure is in."""
        return usd_to_nanos(self.upstream_cost_usd)

    @property
    def margin(self) -> int:
        return self.charged - self.upstream_cost

    @property
    def net_margin(self) -> int:
        return self.net - self.refunded - self.upstream_cost


def money_summary(*, since: datetime) -> Money:
    """Three aggregates: payments, usage and tool charges in the period."""
    credited = ~Q(status=PaymentStatus.FLAGGED)
    held = Q(status=PaymentStatus.FLAGGED, gross__gt=F("refunded_amount"))
    # Aliases differ from field names: an aggregate named "gross" would shadow F("gross").
    paid = Payment.objects.filter(created_at__gte=since, test_mode=False).aggregate(
        payments=Count("id", filter=credited),
        total_gross=Sum("gross", filter=credited, default=0),
        total_fee=Sum("fee", filter=credited, default=0),
        total_net=Sum("net", filter=credited, default=0),
        total_refunded=Sum("refunded_amount", filter=credited, default=0),
        flagged=Count("id", filter=held),
        flagged_held=Sum(F("gross") - F("refunded_amount"), filter=held, default=0),
    )
    (used,) = rollups.totals(
        measures=["charge", "upstream_cost", "requests", "operator_loss", "loss_requests"], since=since
    )
    # Tool charges are ledger entries only (no usage record); debits are negative amounts.
    tools = Entry.objects.filter(kind=EntryKind.CHARGE, created_at__gte=since).aggregate(
        amount=Sum("amount", default=0), count=Count("id")
    )
    return Money(
        payments=paid["payments"],
        gross=int(paid["total_gross"]),
        fee=int(paid["total_fee"]),
        net=int(paid["total_net"]),
        refunded=int(paid["total_refunded"]),
        flagged=paid["flagged"],
        flagged_held=int(paid["flagged_held"]),
        charged_usage=used["charge"],
        charged_tools=-int(tools["amount"]),
        tool_charges=tools["count"],
        upstream_cost_usd=used["upstream_cost"],
        requests=used["requests"],
        operator_loss=used["operator_loss"],
        loss_requests=used["loss_requests"],
    )


def usage_by_day(*, since: datetime) -> list[dict]:
    """Totals per UTC day, newest first."""
    rows = rollups.totals(measures=_USAGE_TOTALS, keys={"day": TruncDate}, since=since)
    return [_with_margin(row) for row in sorted(rows, key=lambda row: row["day"], reverse=True)]


def usage_by_model(*, since: datetime) -> list[dict]:
    """Totals per requested model, the biggest earner first."""
    rows = rollups.totals(measures=_USAGE_TOTALS, keys={"model": "model"}, since=since)
    return [_with_margin(row) for row in sorted(rows, key=lambda row: (-row["charge"], row["model"]))]


def _with_margin(row: dict) -> dict:
    cost = usd_to_nanos(Decimal(row["upstream_cost"]))
    return {**row, "upstream_cost_nanos": cost, "margin": int(row["charge"]) - cost}


def negative_wallets(*, limit: int = NEGATIVE_WALLETS_SHOWN) -> list[Wallet]:
    """Wallets a settle overage took below zero: blocked until topped up, and owed to us."""
    return list(Wallet.objects.filter(balance__lt=0).select_related("user", "organization").order_by("balance")[:limit])


def hold_summary(*, now: datetime | None = None) -> dict:
    """Active holds, and how many of them are past their expiry (reconcile_holds has work)."""
    now = now or timezone.now()
    return Hold.objects.filter(status=HoldStatus.ACTIVE).aggregate(
        count=Count("id"), amount=Sum("amount", default=0), expired=Count("id", filter=Q(expires_at__lt=now))
    )


def attention_counts() -> dict:
    """Webhook events that failed processing or were rejected as unreadable, and staff alerts
    nobody resolved yet."""
    webhooks = WebhookEvent.objects.filter(status__in=[EventStatus.FAILED, EventStatus.REJECTED]).aggregate(
        failed=Count("id", filter=Q(status=EventStatus.FAILED)),
        rejected=Count("id", filter=Q(status=EventStatus.REJECTED)),
    )
    return {
        "failed_webhooks": webhooks["failed"],
        "rejected_webhooks": webhooks["rejected"],
        "open_alerts": StaffAlert.objects.filter(resolved=False).count(),
        **outbound_attention(),
    }


def outbound_attention() -> dict:
    """Outbound webhooks needing staff: endpoints failing right now (no success since
    ``failing_since``), endpoints disabled for failing, deliveries given up on, open alerts."""
    endpoints = Endpoint.objects.aggregate(
        failing=Count("id", filter=Q(enabled=True, failing_since__isnull=False)),
        disabled=Count("id", filter=Q(enabled=False) & ~Q(disabled_reason="")),
    )
    return {
        "failing_endpoints": endpoints["failing"],
        "disabled_endpoints": endpoints["disabled"],
        "failed_deliveries": Delivery.objects.filter(status=DeliveryStatus.FAILED).count(),
        "open_webhook_alerts": NotifyAlert.objects.filter(resolved=False).count(),
    }


def failing_endpoints(*, limit: int = 20) -> list[Endpoint]:
    """Endpoints failing or disabled for failing, the longest-failing first."""
    failing = Q(enabled=True, failing_since__isnull=False) | (Q(enabled=False) & ~Q(disabled_reason=""))
    return list(Endpoint.objects.filter(failing).order_by("enabled", "failing_since")[:limit])


def upstream_states() -> list[dict]:
    """Every enabled upstream with its circuit breaker and load *in the process serving the page*
    (each process keeps its own, ``proxy.routing``). One query."""
    configs = upstreams_configured()
    states = routing.states(configs)
    return [{"name": config.name, "base_url": config.base_url, **states[config.name]} for config in configs]
