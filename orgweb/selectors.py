"""Reads of an organization's ledger and usage, by member. (``orgweb`` sits above ``proxy``,
whose usage records these read; ``orgs`` below it cannot.)"""

from __future__ import annotations

from datetime import datetime

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from infra.keyset import BY_TIME, Page, keyset_page
from orgs.models import Organization
from proxy.models import UsageRecord, UsageStatus
from wallet.models import Entry
from wallet.selectors import entries_of

SUMMARY_GROUPS = ("member", "day", "model")


def org_entries(
    *,
    organization: Organization,
    member_id: int | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[Entry]:
    """The organization's ledger entries, newest first (``member_id``: only that member's)."""
    entries = entries_of(organization=organization)
    if member_id is not None:
        entries = entries.filter(member_id=member_id)
    if kind:
        entries = entries.filter(kind=kind)
    if since is not None:
        entries = entries.filter(created_at__gte=since)
    if until is not None:
        entries = entries.filter(created_at__lt=until)
    return entries.select_related("member").order_by("-id")


def org_usage(
    *,
    organization: Organization,
    member_id: int | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[UsageRecord]:
    """The requests billed to the organization, newest first (``member_id``: that member's)."""
    records = UsageRecord.objects.filter(organization=organization)
    if member_id is not None:
        records = records.filter(user_id=member_id)
    if model:
        records = records.filter(model=model)
    if since is not None:
        records = records.filter(created_at__gte=since)
    if until is not None:
        records = records.filter(created_at__lt=until)
    return records.select_related("user").order_by("-created_at", "-id")


def org_usage_page(
    *, organization: Organization, size: int, after: str | None = None, before: str | None = None, **filters
) -> Page:
    """One keyset page of ``org_usage`` (``infra.keyset``)."""
    records = org_usage(organization=organization, **filters)
    return keyset_page(records, keyset=BY_TIME, size=size, after=after, before=before)


def org_usage_summary(*, organization: Organization, by: str, **filters) -> list[dict]:
    """Totals per member (with their email), per UTC day or per model: requests, tokens and
    nanodollars charged (settled requests) and held (requests in flight)."""
    records = org_usage(organization=organization, **filters).order_by()
    totals = {
        "requests": Count("id"),
        "prompt_tokens": Sum("prompt_tokens", default=0),
        "completion_tokens": Sum("completion_tokens", default=0),
        "charge": Sum("charge", default=0, filter=~Q(status=UsageStatus.PENDING)),
        "held": Sum("hold_amount", default=0, filter=Q(status=UsageStatus.PENDING)),
    }
    if by == "member":
        rows = records.values("user_id", "user__email").annotate(**totals).order_by("user__email")
        keys = {"user_id": "member", "user__email": "email"}
    elif by == "day":
        rows = records.annotate(day=TruncDate("created_at")).values("day").annotate(**totals).order_by("day")
        keys = {"day": "day"}
    else:
        rows = records.values("model").annotate(**totals).order_by("model")
        keys = {"model": "model"}
    # PostgreSQL sums bigints as numeric: ints on both databases.
    return [{**{new: row[old] for old, new in keys.items()}, **{k: int(row[k]) for k in totals}} for row in rows]


def member_spend(*, organization: Organization, now: datetime | None = None) -> dict[int, dict[str, int]]:
    """Nanodollars each member spent today and this month (UTC): charges plus holds in flight —
    what their spend limits count."""
    now = now or timezone.now()
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    spent = Sum("charge", default=0, filter=~Q(status=UsageStatus.PENDING)) + Sum(
        "hold_amount", default=0, filter=Q(status=UsageStatus.PENDING)
    )
    out: dict[int, dict[str, int]] = {}
    for since, name in ((day, "today"), (month, "month")):
        rows = (
            UsageRecord.objects.filter(organization=organization, created_at__gte=since)
            .order_by()
            .values("user_id")
            .annotate(spent=spent)
        )
        for row in rows:
            out.setdefault(row["user_id"], {"today": 0, "month": 0})[name] = int(row["spent"])
    return out
