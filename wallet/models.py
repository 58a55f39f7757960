"""The wallet ledger.

* Amounts are integer nanodollars (1 USD = 10**9), ``BigIntegerField``, never floats.
* ``Entry`` is append-only: the model refuses save-after-create and delete, and database triggers
  (SQLite and PostgreSQL, see migration 0002) refuse UPDATE and DELETE outright.
* ``Wallet.balance`` is a cache of ``Σ entries.amount``; every change writes the entry and the
  wallet row in the same transaction (``wallet.services``), so the two never disagree.
* ``Wallet.held`` is ``Σ active holds``: money reserved for requests in flight. A hold is taken by
  one conditional UPDATE (``held += x WHERE balance - held - floor >= x``) so concurrent requests
  can never together reserve more than is available.
* Settling charges the *actual* cost even when it exceeds the hold; the balance may then dip
  below zero by that overage, which blocks the wallet until the next top-up. A hold may carry an
  ``overrun_cap``: then its settlement takes at most hold + cap, and never takes the balance
  below −cap; what the request cost beyond that is the operator's loss (``settlement_charge``).
* ``(wallet, idempotency_key)`` is UNIQUE, so a replayed external event cannot post twice.
* ``low_balance_threshold`` is the user's alert level: every balance change compares the balance
  before and after it with that level (and with ``MIN_BALANCE``) and writes a ``balance.low`` /
  ``balance.depleted`` event into ``notify``'s outbox in the same transaction when it crosses
  (``wallet.alerts``).
"""

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Wallet(models.Model):
    # A wallet belongs to a user or to an organization (``orgs``), never both, never neither.
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="wallet"
    )
    organization = models.OneToOneField(
        "orgs.Organization", null=True, blank=True, on_delete=models.PROTECT, related_name="wallet"
    )
    balance = models.BigIntegerField(default=0)  # nanodollars
    held = models.BigIntegerField(default=0)  # nanodollars reserved by active holds
    currency = models.CharField(max_length=3, default="USD")
    # Nanodollars; the balance falling below it is a ``balance.low`` event (and email). None: the
    # operator's LOW_BALANCE_THRESHOLD; 0: no low-balance alert. Kept on the wallet row, not in
    # notify's preferences, so the settlement statement reads it with the balance at no cost.
    low_balance_threshold = models.BigIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(held__gte=0), name="wallet_held_non_negative"),
            models.CheckConstraint(
                condition=Q(user__isnull=False, organization__isnull=True)
                | Q(user__isnull=True, organization__isnull=False),
                name="wallet_one_owner",
            ),
            models.CheckConstraint(
                condition=Q(low_balance_threshold__isnull=True) | Q(low_balance_threshold__gte=0),
                name="wallet_low_balance_threshold_non_negative",
            ),
        ]

    def __str__(self):
        return f"wallet of {self.owner}"

    @property
    def owner(self):
        """The user or the organization the wallet belongs to."""
        return self.user if self.user_id is not None else self.organization

    @property
    def available(self) -> int:
        return self.balance - self.held


class EntryKind(models.TextChoices):
    TOP_UP = "top_up", "Top-up"
    TRIAL = "trial", "Trial credit"
    BONUS = "bonus", "Bonus"
    GRANT = "grant", "Subscription grant"
    USAGE = "usage", "Model usage"
    CHARGE = "charge", "Tool charge"
    REFUND = "refund", "Refund clawback"
    CORRECTION = "correction", "Staff correction"


CREDIT_KINDS = {EntryKind.TOP_UP, EntryKind.TRIAL, EntryKind.BONUS, EntryKind.GRANT}
DEBIT_KINDS = {EntryKind.USAGE, EntryKind.CHARGE, EntryKind.REFUND}


class AppendOnlyError(Exception):
    pass


