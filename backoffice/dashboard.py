"""The staff dashboard, shown at the top of the admin index (``/admin/?period=7|30|90``).

It lives on the stock ``admin.site`` index (template override + an inclusion tag) rather than on
a custom AdminSite, so every app's ``admin.site.register`` keeps working untouched. Revenue and
margins are for staff who may see payments (``payments.view_payment``; superusers can); other
staff get the plain index.
"""

from __future__ import annotations

from backoffice.reports import ledger_discrepancies, ledger_totals

from . import selectors

DISCREPANCIES_SHOWN = 20


def allowed(user) -> bool:
    return bool(user.is_active and user.is_staff and user.has_perm("payments.view_payment"))


def parse_period(raw: str | None) -> int:
    try:
        days = int(raw or "")
    except ValueError:
        return selectors.DEFAULT_PERIOD
    return days if days in selectors.PERIODS else selectors.DEFAULT_PERIOD


def dashboard_context(request) -> dict:
    if not allowed(request.user):
        return {"dashboard_allowed": False}
    days = parse_period(request.GET.get("period"))
    since = selectors.period_start(days)
    totals = ledger_totals()
    discrepancies = ledger_discrepancies()
    upstreams = selectors.upstream_states()
    return {
        "dashboard_allowed": True,
        "period": days,
        "periods": selectors.PERIODS,
        "since": since,
        "money": selectors.money_summary(since=since),
        "by_day": selectors.usage_by_day(since=since),
        "by_model": selectors.usage_by_model(since=since),
        "negative_wallets": selectors.negative_wallets(),
        "holds": selectors.hold_summary(),
        "attention": selectors.attention_counts(),
        "failing_endpoints": selectors.failing_endpoints(),
        "ledger": totals,
        "ledger_rows": sorted(totals.by_kind.items()),
        "discrepancies": discrepancies[:DISCREPANCIES_SHOWN],
        "discrepancy_count": len(discrepancies),
        "upstreams": upstreams,
        "upstreams_down": [u["name"] for u in upstreams if u["breaker"] != "closed"],
    }
