"""The ledger's reports: the checks behind ``manage.py verify_ledger`` and the dashboard's
accounting identity. Every amount is integer nanodollars."""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import BigIntegerField, F, OuterRef, Q, QuerySet, Subquery, Sum, Value, Window
from django.db.models.functions import Coalesce, Concat

from core.money import format_usd
from proxy import rollups
from proxy.models import UsageRecord, UsageStatus
from wallet.models import Entry, EntryKind, Hold, HoldStatus, Wallet


@dataclass(frozen=True)
class Discrepancy:
    wallet_id: int
    user_email: str
    problem: str  # human sentence naming what is off, with both amounts


def _sum_of(queryset: QuerySet, field_name: str) -> Coalesce:
    summed = queryset.order_by().values(queryset.model._meta.get_field("wallet").attname)
    summed = summed.annotate(total=Sum(field_name)).values("total")
    return Coalesce(Subquery(summed, output_field=BigIntegerField()), Value(0), output_field=BigIntegerField())


def ledger_discrepancies() -> list[Discrepancy]:
    """Every wallet whose cached balance or held amount disagrees with the ledger.

    Checks, per wallet: ``balance = Σ entries``, ``held = Σ active holds``, the latest entry's
    ``balance_after = balance``, and every entry's ``balance_after`` equals the running sum of the
    wallet's entries up to it (so a forged middle entry shows up too).
    """
    entries_of = Entry.objects.filter(wallet=OuterRef("pk"))
    latest = entries_of.order_by("-id").values("balance_after")[:1]
    wallets = (
        Wallet.objects.annotate(
            entry_sum=_sum_of(entries_of, "amount"),
            active_held=_sum_of(Hold.objects.filter(wallet=OuterRef("pk"), status=HoldStatus.ACTIVE), "amount"),
            latest_after=Subquery(latest, output_field=BigIntegerField()),
        )
        .filter(
            ~Q(balance=F("entry_sum"))
            | ~Q(held=F("active_held"))
            | Q(held__lt=0)
            | (Q(latest_after__isnull=False) & ~Q(latest_after=F("balance")))
        )
        .select_related("user", "organization")
        .order_by("pk")
    )
    found = []
    for wallet in wallets:
        name = _owner_name(wallet)
        if wallet.balance != wallet.entry_sum:
            found.append(
                Discrepancy(
                    wallet.pk,
                    name,
                    f"balance {format_usd(wallet.balance)} ≠ Σ entries {format_usd(wallet.entry_sum)}",
                )
            )
        if wallet.held != wallet.active_held:
            found.append(
                Discrepancy(
                    wallet.pk,
                    name,
                    f"held {format_usd(wallet.held)} ≠ Σ active holds {format_usd(wallet.active_held)}",
                )
            )
        if wallet.latest_after is not None and wallet.latest_after != wallet.balance:
            found.append(
                Discrepancy(
                    wallet.pk,
                    name,
                    f"latest entry's balance_after {format_usd(wallet.latest_after)} ≠ "
                    f"balance {format_usd(wallet.balance)}",
                )
            )
    running = Entry.objects.annotate(
        running=Window(Sum("amount"), partition_by=[F("wallet_id")], order_by=F("id").asc())
    ).filter(~Q(balance_after=F("running")))
    for entry in running.select_related("wallet__user", "wallet__organization").order_by("wallet_id", "id"):
        found.append(
            Discrepancy(
                entry.wallet_id,
                _owner_name(entry.wallet),
                f"entry {entry.pk}: balance_after {format_usd(entry.balance_after)} ≠ "
                f"running sum {format_usd(entry.running)}",
            )
        )
    return found


def _owner_name(wallet) -> str:
    """Who a wallet belongs to, as a report names it: a user's email or an organization's slug."""
    if wallet.user_id is not None:
        return wallet.user.email
    return f"organization {wallet.organization.slug}"


@dataclass(frozen=True)
class LedgerTotals:
    by_kind: dict[str, int] = field(default_factory=dict)  # signed nanodollars per entry kind
    entries_total: int = 0  # Σ of every entry, signed
    balances_total: int = 0  # Σ wallet balances
    held_total: int = 0  # Σ wallet held
    active_holds_total: int = 0  # Σ active holds

    @property
    def balanced(self) -> bool:
        """top-ups + trials + bonuses + grants − usage − charges − refunds ± corrections = Σ balances."""
        return self.entries_total == self.balances_total and self.held_total == self.active_holds_total


def ledger_totals() -> LedgerTotals:
    sums = dict(Entry.objects.order_by().values_list("kind").annotate(total=Sum("amount")))
    by_kind = {kind: int(sums.get(kind) or 0) for kind in EntryKind.values}
    wallets = Wallet.objects.aggregate(balance=Sum("balance"), held=Sum("held"))
    active = Hold.objects.filter(status=HoldStatus.ACTIVE).aggregate(total=Sum("amount"))["total"]
    return LedgerTotals(
        by_kind=by_kind,
        entries_total=sum(by_kind.values()),
        balances_total=int(wallets["balance"] or 0),
        held_total=int(wallets["held"] or 0),
        active_holds_total=int(active or 0),
    )


def usage_discrepancies(*, limit: int = 100) -> list[tuple[str, int, int]]:
    """Settled usage records whose charge is not what the ledger debited for them:
    ``(request_id, record charge, debited)``, nanodollars, at most ``limit``.

    A request's debits are its settlement entry (``hold:<request_id>``) and, when an estimate was
    corrected, its reconciliation (``reconcile:<request_id>``): every charge must be re-derivable
    from its record, so the two must agree to the nanodollar.
    """
    keys = Q(idempotency_key=Concat(Value("hold:"), OuterRef("request_id"))) | Q(
        idempotency_key=Concat(Value("reconcile:"), OuterRef("request_id"))
    )
    # The wallet the request was billed to: its organization's, or its user's.
    billed = Q(wallet__user_id=OuterRef("user_id")) | Q(wallet__organization_id=OuterRef("organization_id"))
    debits = (
        Entry.objects.filter(keys, billed).order_by().values("wallet_id").annotate(total=Sum("amount")).values("total")
    )
    settled = UsageRecord.objects.exclude(status__in=[UsageStatus.PENDING, UsageStatus.REFUSED])
    rows = (
        settled.annotate(debited=Coalesce(-Subquery(debits), 0))
        .exclude(debited=F("charge"))
        .order_by("id")
        .values_list("request_id", "charge", "debited")[:limit]
    )
    return list(rows)


def rollup_problems(*, since=None, until=None, limit: int = 100) -> list[str]:
    """The usage rollups that are not the sums of their raw records (``proxy.rollups``), as
    report lines: every period total staff and users see is read from them. ``since``/``until``
    bound the hours checked (default: all the hours raw records remain for)."""
    return [str(mismatch) for mismatch in rollups.discrepancies(since=since, until=until, limit=limit)]
