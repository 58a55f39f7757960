"""The operator audit log: one row per call to the operator API (``/api/admin/``).

Who (the staff member and the operator key), what (method, path, the operation, its target, the
request's query and body as storable text), when, and the outcome (status code, and what was
refused or done). It is append-only: the model refuses changes and deletes, and database
triggers (migration 0002, per vendor) refuse UPDATE and DELETE outright, so the log cannot be
rewritten by anyone it records. Secrets never reach it: the operator API takes none, the
credential itself is not stored (only its prefix), and request fields named like a secret are
masked before writing (``backoffice.audit``).
"""

from django.conf import settings
from django.db import models
from django.utils import timezone


class AppendOnlyError(Exception):
    pass


class Outcome(models.TextChoices):
    OK = "ok", "Done (2xx)"
    REFUSED = "refused", "Refused (4xx)"
    FAILED = "failed", "Failed (5xx)"


class AuditEntry(models.Model):
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    actor_email = models.CharField(max_length=254)  # as it was at the time of the call
    # The operator key used; None for a refused call made with another kind of credential (an
    # access token), which is recorded all the same.
    api_key = models.ForeignKey("accounts.ApiKey", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    key_prefix = models.CharField(max_length=12, blank=True)
    method = models.CharField(max_length=10)
    path = models.CharField(max_length=500)
    operation = models.CharField(max_length=64, blank=True)  # the OpenAPI operation id, e.g. users_grant
    target = models.CharField(max_length=100, blank=True)  # e.g. "user:42", "key:7"
    request_data = models.JSONField(default=dict, blank=True)  # {"query": {...}, "body": ...}, sanitised
    idempotency_key = models.CharField(max_length=200, blank=True)
    status_code = models.PositiveSmallIntegerField()
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    detail = models.CharField(max_length=1000, blank=True)  # what was done, or why it was refused

    class Meta:
        ordering = ["-id"]
        verbose_name = "operator audit entry"
        verbose_name_plural = "operator audit log"
        indexes = [models.Index(fields=["target", "id"])]

    def __str__(self):
        return f"{self.method} {self.path} by {self.actor_email} → {self.status_code}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise AppendOnlyError("the operator audit log is append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnlyError("the operator audit log is append-only")


class LedgerCheckpoint(models.Model):
    """How far ``verify_ledger`` has proved the ledger, so ``--incremental`` checks only what was
    added since (one row).

    ``verified_through`` is an entry id below which every entry is *final* — committed, or never
    to commit — and verified; ``totals`` are Σ amount per entry kind of those entries (strings of
    nanodollars). Ids are handed out before commit, so a transaction may commit an entry with a
    smaller id than one already seen: the run that sees ``candidate_id`` as the highest id also
    records its snapshot's xmax (``candidate_xmax``), and a later run promotes the candidate only
    once every transaction that was running then (in this database) has ended, as its own
    snapshot sees it. A run whose own snapshot had no transaction running in this database moves
    the checkpoint to the highest id it read at once: an id below it still to commit would belong
    to a transaction running in that snapshot.
    SQLite has one writer at a time, so there the highest id seen is final at once.

    The ``last_run_*`` fields are the verdict of the latest run, clean or not, so the staff
    dashboard can show it without reading the ledger itself (a full pass takes minutes at ten
    million entries): when it ran, whether it was incremental, the problems it found (the first
    ``PROBLEMS_KEPT`` sentences and their count) and the totals it printed.
    """

    PROBLEMS_KEPT = 20

    verified_through = models.BigIntegerField(default=0)
    totals = models.JSONField(default=dict)
    candidate_id = models.BigIntegerField(null=True, blank=True)
    candidate_xmax = models.BigIntegerField(null=True, blank=True)  # a 64-bit transaction id (xid8)
    updated_at = models.DateTimeField(auto_now=True)
    last_run_at = models.DateTimeField(null=True, blank=True)  # None: verify_ledger never ran
    last_run_incremental = models.BooleanField(default=False)
    last_run_problem_count = models.PositiveIntegerField(default=0)
    last_run_problems = models.JSONField(default=list, blank=True)
    # LedgerTotals' fields, nanodollars as strings (JSON numbers lose digits in some readers).
    last_run_totals = models.JSONField(default=dict, blank=True)

    def __str__(self):
        return f"ledger verified through entry {self.verified_through}"
