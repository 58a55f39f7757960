"""The staff dashboard, shown at the top of the admin index (``/admin/?period=7|30|90``).

It lives on the stock ``admin.site`` index (template override + an inclusion tag) rather than on
a custom AdminSite, so every app's ``admin.site.register`` keeps working untouched. Revenue and
margins are for staff who may see payments (``payments.view_payment``; superusers can); other
staff get the plain index.

The ledger panel shows the verdict of the last ``manage.py verify_ledger`` run (kept on its
checkpoint row) rather than checking the ledger on each view: a full check is one pass over
every entry, minutes at ten million, and a page load must not start one.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

from django.urls import reverse
from django.utils import timezone

from proxy import rollups

from . import business, charts, selectors
from .ledger_check import STALE_AFTER, last_verdict

TOP_SHOWN = 10
# The usage journal holds what settled since the last fold (``reconcile_holds``, every few
# minutes): a row older than this means nothing folds it. The figures stay exact (readers add the
# journal) but grow slower to read.
FOLD_STALE_AFTER = timedelta(minutes=30)


def allowed(user) -> bool:
    return bool(user.is_active and user.is_staff and user.has_perm("payments.view_payment"))


MONTH = "month"  # the calendar month so far (UTC): "how much did we make this month?"


def parse_period(raw: str | None) -> int | str:
    """``?period=``: a number of days in ``selectors.PERIODS`` or ``month``; anything else is the default."""
    if raw == MONTH:
        return MONTH
    try:
        days = int(raw or "")
    except ValueError:
        return selectors.DEFAULT_PERIOD
    return days if days in selectors.PERIODS else selectors.DEFAULT_PERIOD


def period_choices() -> list[tuple[int | str, str]]:
    return [*((days, f"{days} days") for days in selectors.PERIODS), (MONTH, "This month")]


def period_since(period: int | str) -> datetime:
    if period == MONTH:
        return timezone.now().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return selectors.period_start(int(period))


def period_label(period: int | str) -> str:
    return "this month" if period == MONTH else f"last {period} days"


def dashboard_context(request) -> dict:
    if not allowed(request.user):
        return {"dashboard_allowed": False}
    period = parse_period(request.GET.get("period"))
    since = period_since(period)
    verdict = last_verdict()
    upstreams = selectors.upstream_states()
    unfolded = rollups.journal_backlog()
    return {
        "dashboard_allowed": True,
        "period": period,
        "period_label": period_label(period),
        "periods": period_choices(),
        "since": since,
        "money": selectors.money_summary(since=since),
        "by_day": selectors.usage_by_day(since=since),
        "by_model": selectors.usage_by_model(since=since),
        "negative_wallets": selectors.negative_wallets(),
        "holds": selectors.hold_summary(),
        "attention": selectors.attention_counts(),
        "failing_endpoints": selectors.failing_endpoints(),
        "ledger_check": verdict,
        "ledger_rows": sorted(verdict.totals.by_kind.items()) if verdict.totals else [],
        "ledger_stale_hours": int(STALE_AFTER.total_seconds() // 3600),
        "upstreams": upstreams,
        "upstreams_down": [u["name"] for u in upstreams if u["breaker"] != "closed"],
        "rollup_fold_stale": unfolded is not None and unfolded < timezone.now() - FOLD_STALE_AFTER,
        "rollup_unfolded_since": unfolded,
        "charts": dashboard_charts(since=since),
    }


def dashboard_charts(*, since) -> dict:
    """The four charts staff look at rather than read: money over time, spend by model, top
    users and top organizations (server-rendered SVG, ``backoffice.charts``)."""
    found = {row["period"]: row for row in business.money_by_period(period="day", since=since)}
    empty = dict.fromkeys(business.MONEY_FIELDS, 0)
    dates = every_day(since=since) if found else []
    days = [found.get(day, empty) for day in dates]
    labels = [day.isoformat() for day in dates]
    money = charts.line_chart(
        title="Revenue, upstream cost and margin per day (UTC)",
        labels=labels,
        series=[(name, [row[field] for row in days]) for name, field in _MONEY_SERIES],
    )
    models = business.usage_by(group="model", since=since, limit=TOP_SHOWN)
    by_model = charts.bar_chart(
        title="Requests and spend by model",
        rows=[(row["key"], row["charged"], _requests(row["requests"])) for row in models],
    )
    spenders = business.top_spenders(since=since, limit=TOP_SHOWN)
    top = charts.bar_chart(
        title="Top spenders",
        rows=[(row["email"], row["spent"], "") for row in spenders],
        # "From whom": each name opens that account's staff page.
        links=[reverse("staff_user", args=[row["user"]]) for row in spenders],
    )
    teams = business.top_spenders(kind="organization", since=since, limit=TOP_SHOWN)
    top_orgs = charts.bar_chart(
        title="Top organizations",
        rows=[(row["name"], row["spent"], "") for row in teams],
        links=[reverse("staff_org", args=[row["organization"]]) for row in teams],
    )
    return {
        "money": money,
        "has_money": bool(days),
        "by_model": by_model,
        "has_models": bool(models),
        "top_spenders": top,
        "has_spenders": bool(spenders),
        "top_orgs": top_orgs,
        "has_orgs": bool(teams),
    }


def every_day(*, since) -> list[date]:
    """Every day (UTC) from ``since`` to today, for a chart's x axis: days without a figure are
    drawn at zero, because a gap must look like one."""
    first, last = since.date(), timezone.now().date()
    return [first + timedelta(n) for n in range((last - first).days + 1)]


def _requests(count: int) -> str:
    return f"{count:,} request{'' if count == 1 else 's'}"


_MONEY_SERIES = (("revenue", "revenue"), ("upstream cost", "upstream_cost"), ("margin", "margin"))
