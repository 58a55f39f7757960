"""The admin's per-user staff page (``/admin/tokentill/users/<id>/``, linked from the user's
admin page): spend over time as a server-rendered chart, balance, limits, keys, recent requests
and recent ledger entries — what staff look at when a customer writes in.

A plain view wrapped in ``admin.site.admin_view`` (the admin's login and headers) rather than a
``ModelAdmin`` URL, because the figures come from ``backoffice`` and ``accounts`` sits below it.
Staff need to be allowed to view accounts, the ledger and usage records (superusers are);
anyone else gets 403. Both lists are keyset-paginated: a page is one indexed range read however
deep it is, and rows arriving meanwhile do not shift the next page.
"""

from __future__ import annotations

from urllib.parse import urlencode

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseBadRequest
from django.template.response import TemplateResponse

from core.money import MoneyError, format_money, parse_usd

from . import charts, dashboard, user_selectors

PAGE_SIZE = 25
PERMISSIONS = ("accounts.view_user", "wallet.view_entry", "proxy.view_usagerecord")


def allowed(user) -> bool:
    return bool(user.is_active and user.is_staff and user.has_perms(PERMISSIONS))


def user_page(request, user_id: int):
    if not allowed(request.user):
        raise PermissionDenied
    account = user_selectors.user_get(user_id=user_id)
    period = dashboard.parse_period(request.GET.get("period"))
    since = dashboard.period_since(period)
    cursors = {name: request.GET.get(name) or None for name in ("requests_after", "entries_after")}
    try:
        records, next_records = user_selectors.user_usage_page(
            user=account, after=cursors["requests_after"], size=PAGE_SIZE
        )
        entries, next_entries = user_selectors.user_entries_page(
            user=account, after=cursors["entries_after"], size=PAGE_SIZE
        )
    except user_selectors.BadCursor:
        return HttpResponseBadRequest("That page cursor is not one this page wrote.", content_type="text/plain")
    spend = user_selectors.user_spend_by_day(user=account, since=since)
    wallet = getattr(account, "wallet", None)

    def link(**changes) -> str:
        query = {"period": period, **{k: v for k, v in cursors.items() if v}, **changes}
        return "?" + urlencode({k: v for k, v in query.items() if v})

    context = {
        **admin.site.each_context(request),
        "title": f"{account.email}: spend, keys and requests",
        "account": account,
        "wallet": wallet,
        "activity": user_selectors.user_activity(user=account),
        "keys": [_with_limits_shown(key) for key in user_selectors.user_keys(user=account)],
        "period": period,
        "period_label": dashboard.period_label(period),
        "periods": [
            (value, label, link(period=value, requests_after="", entries_after=""))
            for value, label in dashboard.period_choices()
        ],
        "spend_chart": spend_chart(spend, since=since),
        "spend_total": sum(row["usage"] + row["tools"] for row in spend),
        "spend_requests": sum(row["requests"] for row in spend),
        "records": records,
        "entries": entries,
        "newest_requests": link(requests_after="") if cursors["requests_after"] else None,
        "older_requests": link(requests_after=next_records) if next_records else None,
        "newest_entries": link(entries_after="") if cursors["entries_after"] else None,
        "older_entries": link(entries_after=next_entries) if next_entries else None,
    }
    return TemplateResponse(request, "admin/backoffice/user.html", context)


_LIMIT_NAMES = {
    "rpm": "requests per minute",
    "max_parallel": "requests in parallel",
    "daily_spend": "daily spend",
    "monthly_spend": "monthly spend",
    "allowed_models": "models",
    "run_max_steps": "steps per agent run",
    "run_max_spend": "spend per agent run",
}


def _with_limits_shown(key):
    """The key, with ``limits_shown``: its limits in words, money by the one display rule."""
    shown = []
    for name, value in (key.limits or {}).items():
        if value is None:
            continue
        if name.endswith("_spend"):
            try:
                value = format_money(parse_usd(value))
            except MoneyError:
                pass  # shown as stored: the page describes, it does not validate
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        shown.append(f"{_LIMIT_NAMES.get(name, name)}: {value}")
    key.limits_shown = shown
    return key


def spend_chart(spend: list[dict], *, since):
    """Model usage and tool charges per day, every day of the period on the axis; None when the
    account spent nothing in it."""
    if not spend:
        return None
    found = {row["day"]: row for row in spend}
    days = dashboard.every_day(since=since)
    empty = {"usage": 0, "tools": 0}
    rows = [found.get(day, empty) for day in days]
    return charts.line_chart(
        title="Spent per day (UTC)",
        labels=[day.isoformat() for day in days],
        series=[("model usage", [row["usage"] for row in rows]), ("tool charges", [row["tools"] for row in rows])],
    )
