"""Reads of an organization's ledger and usage, by member. (``orgweb`` sits above ``proxy``,
whose usage records these read; ``orgs`` below it cannot.)"""

from __future__ import annotations

from datetime import datetime

from django.db.models import Q, QuerySet
from django.db.models.functions import TruncDate
from django.utils import timezone

from infra.keyset import BY_TIME, Page, keyset_page
from orgs.models import Organization
from proxy import rollups
from proxy.models import UsageRecord
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


def org_usage_summary(
    *,
    organization: Organization,
    by: str,
    member_id: int | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict]:
    """Totals per member (with their email), per UTC day or per model: requests, tokens and
    nanodollars charged (settled requests) and held (requests in flight). From the rollups
    (``proxy.rollups``), exact at any since/until."""
    where = Q(organization=organization)
    if member_id is not None:
        where &= Q(user_id=member_id)
    if model:
        where &= Q(model=model)
    measures = ["requests", "prompt_tokens", "completion_tokens", "charge", "held"]
    if by == "member":
        keys: dict = {"member": "user_id", "email": "user__email"}
        order = "email"
    elif by == "day":
        keys, order = {"day": TruncDate}, "day"
    else:
        keys, order = {"model": "model"}, "model"
    rows = rollups.totals(measures=measures, keys=keys, where=where, since=since, until=until)
    return sorted(rows, key=lambda row: row[order])


def member_spend(*, organization: Organization, now: datetime | None = None) -> dict[int, dict[str, int]]:
    """Nanodollars each member spent today and this month (UTC): charges plus holds in flight —
    what their spend limits count."""
    now = now or timezone.now()
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    out: dict[int, dict[str, int]] = {}
    for since, name in ((day, "today"), (month, "month")):
        rows = rollups.totals(
            measures=["charge", "held"], keys={"user_id": "user_id"}, where=Q(organization=organization), since=since
        )
        for row in rows:
            out.setdefault(row["user_id"], {"today": 0, "month": 0})[name] = row["charge"] + row["held"]
    return out
