"""Reads of the wallet and the ledger: what a user sees, and the checks behind ``verify_ledger``."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db.models import BigIntegerField, F, OuterRef, Q, QuerySet, Subquery, Sum, Value, Window
from django.db.models.functions import Coalesce

from core.money import format_usd, usd_to_nanos

from .models import Entry, EntryKind, Hold, HoldStatus, Wallet


class WalletStatus:
    OK = "ok"  # available at or above LOW_BALANCE_THRESHOLD
    LOW = "low"  # still usable, but available is below LOW_BALANCE_THRESHOLD
    BLOCKED = "blocked"  # balance ≤ 0 or available below MIN_BALANCE: requests are refused


@dataclass(frozen=True)
class WalletSummary:
    balance: int  # nanodollars
    held: int  # nanodollars
    available: int  # nanodollars
    currency: str
    status: str
    low_balance_threshold: int  # nanodollars


def wallet_status(*, balance: int, held: int) -> str:
    available = balance - held
    if balance <= 0 or available < usd_to_nanos(settings.MIN_BALANCE):
        return WalletStatus.BLOCKED
    if available < usd_to_nanos(settings.LOW_BALANCE_THRESHOLD):
        return WalletStatus.LOW
    return WalletStatus.OK


def wallet_summary(*, user) -> WalletSummary:
    # Always re-read: a wallet cached on the user object may predate the last settle. A user made
    # outside sign-up (createsuperuser) may have no wallet yet: that is an empty one, not an error.
    wallet = Wallet.objects.filter(user=user).first() or Wallet(user=user)
    return WalletSummary(
        balance=wallet.balance,
        held=wallet.held,
        available=wallet.available,
        currency=wallet.currency,
        status=wallet_status(balance=wallet.balance, held=wallet.held),
        low_balance_threshold=usd_to_nanos(settings.LOW_BALANCE_THRESHOLD),
    )


def entry_list(
    *, user, kind: str | None = None, since: datetime | None = None, until: datetime | None = None
) -> QuerySet[Entry]:
    """The user's entries, newest first. ``since`` is inclusive, ``until`` exclusive."""
    entries = Entry.objects.filter(wallet__user=user)
    if kind:
        entries = entries.filter(kind=kind)
    if since is not None:
        entries = entries.filter(created_at__gte=since)
    if until is not None:
        entries = entries.filter(created_at__lt=until)
    return entries.order_by("-id")


def entry_get(*, user, entry_id: int) -> Entry | None:
    """One of the user's own entries; someone else's id is indistinguishable from a missing one."""
    return Entry.objects.filter(wallet__user=user, pk=entry_id).first()


CSV_COLUMNS = ["id", "created_at", "kind", "amount", "balance_after", "description", "reference", "metadata"]
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(value: str) -> str:
    # Descriptions and metadata can come from API clients (/v1/user/charge); a cell starting with
    # "=" would run as a formula when the user opens the export in a spreadsheet.
    return "'" + value if value.startswith(_FORMULA_PREFIXES) else value


class _Line:
    """csv.writer needs a file; this one hands back each line instead of storing it."""

    def write(self, value: str) -> str:
        return value


def entries_csv_lines(entries: QuerySet[Entry], *, chunk_size: int = 2000) -> Iterator[str]:
    """The whole queryset as CSV lines (header first), read with ``iterator()`` so memory stays flat
    however long the history is."""
    writer = csv.writer(_Line())
    yield writer.writerow(CSV_COLUMNS)
    rows = entries.values_list(
        "id", "created_at", "kind", "amount", "balance_after", "description", "reference", "metadata"
    )
    for pk, created_at, kind, amount, balance_after, description, reference, metadata in rows.iterator(
        chunk_size=chunk_size
    ):
        yield writer.writerow(
            [
                pk,
                created_at.isoformat(),
                kind,
                format_usd(amount),
                format_usd(balance_after),
                _csv_text(description),
                _csv_text(reference),
                _csv_text(json.dumps(metadata, sort_keys=True, default=str)) if metadata else "",
            ]
        )


# --- Ledger verification ------------------------------------------------------------------------


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
        .select_related("user")
        .order_by("pk")
    )
    found = []
    for wallet in wallets:
        name = wallet.user.email
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
    for entry in running.select_related("wallet__user").order_by("wallet_id", "id"):
        found.append(
            Discrepancy(
                entry.wallet_id,
                entry.wallet.user.email,
                f"entry {entry.pk}: balance_after {format_usd(entry.balance_after)} ≠ "
                f"running sum {format_usd(entry.running)}",
            )
        )
    return found


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
