"""Reads of the wallet and the ledger: what a user sees. (The ledger's checks are reports: ``backoffice``.)"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db.models import QuerySet, Subquery

from core.money import format_usd, usd_to_nanos
from infra.keyset import BY_ID, Page, keyset_chunks, keyset_page

from .alerts import threshold_in_force
from .models import Entry, Wallet


class WalletStatus:
    OK = "ok"  # available at or above the wallet's low-balance threshold
    LOW = "low"  # still usable, but available is below the wallet's low-balance threshold
    BLOCKED = "blocked"  # balance ≤ 0 or available below MIN_BALANCE: requests are refused


@dataclass(frozen=True)
class WalletSummary:
    balance: int  # nanodollars
    held: int  # nanodollars
    available: int  # nanodollars
    currency: str
    status: str
    low_balance_threshold: int  # nanodollars


def wallet_status(*, balance: int, held: int, low_balance_threshold: int | None = None) -> str:
    """``low_balance_threshold`` is the wallet's own (None: the operator's LOW_BALANCE_THRESHOLD)."""
    available = balance - held
    if balance <= 0 or available < usd_to_nanos(settings.MIN_BALANCE):
        return WalletStatus.BLOCKED
    if available < threshold_in_force(low_balance_threshold):
        return WalletStatus.LOW
    return WalletStatus.OK


def wallet_summary(*, user) -> WalletSummary:
    # Always re-read: a wallet cached on the user object may predate the last settle. A user made
    # outside sign-up (createsuperuser) may have no wallet yet: that is an empty one, not an error.
    return wallet_summary_of(Wallet.objects.filter(user=user).first() or Wallet(user=user))


def wallet_summary_of(wallet: Wallet) -> WalletSummary:
    """The summary of a wallet as read (a user's or an organization's)."""
    return WalletSummary(
        balance=wallet.balance,
        held=wallet.held,
        available=wallet.available,
        currency=wallet.currency,
        status=wallet_status(
            balance=wallet.balance, held=wallet.held, low_balance_threshold=wallet.low_balance_threshold
        ),
        low_balance_threshold=threshold_in_force(wallet.low_balance_threshold),
    )


def entries_of(**owner) -> QuerySet[Entry]:
    """The entries of the wallet of ``user=…`` or ``organization=…``. The wallet's id is a scalar
    subquery, not a join: PostgreSQL then reads the entries newest first straight off the
    ``(wallet, id)`` index and stops at the page, where a join would sort the whole history."""
    return Entry.objects.filter(wallet_id=Subquery(Wallet.objects.filter(**owner).values("pk")[:1]))


def entry_list(
    *, user, kind: str | None = None, since: datetime | None = None, until: datetime | None = None
) -> QuerySet[Entry]:
    """The user's entries, newest first. ``since`` is inclusive, ``until`` exclusive."""
    entries = entries_of(user=user)
    if kind:
        entries = entries.filter(kind=kind)
    if since is not None:
        entries = entries.filter(created_at__gte=since)
    if until is not None:
        entries = entries.filter(created_at__lt=until)
    return entries.order_by("-id")


def entry_page(*, user, size: int, after: str | None = None, before: str | None = None, **filters) -> Page:
    """One keyset page of ``entry_list(user=user, **filters)``: below the entry ``after``, above
    the entry ``before``, or the newest (``infra.keyset``)."""
    return keyset_page(entry_list(user=user, **filters), keyset=BY_ID, size=size, after=after, before=before)


def entry_get(*, user, entry_id: int) -> Entry | None:
    """One of the user's own entries; someone else's id is indistinguishable from a missing one."""
    return Entry.objects.filter(wallet__user=user, pk=entry_id).first()


CSV_CHUNK_ROWS = 2000  # entries per keyset read of an export
CSV_COLUMNS = ["id", "created_at", "kind", "amount", "balance_after", "description", "reference", "metadata"]
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe_text(value: str) -> str:
    # Descriptions and metadata can come from API clients (/v1/user/charge); a cell starting with
    # "=" would run as a formula when the user opens the export in a spreadsheet.
    return "'" + value if value.startswith(_FORMULA_PREFIXES) else value


class _Line:
    """csv.writer needs a file; this one hands back each line instead of storing it."""

    def write(self, value: str) -> str:
        return value


def entries_csv_lines(entries: QuerySet[Entry], *, chunk_size: int | None = None) -> Iterator[str]:
    """The whole queryset as CSV lines (header first), newest first, read ``chunk_size`` entries
    at a time by keyset (``infra.keyset.keyset_chunks``), so memory stays flat however long the
    history is and no read holds a snapshot open while a slow client drains the response."""
    writer = csv.writer(_Line())
    yield writer.writerow(CSV_COLUMNS)
    rows = entries.values(*CSV_COLUMNS)
    for chunk in keyset_chunks(rows, keyset=BY_ID, size=chunk_size or CSV_CHUNK_ROWS):
        for row in chunk:
            metadata = row["metadata"]
            yield writer.writerow(
                [
                    row["id"],
                    row["created_at"].isoformat(),
                    row["kind"],
                    format_usd(row["amount"]),
                    format_usd(row["balance_after"]),
                    csv_safe_text(row["description"]),
                    csv_safe_text(row["reference"]),
                    csv_safe_text(json.dumps(metadata, sort_keys=True, default=str)) if metadata else "",
                ]
            )