class Entry(models.Model):
    # No index of its own: (wallet, idempotency_key), (wallet, id) and (wallet, kind, created_at)
    # lead with it.
    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="entries", db_index=False)
    kind = models.CharField(max_length=16, choices=EntryKind.choices)
    amount = models.BigIntegerField()  # nanodollars, signed: credits > 0, debits < 0
    balance_after = models.BigIntegerField()  # nanodollars
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    reference = models.CharField(max_length=200, blank=True)
    description = models.CharField(max_length=500, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # On an organization's wallet: the member whose request (or charge) this is. (The wallet
    # names the organization.)
    member = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "entries"
        constraints = [
            models.CheckConstraint(condition=~Q(amount=0), name="entry_amount_non_zero"),
            models.UniqueConstraint(fields=["wallet", "idempotency_key"], name="entry_wallet_idempotency_key"),
            models.CheckConstraint(
                # sorted: a set's order changes between processes, and each order read as a new
                # constraint to makemigrations.
                condition=(
                    Q(kind__in=sorted(CREDIT_KINDS), amount__gt=0) | Q(kind__in=sorted(DEBIT_KINDS), amount__lt=0)
                )
                | Q(kind=EntryKind.CORRECTION),
                name="entry_sign_matches_kind",
            ),
        ]
        indexes = [
            models.Index(fields=["wallet", "kind", "created_at"]),
            # Every list of a wallet's entries is newest first by id (``infra.keyset``), and
            # verify_ledger walks each wallet's running balance in id order.
            models.Index(fields=["wallet", "id"], name="entry_wallet_id_idx"),
            # Tool charges over a period (the dashboard's money, its chart and the top spenders):
            # a few rows among millions of usage debits, found without reading those.
            models.Index(fields=["created_at"], condition=Q(kind="charge"), name="entry_tool_charge_time_idx"),
        ]

    def __str__(self):
        return f"{self.kind} {self.amount} on wallet {self.wallet_id}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise AppendOnlyError("ledger entries are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnlyError("ledger entries are append-only")


class HoldStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    SETTLED = "settled", "Settled"
    RELEASED = "released", "Released"


class Hold(models.Model):
    """Money reserved for one request. Its settlement entry is found by ``reference=request_id``
    (and idempotency key ``hold:<request_id>``), which also makes a double settle impossible."""

    wallet = models.ForeignKey(Wallet, on_delete=models.PROTECT, related_name="holds")
    amount = models.BigIntegerField()  # nanodollars reserved
    request_id = models.CharField(max_length=128, unique=True)
    status = models.CharField(max_length=10, choices=HoldStatus.choices, default=HoldStatus.ACTIVE)
    description = models.CharField(max_length=500, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)
    # Nanodollars the settlement may take beyond ``amount`` (None: no cap, the whole cost is
    # charged). Kept on the row so every settler — the proxy, reconcile_holds — applies it.
    overrun_cap = models.BigIntegerField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="hold_amount_positive"),
            models.CheckConstraint(
                condition=Q(overrun_cap__isnull=True) | Q(overrun_cap__gte=0), name="hold_overrun_cap_non_negative"
            ),
        ]
        indexes = [models.Index(fields=["status", "expires_at"])]

    def __str__(self):
        return f"hold {self.request_id} ({self.status})"


def settlement_charge(*, amount: int, hold_amount: int, overrun_cap: int | None, balance: int) -> int:
    """What settling a hold takes from the wallet when the request cost ``amount`` and the
    wallet's balance (under its row lock) is ``balance`` — all nanodollars.

    Without a cap, the whole cost. With one, at most the hold plus the cap, and never so much
    that the balance ends below −cap: a burst of requests that each overran cannot together
    drive the wallet further down than one could. The rest is the operator's loss.
    ``wallet.pg``'s settlement statement computes the same in SQL (the contract tests compare).
    """
    if overrun_cap is None:
        return amount
    return max(0, min(amount, hold_amount + overrun_cap, balance + overrun_cap))
