"""Reads of a user's usage records: filtered lists, one record, and totals per day or model.

Every function takes the user and starts from that user's rows, so no caller can forget the
ownership filter. Totals are computed by the database (one GROUP BY query plus one aggregate),
identically on SQLite and PostgreSQL; money stays integer nanodollars until it is rendered.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal

from django.db.models import Count, Max, Min, Q, QuerySet, Sum
from django.db.models.functions import TruncDate

from core.money import format_usd, usd_to_nanos
from infra.keyset import BY_TIME, Page, keyset_chunks, keyset_page
from wallet.models import Entry, EntryKind
from wallet.selectors import csv_safe_text

from .limits import CHARGE_RUN_FIELD
from .models import UsageRecord, UsageStatus

GROUPINGS = ("day", "model")
_TOTALS = {
    "requests": Count("id"),
    "prompt_tokens": Sum("prompt_tokens", default=0),
    "completion_tokens": Sum("completion_tokens", default=0),
    "reasoning_tokens": Sum("reasoning_tokens", default=0),
    "cached_tokens": Sum("cached_tokens", default=0),
    # Records whose upstream cost is unknown (refused, nothing reported) add nothing.
    "upstream_cost": Sum("upstream_cost", default=Decimal(0)),
    "charge": Sum("charge", default=0),  # nanodollars
}


def usage_list(
    *,
    user,
    model: str | None = None,
    api_key_id: int | None = None,
    run: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[UsageRecord]:
    """The user's records, newest first. ``since`` is inclusive, ``until`` exclusive. (Requests
    billed to an organization are the organization's: ``orgweb``.)"""
    queryset = UsageRecord.objects.filter(user=user, organization__isnull=True)
    if model:
        queryset = queryset.filter(model=model)
    if run:
        queryset = queryset.filter(run=run)
    if api_key_id is not None:
        # Filtering through the user's own rows means another user's key id matches nothing.
        queryset = queryset.filter(api_key_id=api_key_id)
    if since is not None:
        queryset = queryset.filter(created_at__gte=since)
    if until is not None:
        queryset = queryset.filter(created_at__lt=until)
    return queryset.order_by("-created_at", "-id")


def usage_page(*, user, size: int, after: str | None = None, before: str | None = None, **filters) -> Page:
    """One keyset page of ``usage_list(user=user, **filters)`` (``infra.keyset``): below the
    record ``after``, above the record ``before``, or the newest."""
    return keyset_page(usage_list(user=user, **filters), keyset=BY_TIME, size=size, after=after, before=before)


CSV_CHUNK_ROWS = 2000  # records per keyset read of an export
USAGE_CSV_COLUMNS = [
    "id",
    "created_at",
    "request_id",
    "model",
    "served_model",
    "upstream",
    "status",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "upstream_cost",
    "charge",
    "estimated",
    "run",
    "agent",
    "tool",
]
_TEXT_COLUMNS = {"request_id", "model", "served_model", "upstream", "run", "agent", "tool"}


class _Line:
    def write(self, value: str) -> str:
        return value


def usage_csv_lines(records: QuerySet[UsageRecord], *, chunk_size: int | None = None) -> Iterator[str]:
    """The records as CSV lines (header first), newest first, read ``chunk_size`` at a time by
    keyset, so memory stays flat however many there are. Money is 9-place USD like the JSON;
    the model, run, agent and tool labels come from API clients, so they are made
    spreadsheet-safe."""
    writer = csv.writer(_Line())
    yield writer.writerow(USAGE_CSV_COLUMNS)
    for chunk in keyset_chunks(records.values(*USAGE_CSV_COLUMNS), keyset=BY_TIME, size=chunk_size or CSV_CHUNK_ROWS):
        for row in chunk:
            cost = row["upstream_cost"]
            # A new dict: keyset_chunks reads the next chunk's start from the last row as it was.
            shown = {
                **row,
                "created_at": row["created_at"].isoformat(),
                "upstream_cost": "" if cost is None else format_usd(usd_to_nanos(cost)),
                "charge": format_usd(row["charge"]),
                "stream": str(row["stream"]).lower(),
                "estimated": str(row["estimated"]).lower(),
                **{name: csv_safe_text(row[name]) for name in _TEXT_COLUMNS},
            }
            yield writer.writerow([shown[name] for name in USAGE_CSV_COLUMNS])


def usage_get(*, user, usage_id: int) -> UsageRecord | None:
    return UsageRecord.objects.filter(user=user, organization__isnull=True, pk=usage_id).first()


def usage_summary(*, user, group_by: str, **filters) -> dict:
    """``{"results": [{<group>: …, **totals}], "totals": {…}}`` for the filtered records.

    Days are UTC calendar days (TIME_ZONE is UTC), oldest first; models are ordered by what they
    cost the user, most first.
    """
    if group_by not in GROUPINGS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPINGS)}")
    queryset = usage_list(user=user, **filters).order_by()
    # Aggregates are named total_* because an annotation may not reuse a field's name.
    totals = {f"total_{name}": expression for name, expression in _TOTALS.items()}
    if group_by == "day":
        grouped = queryset.annotate(day=TruncDate("created_at")).values("day").annotate(**totals).order_by("day")
    else:
        grouped = queryset.values("model").annotate(**totals).order_by("-total_charge", "model")
    return {
        "results": [{group_by: row[group_by], **_untotal(row)} for row in grouped],
        "totals": _untotal(queryset.aggregate(**totals)),
    }


def _untotal(row: dict) -> dict:
    # PostgreSQL's SUM(bigint) is numeric, so counts and nanodollars come back as Decimal there:
    # normalise them to int so callers see the same types on both databases.
    return {name: row[f"total_{name}"] if name == "upstream_cost" else int(row[f"total_{name}"]) for name in _TOTALS}


def run_summary(*, user, run: str) -> dict | None:
    """What one of the user's runs (``X-Tokentill-Run``) did: its model calls and the tool charges
    made with its label, or None when it has neither.

    ``requests`` counts every model call, refused ones included; ``steps`` those admitted (what
    the run's step limit counts); ``spend`` is nanodollars charged — settled model calls plus
    tool charges (a request still in flight adds its charge when it settles).
    """
    records = UsageRecord.objects.filter(user=user, run=run).aggregate(
        requests=Count("id"),
        steps=Count("id", filter=~Q(status=UsageStatus.REFUSED)),
        charged=Sum("charge", default=0),
        first_at=Min("created_at"),
        last_at=Max("created_at"),
    )
    tools = Entry.objects.filter(
        wallet__user=user, kind=EntryKind.CHARGE, **{f"metadata__{CHARGE_RUN_FIELD}": run}
    ).aggregate(
        count=Count("id"),
        debited=Sum("amount", default=0),
        first_at=Min("created_at"),
        last_at=Max("created_at"),
    )
    if not records["requests"] and not tools["count"]:
        return None
    times = [t for t in (records["first_at"], records["last_at"], tools["first_at"], tools["last_at"]) if t]
    return {
        "run": run,
        "steps": records["steps"],
        "spend": int(records["charged"]) - int(tools["debited"]),  # debits are negative; Decimal on PostgreSQL
        "requests": records["requests"],
        "tool_charges": tools["count"],
        "first_at": min(times),
        "last_at": max(times),
    }
