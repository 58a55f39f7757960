"""The price table and the record of every proxied request.

Prices are *rates*, kept as exact decimals in USD per one million tokens (how operators read
them); fixed fees are money and kept as integer nanodollars like every other amount. A price
change never edits a row: it adds a new version with a later ``effective_from``, and each usage
record points at the version (and stores a snapshot of the numbers) it was charged with, so
every charge can be re-derived.
"""

from django.conf import settings
from django.db import models
from django.utils import timezone

PER_MILLION = 1_000_000


def _rate(help_text: str):
    return models.DecimalField(max_digits=24, decimal_places=12, default=0, help_text=help_text)


class ModelPrice(models.Model):
    model = models.CharField(max_length=200, db_index=True, help_text="Model id clients send, e.g. openai/gpt-4o-mini")
    name = models.CharField(max_length=200, blank=True)
    prompt = _rate("USD per 1M prompt tokens")
    completion = _rate("USD per 1M completion tokens")
    reasoning = _rate("USD per 1M reasoning tokens (0 = billed as completion tokens)")
    cache_read = _rate("USD per 1M cached prompt tokens read (0 = billed as prompt tokens)")
    cache_write = _rate("USD per 1M prompt tokens written to cache (0 = billed as prompt tokens)")
    request_fee = models.BigIntegerField(default=0, help_text="nanodollars per request, before markup")
    min_charge = models.BigIntegerField(default=0, help_text="nanodollars: the least a request is charged")
    markup = models.DecimalField(
        max_digits=8, decimal_places=4, null=True, blank=True, help_text="override of MARKUP, e.g. 0.2500"
    )
    enabled = models.BooleanField(default=True)
    is_demo = models.BooleanField(default=False, help_text="served in-process by the built-in demo model")
    default_max_output = models.PositiveIntegerField(
        default=4096, help_text="output tokens assumed for the hold when the request sets no max_tokens"
    )
    context_length = models.PositiveIntegerField(null=True, blank=True)
    effective_from = models.DateTimeField(default=timezone.now, db_index=True)
    source = models.CharField(max_length=40, blank=True, help_text="admin, sync_prices, seed …")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "-effective_from", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["model", "effective_from"], name="modelprice_one_version_per_instant"),
            models.CheckConstraint(condition=models.Q(request_fee__gte=0, min_charge__gte=0), name="modelprice_fees"),
        ]

    def __str__(self):
        return f"{self.model} from {self.effective_from:%Y-%m-%d %H:%M}"

    def effective_markup(self):
        return self.markup if self.markup is not None else settings.MARKUP


class UsageStatus(models.TextChoices):
    OK = "ok", "Completed"
    CANCELLED = "cancelled", "Client disconnected"
    UPSTREAM_ERROR = "upstream_error", "Upstream error"
    REFUSED = "refused", "Refused before the upstream"
    PENDING = "pending", "In flight"


class CostSource(models.TextChoices):
    UPSTREAM = "upstream", "Upstream-reported cost"
    PRICE_TABLE = "price_table", "Token counts × price table"
    ESTIMATE = "estimate", "Estimate (upstream reported nothing)"
    RECONCILED = "reconciled", "Reconciled from the upstream's generation lookup"
    NONE = "none", "Not charged"


class UsageRecord(models.Model):
    """One proxied request. Written twice per request on the hot path (inserted pending, updated
    at settlement — a change of indexed columns, so every index gets a new entry each time), so
    it carries only the indexes its queries use: by user and time, by key, by status, by time."""

    request_id = models.CharField(max_length=128, unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="usage_records", db_index=False
    )
    api_key = models.ForeignKey(
        "accounts.ApiKey", null=True, blank=True, on_delete=models.PROTECT, related_name="usage_records"
    )
    endpoint = models.CharField(max_length=40, default="chat.completions")
    model = models.CharField(max_length=200, help_text="model the client asked for")
    upstream_model = models.CharField(max_length=200, blank=True, help_text="model that actually served it")
    generation_id = models.CharField(max_length=200, blank=True)
    stream = models.BooleanField(default=False)
    status = models.CharField(max_length=20, choices=UsageStatus.choices, default=UsageStatus.PENDING)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)
    finish_reason = models.CharField(max_length=40, blank=True)

    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    reasoning_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    cache_write_tokens = models.PositiveIntegerField(default=0)

    upstream_cost = models.DecimalField(
        max_digits=24, decimal_places=15, null=True, blank=True, help_text="USD, as reported or priced"
    )
    cost_source = models.CharField(max_length=20, choices=CostSource.choices, default=CostSource.NONE)
    charge = models.BigIntegerField(default=0, help_text="nanodollars debited from the wallet")
    hold_amount = models.BigIntegerField(default=0, help_text="nanodollars reserved before forwarding")
    markup = models.DecimalField(max_digits=8, decimal_places=4, null=True, blank=True)
    # Unindexed: price versions are never deleted (nothing may, the admin included), which is all
    # an index here would serve.
    price = models.ForeignKey(
        ModelPrice, null=True, blank=True, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    prices = models.JSONField(default=dict, blank=True, help_text="snapshot of the rates and fees used")
    estimated = models.BooleanField(default=False)

    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    ttfb_ms = models.PositiveIntegerField(null=True, blank=True)
    run = models.CharField(max_length=200, blank=True)
    agent = models.CharField(max_length=200, blank=True)
    tool = models.CharField(max_length=200, blank=True)

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["user", "created_at"]),
            models.Index(fields=["user", "model", "created_at"]),
            models.Index(fields=["status", "created_at"]),
        ]

    def __str__(self):
        return f"{self.request_id} {self.model} {self.status}"
