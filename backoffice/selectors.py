"""Reads behind the staff dashboard: one database aggregate per panel, the same SQL on SQLite and
PostgreSQL. Money stays integer nanodollars (upstream cost is the one Decimal USD figure, as the
upstream reports it) until the template renders it.

Definitions used on the page:

* revenue = Σ gross of real (non-test) payments; fees and net likewise; refunds = Σ refunded.
* charged = Σ what usage records debited from wallets; upstream cost = Σ what the upstream billed.
* margin = charged − upstream cost (what the markup earned on the period's traffic).
* net margin = net − refunds − upstream cost: cash kept after the processor and the upstream
  were paid. The two differ because credit is bought before it is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from core.money import usd_to_nanos
from payments.models import EventStatus, Payment, PaymentStatus, StaffAlert, WebhookEvent
from proxy import routing
from proxy.models import UsageRecord
from proxy.selectors import upstreams_configured
from wallet.models import Hold, HoldStatus, Wallet

PERIODS = (7, 30, 90)
DEFAULT_PERIOD = 30
NEGATIVE_WALLETS_SHOWN = 50

_USAGE_TOTALS = {
    "requests": Count("id"),
    "prompt_tokens": Sum("prompt_tokens", default=0),
    "completion_tokens": Sum("completion_tokens", default=0),
    "reasoning_tokens": Sum("reasoning_tokens", default=0),
    "cached_tokens": Sum("cached_tokens", default=0),
    "upstream_cost": Sum("upstream_cost", default=Decimal(0)),  # USD
    "charge": Sum("charge", default=0),  # nanodollars
}


def period_start(days: int, *, now: datetime | None = None) -> datetime:
    return (now or timezone.now()) - timedelta(days=days)


@dataclass(frozen=True)
class Money:
    payments: int
    flagged: int
    gross: int  # nanodollars
    fee: int
    net: int
    refunded: int
    charged: int
    upstream_cost_usd: Decimal
    requests: int

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
    """Two aggregates: payments in the period, usage in the period."""
    paid = Payment.objects.filter(created_at__gte=since, test_mode=False).aggregate(
        payments=Count("id"),
        flagged=Count("id", filter=Q(status=PaymentStatus.FLAGGED)),
        gross=Sum("gross", default=0),
        fee=Sum("fee", default=0),
        net=Sum("net", default=0),
        refunded=Sum("refunded_amount", default=0),
    )
    used = UsageRecord.objects.filter(created_at__gte=since).aggregate(
        charged=Sum("charge", default=0), upstream_cost=Sum("upstream_cost", default=Decimal(0)), requests=Count("id")
    )
    return Money(
        payments=paid["payments"],
        flagged=paid["flagged"],
        gross=int(paid["gross"]),
        fee=int(paid["fee"]),
        net=int(paid["net"]),
        refunded=int(paid["refunded"]),
        charged=int(used["charged"]),
        upstream_cost_usd=Decimal(used["upstream_cost"]),
        requests=used["requests"],
    )


def usage_by_day(*, since: datetime) -> list[dict]:
    """Totals per UTC day, newest first."""
    rows = (
        UsageRecord.objects.filter(created_at__gte=since)
        .annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(**_USAGE_TOTALS)
        .order_by("-day")
    )
    return [_with_margin(row) for row in rows]


def usage_by_model(*, since: datetime) -> list[dict]:
    """Totals per requested model, the biggest earner first."""
    rows = (
        UsageRecord.objects.filter(created_at__gte=since)
        .values("model")
        .annotate(**_USAGE_TOTALS)
        .order_by("-charge", "model")
    )
    return [_with_margin(row) for row in rows]


def _with_margin(row: dict) -> dict:
    cost = usd_to_nanos(Decimal(row["upstream_cost"]))
    return {**row, "upstream_cost_nanos": cost, "margin": int(row["charge"]) - cost}


def negative_wallets(*, limit: int = NEGATIVE_WALLETS_SHOWN) -> list[Wallet]:
    """Wallets a settle overage took below zero: blocked until topped up, and owed to us."""
    return list(Wallet.objects.filter(balance__lt=0).select_related("user").order_by("balance")[:limit])


def hold_summary(*, now: datetime | None = None) -> dict:
    """Active holds, and how many of them are past their expiry (reconcile_holds has work)."""
    now = now or timezone.now()
    return Hold.objects.filter(status=HoldStatus.ACTIVE).aggregate(
        count=Count("id"), amount=Sum("amount", default=0), expired=Count("id", filter=Q(expires_at__lt=now))
    )


def attention_counts() -> dict:
    """Webhook events that failed processing, and staff alerts nobody resolved yet."""
    return {
        "failed_webhooks": WebhookEvent.objects.filter(status=EventStatus.FAILED).count(),
        "open_alerts": StaffAlert.objects.filter(resolved=False).count(),
    }


def upstream_states() -> list[dict]:
    """Every enabled upstream with its circuit breaker and load *in the process serving the page*
    (each process keeps its own, ``proxy.routing``). One query."""
    configs = upstreams_configured()
    states = routing.states(configs)
    return [{"name": config.name, "base_url": config.base_url, **states[config.name]} for config in configs]
