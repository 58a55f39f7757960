"""The admin's per-user staff page (``/admin/tokentill/users/<id>/``, linked from the user's
admin page), and its per-organization counterpart (``/admin/tokentill/orgs/<id>/``, linked from
the organization's admin page, which adds the members with their roles and limits): spend over
time as a server-rendered chart, balance, limits, keys, recent requests and recent ledger entries
— what staff look at when a customer writes in.

A plain view wrapped in ``admin.site.admin_view`` (the admin's login and headers) rather than a
``ModelAdmin`` URL, because the figures come from ``backoffice`` and ``accounts`` sits below it.
Staff need to be allowed to view accounts, the ledger and usage records (superusers are), and
organizations for an organization's page; anyone else gets 403. Both lists are
keyset-paginated: a page is one range read however deep it is, and rows arriving meanwhile do not
shift the next page.
"""

from __future__ import annotations

from urllib.parse import urlencode

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseBadRequest
from django.template.response import TemplateResponse

from core.money import MoneyError, format_money, parse_usd
from infra.keyset import BadCursor

from . import charts, dashboard, org_selectors, user_selectors

PAGE_SIZE = 25
PERMISSIONS = ("accounts.view_user", "wallet.view_entry", "proxy.view_usagerecord")


def allowed(user) -> bool:
    return bool(user.is_active and user.is_staff and user.has_perms(PERMISSIONS))


def user_page(request, user_id: int):
    if not allowed(request.user):
        raise PermissionDenied
    account = user_selectors.user_get(user_id=user_id)
    return _staff_page(
        request,
        "admin/backoffice/user.html",
        spend=lambda since: user_selectors.user_spend_by_day(user=account, since=since),
        records=lambda after: user_selectors.user_usage_page(user=account, after=after, size=PAGE_SIZE),
        entries=lambda after: user_selectors.user_entries_page(user=account, after=after, size=PAGE_SIZE),
        about=lambda: {
            "title": f"{account.email}: spend, keys and requests",
            "account": account,
            "wallet": getattr(account, "wallet", None),
            "activity": user_selectors.user_activity(user=account),
            "keys": [_with_limits_shown(key) for key in user_selectors.user_keys(user=account)],
        },
    )


ORG_PERMISSIONS = (*PERMISSIONS, "orgs.view_organization")


def org_page(request, org_id: int):
    """The organization's counterpart of ``user_page``: its wallet, spend over time, members with
    their roles and limits, its keys, the requests billed to it (with who made each) and its
    ledger entries."""
    if not (allowed(request.user) and request.user.has_perms(ORG_PERMISSIONS)):
        raise PermissionDenied
    org = org_selectors.org_get(org_id=org_id)
    return _staff_page(
        request,
        "admin/backoffice/org.html",
        spend=lambda since: org_selectors.org_spend_by_day(org=org, since=since),
        records=lambda after: org_selectors.org_usage_page(org=org, after=after, size=PAGE_SIZE),
        entries=lambda after: org_selectors.org_entries_page(org=org, after=after, size=PAGE_SIZE),
        about=lambda: {
            "title": f"{org.name}: spend, members, keys and requests",
            "org": org,
            "wallet": org_selectors.org_wallet_read(org=org),
            "activity": org_selectors.org_activity(org=org),
            "members": [_member_limits_shown(m) for m in org_selectors.org_members(org=org)],
            "keys": [_with_limits_shown(key) for key in org_selectors.org_keys(org=org)],
        },
    )


def _staff_page(request, template: str, *, spend, records, entries, about):
    """Render a staff page: the period, spend and page lists the two pages share
    (``_spend_and_lists``) and what ``about()`` says of the account or organization; a 400 when a
    page cursor is not one this page wrote."""
    context = _spend_and_lists(request, spend=spend, records=records, entries=entries)
    if context is None:
        return HttpResponseBadRequest("That page cursor is not one this page wrote.", content_type="text/plain")
    return TemplateResponse(request, template, {**admin.site.each_context(request), **context, **about()})


def _spend_and_lists(request, *, spend, records, entries) -> dict | None:
    """What the per-user and per-organization pages share: the period and its spend chart, and a
    keyset page of requests and of ledger entries with links to the next ones. None when a page
    cursor is not one this page wrote."""
    period = dashboard.parse_period(request.GET.get("period"))
    since = dashboard.period_since(period)
    cursors = {name: request.GET.get(name) or None for name in ("requests_after", "entries_after")}
    try:
        found_records = records(cursors["requests_after"])
        found_entries = entries(cursors["entries_after"])
    except BadCursor:
        return None
    spent = spend(since)

    def link(**changes) -> str:
        query = {"period": period, **{k: v for k, v in cursors.items() if v}, **changes}
        return "?" + urlencode({k: v for k, v in query.items() if v})

    return {
        "period": period,
        "period_label": dashboard.period_label(period),
        "periods": [
            (value, label, link(period=value, requests_after="", entries_after=""))
            for value, label in dashboard.period_choices()
        ],
        "spend_chart": spend_chart(spent, since=since),
        "spend_total": sum(row["usage"] + row["tools"] for row in spent),
        "spend_requests": sum(row["requests"] for row in spent),
        "records": found_records.rows,
        "entries": found_entries.rows,
        "newest_requests": link(requests_after="") if cursors["requests_after"] else None,
        "older_requests": link(requests_after=found_records.older) if found_records.older else None,
        "newest_entries": link(entries_after="") if cursors["entries_after"] else None,
        "older_entries": link(entries_after=found_entries.older) if found_entries.older else None,
    }


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


def _member_limits_shown(membership):
    """The membership, with ``limits_shown``: its limits inside the organization, in words."""
    shown = []
    if membership.daily_spend is not None:
        shown.append(f"daily spend: {format_money(membership.daily_spend)}")
    if membership.monthly_spend is not None:
        shown.append(f"monthly spend: {format_money(membership.monthly_spend)}")
    if membership.allowed_models is not None:
        shown.append(f"models: {', '.join(map(str, membership.allowed_models)) or 'none'}")
    membership.limits_shown = shown
    return membership


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
