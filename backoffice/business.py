"""The business reports behind the operator API's ``/api/admin/reports/…`` and the dashboard's
charts: money by period, usage by model / user / organization / agent label, top spenders (users
or organizations), liabilities.

The definitions are the dashboard's (``backoffice.selectors``): revenue is what real payments
that credited a wallet brought in (gross), with their processor fees, net and refunds; charged is
model usage plus tool charges; margin = charged − upstream cost. A payment's figures count in the
period it was made (a later refund too — refunds are not dated separately). Money is integer
nanodollars; the upstream's Decimal USD cost is converted per group, half-up, like the dashboard.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from django.contrib.auth import get_user_model
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDay, TruncMonth, TruncWeek

from core.money import usd_to_nanos
from orgs.models import Organization
from payments.models import Payment, PaymentStatus
from proxy import rollups
from wallet.models import Entry, EntryKind, Wallet

PERIODS = {"day": TruncDay, "week": TruncWeek, "month": TruncMonth}
# "user" is who made the request (a member's requests billed to an organization included);
# "organization" is the organization billed, by slug ("" for requests paid from a user's own wallet).
USAGE_GROUPS = {"model": "model", "user": "user__email", "organization": "organization__slug", "agent": "agent"}
MONEY_FIELDS = (
    "revenue",
    "fees",
    "net",
    "refunds",
    "charged_usage",
    "charged_tools",
    "charged",
    "upstream_cost",
    "margin",
)


def _between(queryset, since: datetime | None, until: datetime | None):
    if since is not None:
        queryset = queryset.filter(created_at__gte=since)
    if until is not None:
        queryset = queryset.filter(created_at__lt=until)
    return queryset


def _day(value) -> date:
    return value.date() if isinstance(value, datetime) else value


def money_by_period(*, period: str, since: datetime | None = None, until: datetime | None = None) -> list[dict]:
    """One row per day, ISO week (from Monday) or calendar month (UTC) that has any figure,
    oldest first: ``period`` (its first day) and the nanodollar figures of ``MONEY_FIELDS``,
    plus ``payments`` and ``requests``. Three GROUP BY queries."""
    trunc = PERIODS[period]
    rows: dict[date, dict] = {}

    def row(day) -> dict:
        return rows.setdefault(_day(day), {"payments": 0, "requests": 0, **dict.fromkeys(MONEY_FIELDS, 0)})

    credited = Payment.objects.filter(test_mode=False).exclude(status=PaymentStatus.FLAGGED)
    paid = (
        _between(credited, since, until)
        .annotate(bucket=trunc("created_at"))
        .values("bucket")
        .annotate(
            n=Count("id"), gross_sum=Sum("gross"), fee_sum=Sum("fee"), net_sum=Sum("net"), ref=Sum("refunded_amount")
        )
    )
    for found in paid:
        target = row(found["bucket"])
        target.update(
            payments=found["n"],
            revenue=int(found["gross_sum"] or 0),
            fees=int(found["fee_sum"] or 0),
            net=int(found["net_sum"] or 0),
            refunds=int(found["ref"] or 0),
        )
    used = rollups.totals(
        measures=["requests", "charge", "upstream_cost"], keys={"bucket": trunc}, since=since, until=until
    )
    for found in used:
        target = row(found["bucket"])
        target.update(
            requests=found["requests"],
            charged_usage=found["charge"],
            upstream_cost=usd_to_nanos(found["upstream_cost"]),
        )
    tools = (
        _between(Entry.objects.filter(kind=EntryKind.CHARGE), since, until)
        .annotate(bucket=trunc("created_at"))
        .values("bucket")
        .annotate(amount=Sum("amount"))
    )
    for found in tools:
        row(found["bucket"])["charged_tools"] = -int(found["amount"] or 0)
    for figures in rows.values():
        figures["charged"] = figures["charged_usage"] + figures["charged_tools"]
        figures["margin"] = figures["charged"] - figures["upstream_cost"]
    return [{"period": day, **rows[day]} for day in sorted(rows)]


def totals_of(rows: list[dict]) -> dict:
    keys = ("payments", "requests", *MONEY_FIELDS)
    return {key: sum(row[key] for row in rows) for key in keys}


def usage_by(
    *, group: str, since: datetime | None = None, until: datetime | None = None, limit: int | None = None
) -> list[dict]:
    """Model usage per model, user (email), organization (slug; "" for requests paid from a user's
    own wallet) or agent label (``X-Tokentill-Agent``; "" for none),
    the biggest earner first: ``key``, ``requests``, tokens, and ``charged``, ``upstream_cost``,
    ``margin`` in nanodollars. Tool charges are not usage and are not in it."""
    rows = rollups.totals(
        measures=["requests", "prompt_tokens", "completion_tokens", "charge", "upstream_cost"],
        keys={"key": USAGE_GROUPS[group]},
        since=since,
        until=until,
    )
    result = []
    for found in rows:
        cost = usd_to_nanos(found.pop("upstream_cost"))
        charged = found.pop("charge")
        result.append(
            {**found, "key": found["key"] or "", "charged": charged, "upstream_cost": cost, "margin": charged - cost}
        )
    result.sort(key=lambda row: (-row["charged"], row["key"]))
    return result[:limit] if limit is not None else result


SPENDER_KINDS = ("user", "organization")

# Per kind of payer: which usage records and ledger entries are theirs (the wallet that paid),
# the fields naming them, and the row's shape.
_PAYERS = {
    "user": (
        Q(organization__isnull=True),
        ("user_id", "user__email"),
        Q(wallet__user__isnull=False),
        ("wallet__user_id", "wallet__user__email"),
        lambda payer_id, email: {"user": payer_id, "email": email},
    ),
    "organization": (
        Q(organization__isnull=False),
        ("organization_id", "organization__name", "organization__slug"),
        Q(wallet__organization__isnull=False),
        ("wallet__organization_id", "wallet__organization__name", "wallet__organization__slug"),
        lambda payer_id, name, slug: {"organization": payer_id, "name": name, "slug": slug},
    ),
}

# The model naming each kind of payer.
_NAMED = {"user": get_user_model(), "organization": Organization}


def top_spenders(
    *, kind: str = "user", since: datetime | None = None, until: datetime | None = None, limit: int = 10
) -> list[dict]:
    """The users — or, with ``kind="organization"``, the organizations — who spent the most from
    their own wallet (model usage plus tool charges, both debits of it), most first: ``user`` (id)
    and ``email``, or ``organization`` (id), ``name`` and ``slug``; then ``usage``, ``tools`` and
    ``spent`` (nanodollars). A member's requests billed to an organization count for the
    organization, not for the member.

    Exact without summing every payer's period (a threshold search): the biggest spenders of
    each month the period touches are read from the top (``rollups.spender_candidates``), their
    exact usage in the period is measured (``rollups.totals``: days, edge hours, raw edges), and
    the search stops when the ``limit``-th exact figure beats the bound of every payer not read
    (the sum of each month's smallest figure read); otherwise it reads twice as many per month.
    Payers with tool charges in the period (ledger entries, few; a partial index finds them) are
    all measured first, so the bound of every payer left is their usage alone."""
    usage_filter, usage_fields, tools_filter, tools_fields, row_of = _PAYERS[kind]
    payer = usage_fields[0]
    tools: dict[int, int] = {}
    naming: dict[int, dict] = {}
    found_tools = _between(Entry.objects.filter(tools_filter, kind=EntryKind.CHARGE), since, until).values(
        *tools_fields
    )
    for found in found_tools.annotate(total=Sum("amount")).order_by():
        names = [found[field] for field in tools_fields]
        tools[names[0]] = -int(found["total"] or 0)
        naming[names[0]] = row_of(*names)
    usage: dict[int, int] = {}

    def measure(ids: list[int]) -> None:
        if not ids:
            return
        usage.update(dict.fromkeys(ids, 0))
        rows = rollups.totals(
            measures=["charge"],
            keys={payer: payer},
            where=usage_filter & Q(**{f"{payer}__in": ids}),
            since=since,
            until=until,
        )
        for row in rows:
            usage[row[payer]] = row["charge"]

    def ranked() -> list[tuple[int, int]]:
        spent = ((usage.get(p, 0) + tools.get(p, 0), p) for p in usage.keys() | tools.keys())
        return sorted(((amount, p) for amount, p in spent if amount > 0), key=lambda item: (-item[0], item[1]))

    if tools:
        measure(list(tools))
    per_month = max(limit * 4, 40)
    while True:
        bounds, rest = rollups.spender_candidates(kind=kind, since=since, until=until, per_month=per_month)
        measure([p for p in bounds if p not in usage])
        best = ranked()
        # A payer not read spent at most ``rest`` (no tool charges: those payers were measured
        # first). Ties go to the lower id, so only a strictly greater figure settles the list.
        if rest == 0 or (len(best) >= limit and best[limit - 1][0] > rest):
            break
        per_month *= 2
    top = ranked()[:limit]
    unnamed = [p for _, p in top if p not in naming]
    if unnamed:
        # Named once, for the few shown (not joined into every rollup row read).
        fields = [field.split("__", 1)[1] for field in usage_fields[1:]]
        for pk, *names in _NAMED[kind].objects.filter(pk__in=unnamed).values_list("pk", *fields):
            naming[pk] = row_of(pk, *names)
    return [{**naming[p], "usage": usage.get(p, 0), "tools": tools.get(p, 0), "spent": amount} for amount, p in top]


@dataclass(frozen=True)
class Liabilities:
    owed_to_users: int  # Σ positive balances: credit sold and not yet spent
    wallets_in_credit: int
    owed_to_us: int  # Σ |negative balances|: overage wallets must make good before spending again
    wallets_below_zero: int
    held: int  # Σ held: reserved by requests in flight (part of the balances above)


def liabilities() -> Liabilities:
    found = Wallet.objects.aggregate(
        positive=Sum("balance", filter=Q(balance__gt=0), default=0),
        in_credit=Count("id", filter=Q(balance__gt=0)),
        negative=Sum("balance", filter=Q(balance__lt=0), default=0),
        below=Count("id", filter=Q(balance__lt=0)),
        held=Sum("held", default=0),
    )
    return Liabilities(
        owed_to_users=int(found["positive"]),
        wallets_in_credit=found["in_credit"],
        owed_to_us=-int(found["negative"]),
        wallets_below_zero=found["below"],
        held=int(found["held"]),
    )
