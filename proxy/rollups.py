"""Usage rollups: period totals read from hourly sums, exactly what the raw records add up to.

``UsageRollup`` holds, per hour (UTC) × user × organization × API key × requested model × agent
label, the sums of the *settled* usage records (refused ones included). Database triggers
(migration ``proxy.0010``) keep it exact: a record's figures are added when it leaves
``pending`` and the difference is moved when a settled record changes, in the statement that
changes the record — so the hot path keeps its one settlement statement, and no writer (the
proxy, ``reconcile_holds``, the ORM, raw SQL) can forget it. Raw rows deleted by pruning leave
their sums behind.

A period total (``totals``) is one statement, a ``UNION ALL`` of

* the rollup rows of the whole hours inside ``[since, until)``, and
* the raw records of the partial hours at its edges, plus the records still in flight (pending:
  not in any rollup; the ``(status, created_at)`` index finds the few there are),

summed per group in Python. One statement reads one snapshot, so a request settling meanwhile
is counted once — pending in the raw part or settled in the rollup part, never both or neither.

``rebuild`` recomputes a range of hours from the raw rows in set-based SQL (``INSERT … SELECT …
GROUP BY``): used by the migration that created the rollups, ``manage.py
rebuild_usage_rollups`` and the data benchmark. ``discrepancies`` compares the two
(``verify_ledger``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import connection, models, transaction
from django.db.models import Count, F, Q, Subquery, Sum, Value
from django.db.models.functions import Coalesce

from .models import UsageRecord, UsageRollup, UsageStatus

HOUR = timedelta(hours=1)

# Columns the two tables share, by which a rollup row is found and a total may be grouped or
# filtered: ``user``, ``organization``, ``api_key``, ``model``, ``agent`` (and their joins).
KEY_FIELDS = ("user", "organization", "api_key", "model", "agent")


class UtcHour(models.Func):
    """The UTC hour a timestamp falls in — the same SQL as the triggers', so a rebuilt row and a
    trigger-written one meet on the same key."""

    output_field = models.DateTimeField()

    def as_postgresql(self, compiler, connection, **extra_context):
        return self.as_sql(
            compiler, connection, template="date_trunc('hour', %(expressions)s AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
        )

    def as_sqlite(self, compiler, connection, **extra_context):
        # Django keeps SQLite timestamps as UTC text, 'YYYY-MM-DD HH:MM:SS[.ffffff]'. (Not
        # strftime: a '%' in the SQL would trip the formatting of logged queries.)
        return self.as_sql(compiler, connection, template="substr(%(expressions)s, 1, 13) || ':00:00'")


@dataclass(frozen=True)
class Measure:
    """One figure of a total: its sum over rollup rows and over raw records."""

    rollup: Any
    raw: Any


_PENDING = Q(status=UsageStatus.PENDING)
_ZERO = Value(0, output_field=models.BigIntegerField())

MEASURES: dict[str, Measure] = {
    "requests": Measure(Sum("requests"), Count("id")),
    "refused": Measure(Sum("refused"), Count("id", filter=Q(status=UsageStatus.REFUSED))),
    "prompt_tokens": Measure(Sum("prompt_tokens"), Sum("prompt_tokens")),
    "completion_tokens": Measure(Sum("completion_tokens"), Sum("completion_tokens")),
    "reasoning_tokens": Measure(Sum("reasoning_tokens"), Sum("reasoning_tokens")),
    "cached_tokens": Measure(Sum("cached_tokens"), Sum("cached_tokens")),
    "cache_write_tokens": Measure(Sum("cache_write_tokens"), Sum("cache_write_tokens")),
    "upstream_cost": Measure(Sum("upstream_cost"), Sum("upstream_cost")),  # USD, Decimal
    # A pending record has charged nothing yet (its charge is 0 until it settles).
    "charge": Measure(Sum("charge"), Sum("charge")),  # nanodollars
    "operator_loss": Measure(Sum("operator_loss"), Sum("operator_loss")),
    "loss_requests": Measure(Sum("loss_requests"), Count("id", filter=Q(operator_loss__gt=0))),
    # Requests in flight: never in a rollup.
    "pending": Measure(Sum(_ZERO), Count("id", filter=_PENDING)),
    "held": Measure(Sum(_ZERO), Sum("hold_amount", filter=_PENDING)),  # nanodollars
}
DECIMAL_MEASURES = {"upstream_cost"}


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def ceil_hour(moment: datetime) -> datetime:
    floored = floor_hour(moment)
    return floored if floored == moment else floored + HOUR


# A group key: a path both tables have (``"model"``, ``"user__email"``, ``"organization__slug"``)
# or a time bucket, a ``Trunc``-like class applied to the hour (rollups) and ``created_at`` (raw).
Key = str | Callable[[str], Any]


def totals(
    *,
    measures: list[str],
    keys: Mapping[str, Key] | None = None,
    where: Q | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict]:
    """One row per group (``keys``: name → key) of the usage records created in ``[since,
    until)`` that match ``where`` (lookups on ``KEY_FIELDS``), with the ``measures`` summed: ints,
    and ``Decimal`` USD for ``upstream_cost``. Unordered; without ``keys``, one row (zeros when
    nothing matched). Exactly what aggregating the raw records would give, at any since/until."""
    keys = keys or {}
    where = where or Q()
    start = ceil_hour(since) if since is not None else None
    end = floor_hour(until) if until is not None else None
    whole_hours = start is None or end is None or start < end

    raw = UsageRecord.objects.filter(where)
    if since is not None:
        raw = raw.filter(created_at__gte=since)
    if until is not None:
        raw = raw.filter(created_at__lt=until)
    parts = []
    if whole_hours:
        # The edges' partial hours, and what is in flight in between.
        in_raw = _PENDING
        if start is not None:
            in_raw |= Q(created_at__lt=start)
        if end is not None:
            in_raw |= Q(created_at__gte=end)
        raw = raw.filter(in_raw)
        rolled = UsageRollup.objects.filter(where)
        if start is not None:
            rolled = rolled.filter(hour__gte=start)
        if end is not None:
            rolled = rolled.filter(hour__lt=end)
        parts.append(_grouped(rolled, "hour", keys, {name: MEASURES[name].rollup for name in measures}))
    raw_part = _grouped(raw, "created_at", keys, {name: MEASURES[name].raw for name in measures})
    query = raw_part if not parts else parts[0].union(raw_part, all=True)

    merged: dict[tuple, dict] = {}
    for row in query:
        group = tuple(row[f"k_{name}"] for name in keys)
        target = merged.get(group)
        if target is None:
            target = merged[group] = {name: value for name, value in zip(keys, group, strict=True)}
            target.update({name: Decimal(0) if name in DECIMAL_MEASURES else 0 for name in measures})
        for name in measures:
            value = row[f"m_{name}"]
            if value is None:
                continue
            # PostgreSQL sums bigints as numeric: ints on both databases.
            target[name] += Decimal(value) if name in DECIMAL_MEASURES else int(value)
    if not keys and not merged:
        merged[()] = {name: Decimal(0) if name in DECIMAL_MEASURES else 0 for name in measures}
    return list(merged.values())


def _grouped(queryset, moment: str, keys: Mapping[str, Key], sums: dict[str, Any]):
    """``queryset`` grouped by ``keys`` with ``sums``, its columns named ``k_*`` then ``m_*`` in
    the same order on both sides of the union."""
    expressions = {f"k_{name}": F(key) if isinstance(key, str) else key(moment) for name, key in keys.items()}
    grouped = queryset.order_by()
    if expressions:
        grouped = grouped.annotate(**expressions).values(*expressions)
    else:
        # One group of everything: grouped by a constant (which Django leaves out of GROUP BY).
        grouped = grouped.annotate(k_all=Value(1)).values("k_all")
    return grouped.annotate(**{f"m_{name}": expression for name, expression in sums.items()}).order_by()


# --- rebuilding ----------------------------------------------------------------------------------

_ROLLUP_SUMS = {
    "requests": Count("id"),
    "refused": Count("id", filter=Q(status=UsageStatus.REFUSED)),
    "prompt_tokens": Sum("prompt_tokens"),
    "completion_tokens": Sum("completion_tokens"),
    "reasoning_tokens": Sum("reasoning_tokens"),
    "cached_tokens": Sum("cached_tokens"),
    "cache_write_tokens": Sum("cache_write_tokens"),
    "upstream_cost": Coalesce(Sum("upstream_cost"), Value(Decimal(0)), output_field=models.DecimalField()),
    "charge": Sum("charge"),
    "operator_loss": Sum("operator_loss"),
    "loss_requests": Count("id", filter=Q(operator_loss__gt=0)),
}


def rebuild(
    *, since: datetime | None = None, until: datetime | None = None, records=None, rollups=None
) -> tuple[int, int]:
    """Recompute the rollups of the hours from ``since``'s to the one ``until`` falls in (default:
    from the oldest raw record's hour, to the end) from the raw records, in one transaction; returns
    ``(rollup rows deleted, rows written)``.

    Hours whose raw records were pruned must be left out (``since`` after them): their rollups
    are all that is left of them. (``records``/``rollups``: the models — a migration passes its
    historical ones.)

    Exact while requests settle: on PostgreSQL the rollup table is locked against writes
    (SHARE ROW EXCLUSIVE) before anything is read, so every settlement either committed before —
    and is in the raw rows read — or waits and adds itself to the rebuilt row after. Settlements
    wait for the rebuild: rebuild a large range in pieces (``rebuild_usage_rollups`` goes a day
    at a time).
    """
    records = records or UsageRecord
    rollups = rollups or UsageRollup
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f'LOCK TABLE "{rollups._meta.db_table}" IN SHARE ROW EXCLUSIVE MODE')
        if since is None:
            oldest = records.objects.order_by("created_at").values_list("created_at", flat=True).first()
            if oldest is None:
                deleted, _ = rollups.objects.filter(_hours(None, until)).delete()
                return deleted, 0
            since = oldest
        start, end = floor_hour(since), ceil_hour(until) if until is not None else None
        deleted, _ = rollups.objects.filter(_hours(start, end)).delete()
        raw = records.objects.exclude(status=UsageStatus.PENDING).filter(created_at__gte=start)
        if end is not None:
            raw = raw.filter(created_at__lt=end)
        select = (
            raw.order_by()
            .annotate(rollup_hour=UtcHour("created_at"))
            .values("rollup_hour", *KEY_FIELDS)
            # (Prefixed: an annotation named as a field would stand for it in later filters.)
            .annotate(**{f"rollup_{name}": expression for name, expression in _ROLLUP_SUMS.items()})
            .order_by()
        )
        sql, params = select.query.sql_with_params()
        quote = connection.ops.quote_name
        # Selected by alias from the grouped query, whatever order the ORM put its columns in.
        names = [*select.query.values_select, *select.query.annotation_select]
        columns = ", ".join(quote(rollups._meta.get_field(name.removeprefix("rollup_")).column) for name in names)
        aliases = ", ".join(quote(name) for name in names)
        table = quote(rollups._meta.db_table)
        # (S608: identifiers from model metadata; every value is a bound parameter.)
        cursor.execute(f"INSERT INTO {table} ({columns}) SELECT {aliases} FROM ({sql}) AS grouped", params)  # noqa: S608
        return deleted, cursor.rowcount


def _hours(start: datetime | None, end: datetime | None) -> Q:
    hours = Q()
    if start is not None:
        hours &= Q(hour__gte=start)
    if end is not None:
        hours &= Q(hour__lt=end)
    return hours


# --- checking ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    hour: datetime
    user_id: int
    organization_id: int | None
    api_key_id: int | None
    model: str
    agent: str
    differences: dict[str, Any]  # measure → rollup − raw

    def __str__(self):
        off = ", ".join(f"{name} {value:+}" for name, value in self.differences.items())
        org = f" org {self.organization_id}" if self.organization_id else ""
        key = f" key {self.api_key_id}" if self.api_key_id else ""
        return f"rollup {self.hour:%Y-%m-%d %H}:00 user {self.user_id}{org}{key} {self.model!r} {self.agent!r}: {off}"


def discrepancies(*, since: datetime | None = None, until: datetime | None = None, limit: int = 100) -> list[Mismatch]:
    """Rollup rows that are not the sums of their raw settled records, for the hours from
    ``since``'s (default: the one after the oldest raw record's — hours pruned, wholly or in part,
    have their rollups only) to the one ``until`` falls in: at most ``limit``, each with rollup − raw per measure.

    One statement: each table grouped over the range, the two subtracted per group by the
    database. ``upstream_cost`` is compared exactly on PostgreSQL; SQLite keeps decimals as binary
    floats, so there to within half a nanodollar.
    """
    start, end = floor_hour(since) if since is not None else None, ceil_hour(until) if until is not None else None
    raw = UsageRecord.objects.exclude(status=UsageStatus.PENDING)
    if start is not None:
        raw = raw.filter(created_at__gte=start)
    if end is not None:
        raw = raw.filter(created_at__lt=end)
    rolled = UsageRollup.objects.filter(_hours(start, end))
    if start is None:
        # The hours after the oldest raw record's, found by the same statement (no records:
        # nothing): pruning cuts at any instant, so that hour's raw rows may be partly gone.
        oldest = UsageRecord.objects.order_by("created_at").annotate(first=UtcHour("created_at")).values("first")[:1]
        rolled = rolled.filter(hour__gt=Subquery(oldest))
        raw = raw.annotate(raw_hour=UtcHour("created_at")).filter(raw_hour__gt=Subquery(oldest))
    keys: dict[str, Key] = {"hour": UtcHour, **{name: _column(name) for name in KEY_FIELDS}}
    names = list(_ROLLUP_SUMS)
    both = _grouped(rolled, "hour", keys, {name: Sum(name) for name in names}).annotate(side=Value(1))
    both = both.union(_grouped(raw, "created_at", keys, _ROLLUP_SUMS).annotate(side=Value(-1)), all=True)
    sql, params = both.query.sql_with_params()
    quote = connection.ops.quote_name
    group = ", ".join(quote(f"k_{name}") for name in keys)
    sums = ", ".join(f"SUM(side * {quote(f'm_{name}')})" for name in names)
    if connection.vendor == "postgresql":
        off = " OR ".join(f"SUM(side * {quote(f'm_{name}')}) <> 0" for name in names)
    else:
        off = " OR ".join(
            f"ABS(SUM(side * {quote(f'm_{name}')})) >= 0.0000000005"
            if name in DECIMAL_MEASURES
            else f"SUM(side * {quote(f'm_{name}')}) <> 0"
            for name in names
        )
    found = []
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {group}, {sums} FROM ({sql}) AS sides GROUP BY {group} HAVING {off} LIMIT %s",  # noqa: S608
            [*params, limit],
        )
        for row in cursor.fetchall():
            hour, user_id, organization_id, api_key_id, model, agent = row[: len(keys)]
            if isinstance(hour, str):  # SQLite's text timestamps
                hour = datetime.fromisoformat(hour).replace(tzinfo=UTC)
            differences = {name: value for name, value in zip(names, row[len(keys) :], strict=True) if value}
            found.append(Mismatch(hour, user_id, organization_id, api_key_id, model, agent, differences))
    return found


def _column(name: str) -> str:
    """A key field's column: the id of the three foreign keys."""
    return f"{name}_id" if name in ("user", "organization", "api_key") else name
