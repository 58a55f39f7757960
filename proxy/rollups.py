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
from functools import reduce
from operator import or_ as operator_or
from typing import Any

from django.apps import apps as installed_apps
from django.db import connection, models, transaction
from django.db.models import Case, Count, F, Q, Subquery, Sum, Value, When
from django.db.models.functions import (
    Coalesce,
    TruncDate,
    TruncDay,
    TruncMonth,
    TruncQuarter,
    TruncWeek,
    TruncYear,
)

from .models import (
    ModelDayRollup,
    ModelHourRollup,
    ModelRollupJournal,
    SpenderMonthRollup,
    UsageDayRollup,
    UsageRecord,
    UsageRollup,
    UsageStatus,
    UserDayRollup,
    UserMonthRollup,
)

HOUR = timedelta(hours=1)

# Columns the two tables share, by which a rollup row is found and a total may be grouped or
# filtered: ``user``, ``organization``, ``api_key``, ``model``, ``agent`` (and their joins).
KEY_FIELDS = ("user", "organization", "api_key", "model", "agent")


class _UtcTrunc(models.Func):
    """The start of the UTC ``unit`` a timestamp falls in — the same SQL as the triggers', so a
    rebuilt row and a trigger-written one meet on the same key. On SQLite, Django keeps timestamps
    as UTC text, 'YYYY-MM-DD HH:MM:SS[.ffffff]': a prefix of it, completed. (Not strftime: a '%'
    in the SQL would trip the formatting of logged queries.)"""

    output_field = models.DateTimeField()
    unit: str
    sqlite: str  # the SQLite template

    def as_postgresql(self, compiler, connection, **extra_context):
        template = f"date_trunc('{self.unit}', %(expressions)s AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
        return self.as_sql(compiler, connection, template=template)

    def as_sqlite(self, compiler, connection, **extra_context):
        return self.as_sql(compiler, connection, template=self.sqlite)


class UtcHour(_UtcTrunc):
    unit, sqlite = "hour", "substr(%(expressions)s, 1, 13) || ':00:00'"


class UtcDay(_UtcTrunc):
    unit, sqlite = "day", "substr(%(expressions)s, 1, 10) || ' 00:00:00'"


class UtcMonth(_UtcTrunc):
    unit, sqlite = "month", "substr(%(expressions)s, 1, 7) || '-01 00:00:00'"


# The key fields the per-user day and month levels keep (not the API key, not the agent label).
DAY_FIELDS = frozenset({"user", "organization", "model"})
# Time buckets a level of each grain can answer: each groups whole UTC days or months (the
# product's TIME_ZONE is UTC). Any other callable key (an hour bucket) reads the hourly levels.
BUCKETS = {
    "day": frozenset({TruncDate, TruncDay, TruncWeek, TruncMonth, TruncQuarter, TruncYear}),
    "month": frozenset({TruncMonth, TruncQuarter, TruncYear}),
}
DAY = timedelta(days=1)


@dataclass(frozen=True)
class Measure:
    """One figure of a total: its sum over rollup rows and over raw records."""

    rollup: Any
    raw: Any


_PENDING = Q(status=UsageStatus.PENDING)
_ZERO = Value(0, output_field=models.BigIntegerField())

MEASURES: dict[str, Measure] = {
    "requests": Measure(Sum("requests"), Count("id")),
    "records": Measure(Sum("requests"), Count("id")),  # (internal: whether a group has any)
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


def floor_day(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def ceil_day(moment: datetime) -> datetime:
    floored = floor_day(moment)
    return floored if floored == moment else floored + DAY


def floor_month(moment: datetime) -> datetime:
    return floor_day(moment).replace(day=1)


def next_month(moment: datetime) -> datetime:
    """The first instant (UTC) of the month after the one ``moment`` is in."""
    floored = floor_month(moment)
    return (
        floored.replace(year=floored.year + 1, month=1)
        if floored.month == 12
        else floored.replace(month=floored.month + 1)
    )


def ceil_month(moment: datetime) -> datetime:
    floored = floor_month(moment)
    return floored if floored == moment else next_month(moment)


GRAINS = {"month": (floor_month, ceil_month), "day": (floor_day, ceil_day), "hour": (floor_hour, ceil_hour)}

# Where a total's whole months, days and hours are read, coarsest first; for each grain the first
# level that keeps every field the total names and answers its time buckets (``totals``).
USER_LEVELS: list[tuple[str, Any, frozenset[str]]] = [
    ("month", UserMonthRollup, DAY_FIELDS),
    ("day", UserDayRollup, frozenset({"user", "organization"})),
    ("day", UsageDayRollup, DAY_FIELDS),
    ("hour", UsageRollup, frozenset(KEY_FIELDS)),
]
# Operator-wide (no ``where``, grouped by model and time buckets at most), plus the journal.
OPERATOR_LEVELS: list[tuple[str, Any, frozenset[str]]] = [
    ("day", ModelDayRollup, frozenset({"model"})),
    ("hour", ModelHourRollup, frozenset({"model"})),
]

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
    nothing matched). Exactly what aggregating the raw records would give, at any since/until.

    Each part of the range is read from the coarsest level that covers it (``_cover``): whole
    months from a month level, the whole days left at the edges from a day level, the whole hours
    left from an hourly one, the partial hours and the records in flight from the raw rows — one
    statement, a ``UNION ALL``, one snapshot. For each grain the level is the first of
    ``USER_LEVELS`` (or ``OPERATOR_LEVELS``, for totals with no ``where`` grouped by model and
    time buckets at most: those add the journal's unfolded rows) that keeps every field the total
    names and whose grain its time buckets fit; the hourly level always does."""
    keys = keys or {}
    where = where or Q()
    fields = _fields(where, keys)
    operator = not where and fields <= {"model"}
    levels: list[tuple[str, Any]] = []
    for grain, model, kept in OPERATOR_LEVELS if operator else USER_LEVELS:
        buckets_ok = all(isinstance(key, str) or grain == "hour" or key in BUCKETS[grain] for key in keys.values())
        # The month level has a row per model: it pays only for totals that name the model (the
        # others read a user's days: one row a day).
        wanted = grain != "month" or "model" in fields
        if fields <= kept and buckets_ok and wanted and grain not in dict(levels):
            levels.append((grain, model))
    segments = _cover(since, until, [grain for grain, _ in levels])

    raw = UsageRecord.objects.filter(where)
    if since is not None:
        raw = raw.filter(created_at__gte=since)
    if until is not None:
        raw = raw.filter(created_at__lt=until)
    # The partial hours at the edges, and what is in flight anywhere in the range.
    edges = [_range("created_at", lo, hi) for grain, lo, hi in segments if grain == "raw"]
    raw = raw.filter(reduce(operator_or, edges, _PENDING))
    # Every level sums its records too (``records``): a group whose records all moved away (a
    # correction changed their model) leaves rows that add up to nothing, and is no group.
    counted = [*measures, "records"] if keys and "requests" not in measures else list(measures)
    sums = {name: MEASURES[name].rollup for name in counted}
    parts = []
    for grain, model in levels:
        covered = [_range(grain, lo, hi) for level, lo, hi in segments if level == grain]
        if covered:
            parts.append(_grouped(model.objects.filter(where).filter(reduce(operator_or, covered)), grain, keys, sums))
    if operator:
        # The journal's rows not folded yet, in every whole hour read from the levels.
        rolled = [_range("hour", lo, hi) for grain, lo, hi in segments if grain != "raw"]
        if rolled:
            journal = ModelRollupJournal.objects.filter(reduce(operator_or, rolled))
            parts.append(_grouped(journal, "hour", keys, sums))
    raw_part = _grouped(raw, "created_at", keys, {name: MEASURES[name].raw for name in counted})
    # (The rollup part first: its columns' types convert every row, SQLite's decimals included.)
    query = parts[0].union(*parts[1:], raw_part, all=True) if parts else raw_part

    merged: dict[tuple, dict] = {}
    for row in query:
        group = tuple(row[f"k_{name}"] for name in keys)
        target = merged.get(group)
        if target is None:
            target = merged[group] = {name: value for name, value in zip(keys, group, strict=True)}
            target.update({name: Decimal(0) if name in DECIMAL_MEASURES else 0 for name in counted})
        for name in counted:
            value = row[f"m_{name}"]
            if value is None:
                continue
            # PostgreSQL sums bigints as numeric: ints on both databases.
            target[name] += _decimal(value) if name in DECIMAL_MEASURES else int(value)
    if not keys and not merged:
        merged[()] = {name: Decimal(0) if name in DECIMAL_MEASURES else 0 for name in measures}
    if not keys:
        return list(merged.values())
    found = [row for row in merged.values() if row.get("records", row.get("requests"))]
    if "records" in counted and "requests" not in measures:
        for row in found:
            del row["records"]
    return found


# Rollup decimals have 15 places (nanodollars and finer).
_PLACES = Decimal("1e-15")


def _decimal(value) -> Decimal:
    """A summed USD figure: PostgreSQL's numerics exactly; SQLite keeps decimals as binary floats
    (Django reads its sums back to 15 significant digits, so parts of different sizes would add
    up float noise below the columns' 15 places): rounded to those places."""
    if connection.vendor == "sqlite":
        return Decimal(repr(value) if isinstance(value, float) else value).quantize(_PLACES)
    return Decimal(value)


def _cover(since: datetime | None, until: datetime | None, grains: list[str]) -> list[tuple[str, Any, Any]]:
    """``[since, until)`` cut into ``(grain, start, end)`` segments, the coarsest grain first: the
    whole months (say) inside it, then the whole days of what is left at each edge, then the whole
    hours, and the rest ``"raw"``. An open bound is ``None``."""
    if not grains:
        return [("raw", since, until)]
    grain, finer = grains[0], grains[1:]
    floor, ceil = GRAINS[grain]
    start = ceil(since) if since is not None else None
    end = floor(until) if until is not None else None
    if start is not None and end is not None and start >= end:
        return _cover(since, until, finer)
    found: list[tuple[str, Any, Any]] = [(grain, start, end)]
    if since is not None and start is not None and since < start:
        found += _cover(since, start, finer)
    if until is not None and end is not None and end < until:
        found += _cover(end, until, finer)
    return found


def _fields(where: Q, keys: Mapping[str, Key]) -> set[str]:
    """The key fields ``where`` and the string ``keys`` name (``"user__email"`` names ``user``)."""
    names = {key for key in keys.values() if isinstance(key, str)}

    def walk(node) -> None:
        for child in node.children:
            if isinstance(child, Q):
                walk(child)
            elif isinstance(child, tuple):
                names.add(child[0])
            else:  # an expression: which columns it reads is not known here, so none of the coarse levels
                names.add("?")

    walk(where)
    return {name.split("__", 1)[0].removesuffix("_id") for name in names}


def _range(field: str, start: datetime | None, end: datetime | None) -> Q:
    """``start <= field < end``, either bound open when none."""
    found = Q()
    if start is not None:
        found &= Q(**{f"{field}__gte": start})
    if end is not None:
        found &= Q(**{f"{field}__lt": end})
    return found


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


# --- folding the journal -------------------------------------------------------------------------


FOLD_BATCH = 50_000


def fold(*, batch: int = FOLD_BATCH) -> int:
    """Move every committed journal row into the operator-wide levels (``ModelHourRollup``,
    ``ModelDayRollup``), the oldest ``batch`` at a time; returns how many it moved.

    Each batch is one transaction that deletes the rows it adds: in any snapshot a journal delta
    is either still in the journal or in the folded rows, never both or neither, and readers sum
    both in one statement. On PostgreSQL a batch is one statement (``WITH moved AS (DELETE …
    RETURNING …)``, grouped into the two tables with ``ON CONFLICT … DO UPDATE``); rows a
    settlement has not committed yet are not in its snapshot and stay for the next batch or fold.
    Folds (and ``rebuild_levels``) take turns on a table lock, so two never update the same rows
    in different orders. On SQLite (one writer at a time) three statements in one transaction,
    bounded by the highest journal id of the batch. (Batches keep a fold that catches up on a
    long backlog from holding the lock, or its rows in memory, all at once.)
    """
    moved = 0
    while True:
        with transaction.atomic():
            done = _fold_batch(batch)
        moved += done
        if done < batch:
            return moved


def _fold_batch(batch: int) -> int:
    journal = _table(ModelRollupJournal)
    hours, days = _table(ModelHourRollup), _table(ModelDayRollup)
    names = list(_ROLLUP_SUMS)
    columns = ", ".join(names)
    summed = ", ".join(f"SUM({name})" for name in names)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            added = ", ".join(f"{name} = t.{name} + excluded.{name}" for name in names)
            day = "date_trunc('day', hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
            cursor.execute(f"LOCK TABLE {days} IN SHARE ROW EXCLUSIVE MODE")
            cursor.execute(
                f"""WITH moved AS (
                    DELETE FROM {journal} WHERE id IN (SELECT id FROM {journal} ORDER BY id LIMIT %s)
                    RETURNING hour, model, {columns}
                ),
                hourly AS (
                    INSERT INTO {hours} AS t (hour, model, {columns})
                    SELECT hour, model, {summed} FROM moved GROUP BY hour, model
                    ON CONFLICT (hour, model) DO UPDATE SET {added}
                ),
                daily AS (
                    INSERT INTO {days} AS t (day, model, {columns})
                    SELECT {day}, model, {summed} FROM moved GROUP BY 1, 2
                    ON CONFLICT (day, model) DO UPDATE SET {added}
                )
                SELECT count(*) FROM moved""",  # noqa: S608
                [batch],
            )
            return int(cursor.fetchone()[0])
        added = ", ".join(f"{name} = {name} + excluded.{name}" for name in names)
        cursor.execute(f"SELECT max(id), count(*) FROM (SELECT id FROM {journal} ORDER BY id LIMIT %s)", [batch])  # noqa: S608
        last, count = cursor.fetchone()
        if last is None:
            return 0
        for table, moment in ((hours, "hour"), (days, "substr(hour, 1, 10) || ' 00:00:00'")):
            column = "hour" if table == hours else "day"
            cursor.execute(
                f"INSERT INTO {table} ({column}, model, {columns}) SELECT {moment}, model, {summed} "  # noqa: S608
                f"FROM {journal} WHERE id <= %s GROUP BY 1, 2 "
                f"ON CONFLICT ({column}, model) DO UPDATE SET {added}",
                [last],
            )
        cursor.execute(f"DELETE FROM {journal} WHERE id <= %s", [last])  # noqa: S608
        return int(count)


def journal_backlog() -> datetime | None:
    """When the oldest journal row not yet folded was written (none: the journal is empty). Old
    means nothing folds it: ``reconcile_holds`` is not running."""
    return ModelRollupJournal.objects.order_by("id").values_list("created_at", flat=True).first()


def _table(model) -> str:
    return connection.ops.quote_name(model._meta.db_table)


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
    *, since: datetime | None = None, until: datetime | None = None, records=None, rollups=None, levels: bool = True
) -> tuple[int, int]:
    """Recompute the rollups of the hours from ``since``'s to the one ``until`` falls in (default:
    from the oldest raw record's hour, to the end) from the raw records, in one transaction; returns
    ``(rollup rows deleted, rows written)``. With ``levels`` (the default), then the coarser levels
    of the days (and months) those hours are in, from the hourly rows (``rebuild_levels``), in the
    same transaction.

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
                deleted, _ = rollups.objects.filter(_range("hour", None, until)).delete()
                if levels:
                    rebuild_levels(until=until)
                return deleted, 0
            since = oldest
        start, end = floor_hour(since), ceil_hour(until) if until is not None else None
        deleted, _ = rollups.objects.filter(_range("hour", start, end)).delete()
        raw = records.objects.exclude(status=UsageStatus.PENDING).filter(created_at__gte=start)
        if end is not None:
            raw = raw.filter(created_at__lt=end)
        keys = {"hour": UtcHour("created_at"), **{name: F(name) for name in KEY_FIELDS}}
        written = _insert_grouped(rollups, raw, keys, _ROLLUP_SUMS)
        if levels:
            rebuild_levels(since=start, until=end)
        return deleted, written


def rebuild_levels(*, since: datetime | None = None, until: datetime | None = None, apps=None) -> int:
    """Recompute the coarser levels from the hourly rollups, for the whole days (the spender
    months: the whole months) ``[since, until)`` touches (default: all), in one transaction;
    returns the rows written. The journal's rows of those days are dropped: their deltas are in
    the hourly rows read. (``apps``: a migration's historical models.)

    Derived from the hourly rows, not the raw ones: pruned hours keep their rollups, and the hourly
    table is what the triggers keep exact. On PostgreSQL, exact while requests settle and folds
    run: the hourly table is locked against writes (a settlement writes its hourly row first, so
    one that waits has written no other level yet) and so is the day table the fold locks."""
    get = (apps or installed_apps).get_model
    hourly, by_day = get("proxy", "UsageRollup"), get("proxy", "UsageDayRollup")
    user_days, user_months = get("proxy", "UserDayRollup"), get("proxy", "UserMonthRollup")
    model_hours, model_days = get("proxy", "ModelHourRollup"), get("proxy", "ModelDayRollup")
    journal, spenders = get("proxy", "ModelRollupJournal"), get("proxy", "SpenderMonthRollup")
    day_start = floor_day(since) if since is not None else None
    day_end = ceil_day(until) if until is not None else None
    month_start = floor_month(since) if since is not None else None
    month_end = ceil_month(until) if until is not None else None
    sums = {name: Sum(name) for name in _ROLLUP_SUMS}
    written = 0
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            for model in (hourly, model_days):
                cursor.execute(f'LOCK TABLE "{model._meta.db_table}" IN SHARE ROW EXCLUSIVE MODE')
        hours = hourly.objects.filter(_range("hour", day_start, day_end))
        by_day.objects.filter(_range("day", day_start, day_end)).delete()
        keys = {"day": UtcDay("hour"), **{name: F(name) for name in sorted(DAY_FIELDS)}}
        written += _insert_grouped(by_day, hours, keys, sums)
        user_days.objects.filter(_range("day", day_start, day_end)).delete()
        keys = {"day": UtcDay("hour"), "user": F("user"), "organization": F("organization")}
        written += _insert_grouped(user_days, hours, keys, sums)
        month_hours = hourly.objects.filter(_range("hour", month_start, month_end))
        user_months.objects.filter(_range("month", month_start, month_end)).delete()
        keys = {"month": UtcMonth("hour"), **{name: F(name) for name in sorted(DAY_FIELDS)}}
        written += _insert_grouped(user_months, month_hours, keys, sums)

        journal.objects.filter(_range("hour", day_start, day_end)).delete()
        model_hours.objects.filter(_range("hour", day_start, day_end)).delete()
        model_days.objects.filter(_range("day", day_start, day_end)).delete()
        written += _insert_grouped(model_hours, hours, {"hour": F("hour"), "model": F("model")}, sums)
        written += _insert_grouped(model_days, hours, {"day": UtcDay("hour"), "model": F("model")}, sums)

        spenders.objects.filter(_range("month", month_start, month_end)).delete()
        written += _insert_grouped(
            spenders,
            month_hours,
            {"month": UtcMonth("hour"), **_PAYER},
            {"charge": Sum("charge")},
            having=~Q(rollup_charge=0),
        )
    return written


# The payer a spender row names: the user for their own wallet, the organization for its.
_PAYER = {
    "user": Case(When(organization__isnull=True, then=F("user")), output_field=models.BigIntegerField()),
    "organization": F("organization"),
}


def _insert_grouped(target, source, keys: dict[str, Any], sums: dict[str, Any], having: Q | None = None) -> int:
    """``INSERT INTO target … SELECT`` ``source`` grouped by ``keys`` with ``sums`` (target field →
    expression), set-based in the database; returns the rows written."""
    # (Prefixed: an annotation named as a field would stand for it in later filters.)
    select = (
        source.order_by()
        .annotate(**{f"rollup_{name}": expression for name, expression in keys.items()})
        .values(*(f"rollup_{name}" for name in keys))
        .annotate(**{f"rollup_{name}": expression for name, expression in sums.items()})
        .order_by()
    )
    if having is not None:
        select = select.filter(having)
    sql, params = select.query.sql_with_params()
    quote = connection.ops.quote_name
    # Selected by alias from the grouped query, whatever order the ORM put its columns in.
    names = [*select.query.values_select, *select.query.annotation_select]
    names = [name for name in names if name.startswith("rollup_")]
    columns = ", ".join(quote(target._meta.get_field(name.removeprefix("rollup_")).column) for name in names)
    aliases = ", ".join(quote(name) for name in names)
    table = quote(target._meta.db_table)
    with connection.cursor() as cursor:
        # (S608: identifiers from model metadata; every value is a bound parameter.)
        cursor.execute(f"INSERT INTO {table} ({columns}) SELECT {aliases} FROM ({sql}) AS grouped", params)  # noqa: S608
        return cursor.rowcount


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


def discrepancies(
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    hourly: bool = True,
    levels: bool = True,
) -> list[Mismatch | LevelMismatch]:
    """Hourly rollup rows that are not the sums of their raw records (``hourly_discrepancies``),
    then rows of the coarser levels that are not the sums of their hourly rows
    (``level_discrepancies``): at most ``limit`` in all. ``hourly``/``levels`` pick one of the two
    (``verify_ledger`` checks the hours a day at a time and the levels a month at a time)."""
    found: list[Mismatch | LevelMismatch] = []
    if hourly:
        found += hourly_discrepancies(since=since, until=until, limit=limit)
    if levels and len(found) < limit:
        found += level_discrepancies(since=since, until=until, limit=limit - len(found))
    return found


def hourly_discrepancies(
    *, since: datetime | None = None, until: datetime | None = None, limit: int = 100
) -> list[Mismatch]:
    """Rollup rows that are not the sums of their raw settled records, for the hours from
    ``since``'s (default: the one after the oldest raw record's — hours pruned, wholly or in part,
    have their rollups only) to the one ``until`` falls in: at most ``limit``, each with rollup − raw per measure.

    One statement (``_differences``): the raw records grouped over the range, joined (FULL JOIN)
    to the rollup rows on the group — one row per group already
    (``usagerollup_one_row_per_group``), so that side is read, not grouped — and each measure
    compared.
    """
    start, end = floor_hour(since) if since is not None else None, ceil_hour(until) if until is not None else None
    raw = UsageRecord.objects.exclude(status=UsageStatus.PENDING)
    if start is not None:
        raw = raw.filter(created_at__gte=start)
    if end is not None:
        raw = raw.filter(created_at__lt=end)
    rolled = UsageRollup.objects.filter(_range("hour", start, end))
    if start is None:
        # The hours after the oldest raw record's, found by the same statement (no records:
        # nothing): pruning cuts at any instant, so that hour's raw rows may be partly gone.
        oldest = UsageRecord.objects.order_by("created_at").annotate(first=UtcHour("created_at")).values("first")[:1]
        rolled = rolled.filter(hour__gt=Subquery(oldest))
        raw = raw.annotate(raw_hour=UtcHour("created_at")).filter(raw_hour__gt=Subquery(oldest))
    keys: dict[str, Key] = {"hour": UtcHour, **{name: _column(name) for name in KEY_FIELDS}}
    grouped = _grouped(raw, "created_at", keys, _ROLLUP_SUMS)
    found = []
    for group, differences in _differences(rolled, grouped, list(keys), list(_ROLLUP_SUMS), limit):
        hour = group["hour"]
        if isinstance(hour, str):  # SQLite's text timestamps
            hour = datetime.fromisoformat(hour).replace(tzinfo=UTC)
        found.append(
            Mismatch(
                hour,
                group["user"],
                group["organization"],
                group["api_key"],
                group["model"],
                group["agent"],
                differences,
            )
        )
    return found


def _column(name: str) -> str:
    """A key field's column: the id of the three foreign keys."""
    return f"{name}_id" if name in ("user", "organization", "api_key") else name


@dataclass(frozen=True)
class LevelMismatch:
    level: str
    group: dict[str, Any]
    differences: dict[str, Any]  # measure → level − hourly

    def __str__(self):
        group = " ".join(f"{name} {value}" for name, value in self.group.items())
        off = ", ".join(f"{name} {value:+}" for name, value in self.differences.items())
        return f"{self.level} rollup {group}: {off}"


def level_discrepancies(
    *, since: datetime | None = None, until: datetime | None = None, limit: int = 100
) -> list[LevelMismatch]:
    """Rows of the coarser levels that are not the sums of the finer rows they stand for, over the
    whole days (months, for the month levels) ``[since, until)`` touches (default: all): the day
    level against the hourly rows, the user days and months against the day level, the
    operator's hours and days (folded rows plus the journal) against the hourly rows, the
    spenders' months against the user days — each level exact if the finer one is, and each
    compared with the smallest finer level. One statement per level, so each compares one
    snapshot."""
    day_start = floor_day(since) if since is not None else None
    day_end = ceil_day(until) if until is not None else None
    month_start = floor_month(since) if since is not None else None
    month_end = ceil_month(until) if until is not None else None
    hours = UsageRollup.objects.filter(_range("hour", day_start, day_end))
    journal = ModelRollupJournal.objects.filter(_range("hour", day_start, day_end))
    names = list(_ROLLUP_SUMS)
    sums = {name: Sum(name) for name in names}
    day_keys: dict[str, Key] = {"day": UtcDay, **{name: _column(name) for name in sorted(DAY_FIELDS)}}
    user_day_keys: dict[str, Key] = {"day": UtcDay, "user": "user_id", "organization": "organization_id"}
    month_keys: dict[str, Key] = {"month": UtcMonth, **{name: _column(name) for name in sorted(DAY_FIELDS)}}
    hour_model: dict[str, Key] = {"hour": UtcHour, "model": "model"}
    day_model: dict[str, Key] = {"day": UtcDay, "model": "model"}
    # Per user: each level's rows are one per group already, so they are joined to the hourly
    # rows grouped alike (a hash join) rather than grouped again.
    # The day level against the hours; the user days and months against the day level (exact
    # by transitivity, and fewer rows to group wherever a user's day has several hours).
    days = UsageDayRollup.objects.filter(_range("day", day_start, day_end))
    month_days = UsageDayRollup.objects.filter(_range("day", month_start, month_end))
    months = UserMonthRollup.objects.filter(_range("month", month_start, month_end))
    per_user = [
        ("day", days, (hours, "hour"), day_keys),
        ("user day", UserDayRollup.objects.filter(_range("day", day_start, day_end)), (days, "day"), user_day_keys),
        ("month", months, (month_days, "day"), month_keys),
    ]
    found: list[LevelMismatch] = []
    for level, rows, (reference, moment), keys in per_user:
        grouped = _grouped(reference, moment, keys, sums)
        found += _compare_rows(level, rows, grouped, list(keys), names, limit - len(found))
        if len(found) >= limit:
            return found
    # Operator-wide: the folded rows and the journal's, grouped (few: hours or days × models).
    checks: list[tuple[str, list[tuple[Any, ...]], tuple[Any, ...]]] = [
        (
            "model hour",
            [
                (ModelHourRollup.objects.filter(_range("hour", day_start, day_end)), "hour", hour_model, sums, 1),
                (journal, "hour", hour_model, sums, 1),
            ],
            (hours, hour_model, sums),
        ),
        (
            "model day",
            [
                (ModelDayRollup.objects.filter(_range("day", day_start, day_end)), "day", day_model, sums, 1),
                (journal, "hour", day_model, sums, 1),
            ],
            (hours, day_model, sums),
        ),
    ]
    for level, sides, (reference, keys, reference_sums) in checks:
        parts = [_grouped(qs, moment, k, m).annotate(side=Value(sign)) for qs, moment, k, m, sign in sides]
        parts.append(_grouped(reference, "hour", keys, reference_sums).annotate(side=Value(-1)))
        found += _compare(level, parts, list(keys), names, limit - len(found))
        if len(found) >= limit:
            return found
    month = {"month": lambda moment: UtcMonth(moment)}
    spenders = _grouped(
        SpenderMonthRollup.objects.filter(_range("month", month_start, month_end)),
        "month",
        {**month, "user": "user_id", "organization": "organization_id"},
        {"charge": Sum("charge")},
    ).annotate(side=Value(1))
    # Against the user days (one row per payer's day), themselves checked against the days.
    paid = _grouped(
        UserDayRollup.objects.filter(_range("day", month_start, month_end)),
        "day",
        {**month, **{name: (lambda expression: lambda moment: expression)(value) for name, value in _PAYER.items()}},
        {"charge": Sum("charge")},
    ).annotate(side=Value(-1))
    found += _compare(
        "spender month", [spenders, paid], ["month", "user", "organization"], ["charge"], limit - len(found)
    )
    return found


def _compare_rows(level: str, rows, reference, keys: list[str], names: list[str], limit: int) -> list[LevelMismatch]:
    return [LevelMismatch(level, group, off) for group, off in _differences(rows, reference, keys, names, limit)]


def _differences(rows, reference, keys: list[str], names: list[str], limit: int) -> list[tuple[dict, dict]]:
    """The groups where a level's ``rows`` (one per group) and the grouped ``reference`` (``k_*``,
    ``m_*`` columns) differ, missing rows counting as zeros, as ``(group, {measure: rows −
    reference})``: one statement, a full outer join on the keys (the nullable ids compared as 0,
    so the join can hash). ``upstream_cost`` is compared exactly on PostgreSQL; SQLite keeps
    decimals as binary floats, so there to within half a nanodollar."""
    if limit <= 0:
        return []
    columns = {f"k_{name}": F(_column(name) if name in KEY_FIELDS else name) for name in keys}
    mine = (
        rows.order_by()
        .annotate(**columns, **{f"m_{name}": F(name) for name in names})
        .values(*columns, *(f"m_{n}" for n in names))
    )
    level_sql, level_params = mine.query.sql_with_params()
    reference_sql, reference_params = reference.query.sql_with_params()
    quote = connection.ops.quote_name

    def key(side: str, name: str) -> str:
        column = f"{side}.{quote(f'k_{name}')}"
        return f"COALESCE({column}, 0)" if name in ("user", "organization", "api_key") else column

    on = " AND ".join(f"{key('l', name)} = {key('h', name)}" for name in keys)
    differences = [f"COALESCE(l.{quote(f'm_{n}')}, 0) - COALESCE(h.{quote(f'm_{n}')}, 0)" for n in names]
    off = " OR ".join(
        f"ABS({difference}) >= 0.0000000005"
        if name in DECIMAL_MEASURES and connection.vendor != "postgresql"
        else f"{difference} <> 0"
        for name, difference in zip(names, differences, strict=True)
    )
    group = ", ".join(f"COALESCE(l.{quote(f'k_{name}')}, h.{quote(f'k_{name}')})" for name in keys)
    found = []
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {group}, {', '.join(differences)} FROM ({level_sql}) AS l "  # noqa: S608
            f"FULL OUTER JOIN ({reference_sql}) AS h ON {on} WHERE {off} LIMIT %s",
            [*level_params, *reference_params, limit],
        )
        for row in cursor.fetchall():
            values = dict(zip(keys, row[: len(keys)], strict=True))
            found.append((values, {name: value for name, value in zip(names, row[len(keys) :], strict=True) if value}))
    return found


def _compare(level: str, parts: list, keys: list[str], names: list[str], limit: int) -> list[LevelMismatch]:
    """The groups where the ``side``-signed sums of ``parts`` (grouped querysets) are not zero."""
    if limit <= 0:
        return []
    union = parts[0].union(*parts[1:], all=True)
    sql, params = union.query.sql_with_params()
    quote = connection.ops.quote_name
    group = ", ".join(quote(f"k_{name}") for name in keys)
    sums = ", ".join(f"SUM(side * {quote(f'm_{name}')})" for name in names)
    off = " OR ".join(
        f"ABS(SUM(side * {quote(f'm_{name}')})) >= 0.0000000005"
        if name in DECIMAL_MEASURES and connection.vendor != "postgresql"
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
            values = dict(zip(keys, row[: len(keys)], strict=True))
            differences = {name: value for name, value in zip(names, row[len(keys) :], strict=True) if value}
            found.append(LevelMismatch(level, values, differences))
    return found


def spender_candidates(
    *, kind: str, since: datetime | None, until: datetime | None, per_month: int
) -> tuple[dict[int, int], int]:
    """The biggest spenders of each month ``[since, until)`` touches, for the exact top-spenders
    search (``backoffice.business.top_spenders``): users (``kind="user"``: their own wallet's
    usage) or organizations. Reads the ``per_month`` biggest of each month (one statement, each
    month one range of the ``(month, -charge)`` index) and returns ``(bounds, rest)``:

    * ``bounds``: each payer read → an upper bound of their usage charge in ``[since, until)``:
      their charge in the months they were read in, plus the smallest charge read in each other
      month (they were not above it there);
    * ``rest``: an upper bound for every payer not read: the sum of those smallest charges (0
      when every month's list was complete, so every payer was read).

    Bounds, not totals, because a month is wider than the period; exact because charges are never
    negative."""
    field = "user_id" if kind == "user" else "organization_id"
    months = _months(since, until)
    if not months:
        return {}, 0
    table = _table(SpenderMonthRollup)
    parts, params = [], []
    for index, month in enumerate(months):
        parts.append(
            f"SELECT * FROM (SELECT {index} AS part, {field}, charge FROM {table} "  # noqa: S608
            f"WHERE month = %s AND {field} IS NOT NULL AND charge > 0 "
            f"ORDER BY charge DESC, {field} LIMIT %s) AS m{index}"
        )
        params += [connection.ops.adapt_datetimefield_value(month), per_month]
    with connection.cursor() as cursor:
        cursor.execute(" UNION ALL ".join(parts), params)
        rows = cursor.fetchall()
    read: list[dict[int, int]] = [{} for _ in months]
    for part, payer, charge in rows:
        read[part][payer] = int(charge)
    # A month whose list is shorter than asked is complete: no payer left unread there.
    cutoffs = [min(found.values()) if len(found) == per_month else 0 for found in read]
    payers = set().union(*read)
    bounds = {
        payer: sum(found.get(payer, cutoff) for found, cutoff in zip(read, cutoffs, strict=True)) for payer in payers
    }
    return bounds, sum(cutoffs)


def _months(since: datetime | None, until: datetime | None) -> list[datetime]:
    """The first instants of the months ``[since, until)`` touches that have spender rows (an
    open bound: as far as those rows go)."""
    if since is None or until is None:
        span = SpenderMonthRollup.objects.aggregate(first=models.Min("month"), last=models.Max("month"))
        if span["first"] is None:
            return []
    month = floor_month(since) if since is not None else span["first"]
    months = []
    while (until is None and month <= span["last"]) or (until is not None and month < until):
        months.append(month)
        month = next_month(month)
    return months
