"""The upstreams, the price table and the record of every proxied request.

Prices are *rates*, kept as exact decimals in USD per one million tokens (how operators read
them); fixed fees are money and kept as integer nanodollars like every other amount. A price
change never edits a row: it adds a new version with a later ``effective_from``, and each usage
record points at the version (and stores a snapshot of the numbers) it was charged with, so
every charge can be re-derived.

A model is served by one or more upstreams. Each (model, upstream) pair is a series of price
versions of its own — the same model may cost differently at two upstreams — and the series in
force that are enabled are the model's *candidates*, tried in ``priority`` order. A price row
with no upstream is served by the *default upstream*, the one the ``UPSTREAM_*`` settings
describe (it has no row of its own); ``Upstream`` rows are the others, added by staff.
"""

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, URLValidator
from django.db import models
from django.db.models import Q
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

PER_MILLION = 1_000_000
# Names an Upstream row cannot take: what usage records call the settings upstream and the demo.
DEFAULT_UPSTREAM = "default"
DEMO_UPSTREAM = "demo"
RESERVED_UPSTREAM_NAMES = (DEFAULT_UPSTREAM, DEMO_UPSTREAM)


class UpstreamKind(models.TextChoices):
    OPENROUTER = "openrouter", "OpenRouter (reports usage.cost)"
    OPENAI = "openai", "OpenAI-compatible (OpenAI, vLLM, Ollama, llama.cpp …)"
    ANTHROPIC = "anthropic", "Anthropic"


class Upstream(models.Model):
    """A model provider staff configured besides the default upstream.

    Its API key is stored encrypted (``proxy.keyvault``) and never rendered again: the admin
    shows whether one is set. Rows are never deleted (price versions and usage records name
    them): an upstream is retired by disabling it.
    """

    name = models.SlugField(max_length=64, unique=True, help_text="short id, e.g. openrouter-eu or vllm-a100")
    kind = models.CharField(max_length=20, choices=UpstreamKind.choices)
    base_url = models.CharField(
        max_length=500,
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="the OpenAI-compatible base URL, e.g. https://openrouter.ai/api/v1 or http://10.0.0.5:8000/v1",
    )
    api_key_encrypted = models.TextField(blank=True, editable=False)
    ca_bundle = models.TextField(
        blank=True,
        help_text="certificates to trust besides the public CAs: PEM text, or the path of a PEM file on the server",
    )
    connect_timeout = models.FloatField(
        default=10, validators=[MinValueValidator(0.1), MaxValueValidator(600)], help_text="seconds"
    )
    read_timeout = models.FloatField(
        default=300,
        validators=[MinValueValidator(0.1), MaxValueValidator(3600)],
        help_text="seconds without a byte from the upstream before it counts as timed out",
    )
    max_connections = models.PositiveIntegerField(
        default=200,
        validators=[MinValueValidator(1), MaxValueValidator(10_000)],
        help_text="HTTP connections per server process",
    )
    max_concurrency = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(100_000)],
        help_text="requests in flight per server process (0 = no limit); beyond it the next upstream is tried",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=models.Q(kind__in=UpstreamKind.values), name="upstream_kind_known"),
            models.CheckConstraint(
                condition=models.Q(base_url__startswith="http://") | models.Q(base_url__startswith="https://"),
                name="upstream_base_url_http",
            ),
            models.CheckConstraint(
                condition=models.Q(connect_timeout__gt=0, read_timeout__gt=0, max_connections__gte=1),
                name="upstream_limits_positive",
            ),
            models.CheckConstraint(
                condition=~models.Q(name__in=RESERVED_UPSTREAM_NAMES), name="upstream_name_not_reserved"
            ),
        ]

    def __str__(self):
        return self.name


def _rate(help_text: str):
    return models.DecimalField(max_digits=24, decimal_places=12, default=0, help_text=help_text)


class ModelPrice(models.Model):
    model = models.CharField(max_length=200, db_index=True, help_text="Model id clients send, e.g. openai/gpt-4o-mini")
    # With the model, names the series this row is a version of; blank = the default upstream.
    upstream = models.ForeignKey(
        Upstream,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="prices",
        help_text="who serves the model at these prices (blank: the default upstream, UPSTREAM_BASE_URL)",
    )
    priority = models.PositiveSmallIntegerField(
        default=0, help_text="among the upstreams serving this model, lower is tried first"
    )
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
    # What the hold assumes a non-text part of the prompt costs, in prompt tokens (blank: the
    # HOLD_*_TOKENS setting). The body's size says nothing of what an image is billed as.
    image_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="prompt tokens held per image (detail high, auto or unset); blank: setting"
    )
    image_low_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="prompt tokens held per image sent with detail low; blank: setting"
    )
    audio_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="prompt tokens held per audio part; blank: setting"
    )
    file_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="prompt tokens held per file or document part; blank: setting"
    )
    overrun_cap = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="nanodollars a request may settle above its hold; the rest is operator loss (blank: setting)",
    )
    effective_from = models.DateTimeField(default=timezone.now, db_index=True)
    source = models.CharField(max_length=40, blank=True, help_text="admin, sync_prices, seed …")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "-effective_from", "-id"]
        constraints = [
            # One version per series and instant; the default upstream's series (no upstream) needs
            # its own constraint, as NULLs never collide in a UNIQUE index.
            models.UniqueConstraint(
                fields=["model", "effective_from"],
                condition=models.Q(upstream__isnull=True),
                name="modelprice_one_version_per_instant",
            ),
            models.UniqueConstraint(
                fields=["model", "upstream", "effective_from"],
                condition=models.Q(upstream__isnull=False),
                name="modelprice_one_upstream_version_per_instant",
            ),
            models.CheckConstraint(
                condition=~models.Q(is_demo=True, upstream__isnull=False), name="modelprice_demo_has_no_upstream"
            ),
            models.CheckConstraint(condition=models.Q(request_fee__gte=0, min_charge__gte=0), name="modelprice_fees"),
            models.CheckConstraint(
                condition=models.Q(overrun_cap__isnull=True) | models.Q(overrun_cap__gte=0),
                name="modelprice_overrun_cap_non_negative",
            ),
        ]

    def __str__(self):
        at = f" at {self.upstream.name}" if self.upstream is not None else ""
        return f"{self.model}{at} from {self.effective_from:%Y-%m-%d %H:%M}"

    @property
    def upstream_name(self) -> str:
        if self.is_demo:
            return DEMO_UPSTREAM
        return self.upstream.name if self.upstream is not None else DEFAULT_UPSTREAM

    def effective_markup(self):
        return self.markup if self.markup is not None else settings.MARKUP


class FallbackRule(models.Model):
    """What a model or an alias falls back to when the wallet runs low (``proxy.tiers``)."""

    fallback = models.CharField(
        max_length=200,
        blank=True,
        help_text="a cheaper model or alias that serves the request instead when the wallet cannot afford this one",
    )
    fallback_below = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="nanodollars: an available balance under this is served by the fallback even when the hold fits",
    )

    class Meta:
        abstract = True


class ModelAlias(FallbackRule):
    """A name staff sell (``tier/fast``) for a model in the price table: apps ask for the alias,
    and staff switch the model behind it without a new app. Usage records keep both names as
    they were at the time, so a switch never rewrites history."""

    name = models.CharField(max_length=200, unique=True, help_text="what apps send as `model`, e.g. tier/fast")
    model = models.CharField(max_length=200, help_text="the model in the price table that serves it")
    description = models.CharField(max_length=200, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "model aliases"
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(name=models.F("model")),
                name="modelalias_not_itself",
                violation_error_message="an alias cannot stand for itself",
            ),
            models.CheckConstraint(
                condition=models.Q(fallback_below__isnull=True) | models.Q(fallback_below__gte=0),
                name="modelalias_fallback_below_non_negative",
            ),
        ]

    def __str__(self):
        return f"{self.name} → {self.model}"


class ModelFallback(FallbackRule):
    """A model's own fallback (an alias's is on the alias, and wins over its model's)."""

    model = models.CharField(max_length=200, unique=True, help_text="a model in the price table")

    class Meta:
        ordering = ["model"]
        constraints = [
            models.CheckConstraint(condition=~models.Q(fallback=""), name="modelfallback_names_one"),
            models.CheckConstraint(
                condition=~models.Q(fallback=models.F("model")),
                name="modelfallback_not_itself",
                violation_error_message="a fallback cannot be the model (or alias) itself",
            ),
            models.CheckConstraint(
                condition=models.Q(fallback_below__isnull=True) | models.Q(fallback_below__gte=0),
                name="modelfallback_fallback_below_non_negative",
            ),
        ]

    def __str__(self):
        return f"{self.model} ⇢ {self.fallback}"


class AgentRoute(models.Model):
    """Requests labelled ``X-Tokentill-Agent: <agent>`` are served by ``alias``, whatever model
    they ask for: the central "which agent uses which model" mapping."""

    agent = models.CharField(max_length=200, unique=True, help_text="the X-Tokentill-Agent label, exactly")
    alias = models.ForeignKey(ModelAlias, on_delete=models.PROTECT, related_name="agents")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["agent"]

    def __str__(self):
        return f"{self.agent} → {self.alias.name}"


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
    it carries only the indexes its queries use: by user (or organization) and time, by key, by
    status, by time."""

    request_id = models.CharField(max_length=128, unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="usage_records", db_index=False
    )
    api_key = models.ForeignKey(
        "accounts.ApiKey", null=True, blank=True, on_delete=models.PROTECT, related_name="usage_records"
    )
    # Billed to this organization's wallet (``user`` is then the member who spent); None: the
    # user's own wallet.
    organization = models.ForeignKey(
        "orgs.Organization",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="usage_records",
        db_index=False,  # (organization, created_at, id) leads with it
    )
    endpoint = models.CharField(max_length=40, default="chat.completions")
    model = models.CharField(max_length=200, help_text="model the client asked for")
    # What the request was routed and priced as, kept as it was at the time (an alias's target
    # may change later): the alias it asked for or its agent was mapped to, the price-table model
    # that served it, and whether that model was the fallback.
    alias = models.CharField(max_length=200, blank=True, help_text="alias the request was resolved through")
    served_model = models.CharField(
        max_length=200, blank=True, help_text="price-table model it was served and priced as"
    )
    fallback = models.BooleanField(default=False, help_text="served by the fallback: the wallet ran low")
    upstream_model = models.CharField(max_length=200, blank=True, help_text="model the upstream reported serving")
    # A name, not a foreign key: evidence, like ``model`` (upstreams are never deleted or renamed).
    upstream = models.CharField(
        max_length=64, blank=True, help_text="upstream that served it: an Upstream's name, default or demo"
    )
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
    operator_loss = models.BigIntegerField(
        default=0, help_text="nanodollars the request cost beyond what its hold's overrun cap let the wallet pay"
    )
    hold_amount = models.BigIntegerField(default=0, help_text="nanodollars reserved before forwarding")
    # Tokens the hold assumed (prompt estimate + output cap × choices): what a pending request
    # counts against token limits, and what a lost token counter is rebuilt from (proxy.limits).
    held_tokens = models.PositiveBigIntegerField(default=0)
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
            # The lists' order, newest first with the id breaking ties (``infra.keyset``): a page
            # at any depth is one backward range scan with no sort.
            models.Index(fields=["user", "created_at", "id"], name="usage_user_time_idx"),
            models.Index(fields=["organization", "created_at", "id"], name="usage_org_time_idx"),
            models.Index(fields=["user", "model", "created_at"]),
            models.Index(fields=["status", "created_at"]),
        ]

    def __str__(self):
        return f"{self.request_id} {self.model} {self.status}"


class UsageSums(models.Model):
    """The figures every usage rollup level sums."""

    requests = models.BigIntegerField(default=0)
    refused = models.BigIntegerField(default=0, help_text="of which refused before the upstream")
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    reasoning_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    upstream_cost = models.DecimalField(max_digits=38, decimal_places=15, default=0, help_text="USD")
    charge = models.BigIntegerField(default=0, help_text="nanodollars")
    operator_loss = models.BigIntegerField(default=0, help_text="nanodollars")
    loss_requests = models.BigIntegerField(default=0, help_text="requests with an operator loss")

    class Meta:
        abstract = True


class PayerSums(UsageSums):
    """A per-user level's sums and whose they are: the user, and the organization billed (none: the
    user's own wallet; the unique keys count it as 0, a NULL never colliding). The foreign keys are
    not database constraints (no per-settlement check of more tables); the rows they name are never
    deleted (usage records protect them)."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+", db_index=False, db_constraint=False
    )
    organization = models.ForeignKey(
        "orgs.Organization",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )

    class Meta:
        abstract = True


class UsageRollup(PayerSums):
    """The sums of the settled usage records of one hour (UTC) × user × organization billed × API
    key × requested model × agent label: what every period total is read from (``proxy.rollups``).

    Kept exact by the database itself: triggers on the usage record table (migration 0010) add a
    record's figures when it leaves ``pending`` (settled, or inserted refused) and move the
    difference when a settled record is changed (``reconcile_holds``), in the same statement and
    transaction as the change, whoever makes it — the proxy's settlement statement, the ORM, raw
    SQL. Records in flight are not in it: readers add them from the raw rows. Deleting raw rows
    (pruning) leaves their sums here. ``rebuild`` recomputes any range from the raw rows.

    The API key may be none too, counted as 0 by the unique key like the organization
    (``PayerSums``).
    """

    hour = models.DateTimeField(help_text="the hour (UTC) the requests were made in")
    api_key = models.ForeignKey(
        "accounts.ApiKey",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    model = models.CharField(max_length=200, help_text="model the client asked for")
    agent = models.CharField(max_length=200, blank=True)

    class Meta:
        constraints = [
            # Leads with the user: a user's own totals are one range of this index.
            models.UniqueConstraint(
                models.F("user"),
                models.F("hour"),
                Coalesce(models.F("organization"), models.Value(0)),
                Coalesce(models.F("api_key"), models.Value(0)),
                models.F("model"),
                models.F("agent"),
                name="usagerollup_one_row_per_group",
            ),
        ]
        indexes = [
            models.Index(fields=["hour"]),  # the operator's totals
            models.Index(fields=["organization", "hour"]),  # an organization's
        ]

    def __str__(self):
        return f"{self.hour:%Y-%m-%d %H}:00 user {self.user_id} {self.model}: {self.requests}"


class UsageDayRollup(PayerSums):
    """The usage of one UTC day × user × organization billed × requested model: ``UsageRollup``
    by day, without the API key and agent label (which multiply a busy user's rows several times
    over and which few totals ask for — those read the hours). A user's or an organization's
    totals over whole days read at most one row per day and model. Written by the same triggers
    in the same statement (migration 0012): its rows are per user, and a user's settlements
    already take turns on their wallet row (an organization's on its), so they add no
    contention."""

    day = models.DateTimeField(help_text="the UTC day (its midnight) the requests were made in")
    model = models.CharField(max_length=200, help_text="model the client asked for")

    class Meta:
        constraints = [
            # Leads with the user: a user's own totals are one range of this index.
            models.UniqueConstraint(
                models.F("user"),
                models.F("day"),
                Coalesce(models.F("organization"), models.Value(0)),
                models.F("model"),
                name="usagedayrollup_one_row_per_group",
            ),
        ]
        indexes = [
            models.Index(fields=["day"]),  # grouped by user or organization over a period
            models.Index(fields=["organization", "day"]),  # an organization's
        ]

    def __str__(self):
        return f"{self.day:%Y-%m-%d} user {self.user_id} {self.model}: {self.requests}"


class UserDayRollup(PayerSums):
    """The usage of one UTC day × user × organization billed, all models together: a user's (or an
    organization's member's) spending per day reads one row a day (``UsageDayRollup`` has one
    per model). Written by the triggers like it."""

    day = models.DateTimeField(help_text="the UTC day (its midnight) the requests were made in")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                models.F("user"),
                models.F("day"),
                Coalesce(models.F("organization"), models.Value(0)),
                name="userdayrollup_one_row_per_group",
            ),
        ]
        indexes = [models.Index(fields=["organization", "day"])]

    def __str__(self):
        return f"{self.day:%Y-%m-%d} user {self.user_id}: {self.requests}"


class UserMonthRollup(PayerSums):
    """The usage of one UTC calendar month × user × organization billed × requested model: a
    user's all-time totals by model read a few rows per model. Written by the triggers like
    ``UsageDayRollup``."""

    month = models.DateTimeField(help_text="the first instant (UTC) of the month")
    model = models.CharField(max_length=200, help_text="model the client asked for")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                models.F("user"),
                models.F("month"),
                Coalesce(models.F("organization"), models.Value(0)),
                models.F("model"),
                name="usermonthrollup_one_row_per_group",
            ),
        ]
        indexes = [models.Index(fields=["organization", "month"])]

    def __str__(self):
        return f"{self.month:%Y-%m} user {self.user_id} {self.model}: {self.requests}"


class ModelHourRollup(UsageSums):
    """Operator-wide sums per hour (UTC) × requested model: the dashboard's edge hours. Not
    written by settlements (one row every concurrent request of a model would wait on): the
    triggers append to ``ModelRollupJournal`` and ``proxy.rollups.fold`` moves the journal in."""

    hour = models.DateTimeField()
    model = models.CharField(max_length=200)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["hour", "model"], name="modelhourrollup_one_row_per_group")]

    def __str__(self):
        return f"{self.hour:%Y-%m-%d %H}:00 {self.model}: {self.requests}"


class ModelDayRollup(UsageSums):
    """Operator-wide sums per UTC day × requested model: the dashboard's totals, days and models.
    Folded from ``ModelRollupJournal`` like ``ModelHourRollup``."""

    day = models.DateTimeField()
    model = models.CharField(max_length=200)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["day", "model"], name="modeldayrollup_one_row_per_group")]

    def __str__(self):
        return f"{self.day:%Y-%m-%d} {self.model}: {self.requests}"


class ModelRollupJournal(UsageSums):
    """Append-only deltas for the operator-wide levels, one per settled (or changed) record,
    inserted by the triggers (an insert waits on no one). ``proxy.rollups.fold`` deletes them and
    adds them to ``ModelHourRollup``/``ModelDayRollup`` in one statement; readers add the rows
    still here, in the same statement as the folded ones. Small when the fold runs (every
    ``reconcile_holds``); the dashboard warns when it holds old rows."""

    hour = models.DateTimeField()
    model = models.CharField(max_length=200)
    created_at = models.DateTimeField(db_default=Now(), help_text="when the trigger appended it")

    def __str__(self):
        return f"{self.hour:%Y-%m-%d %H}:00 {self.model}: {self.requests:+}"


class SpenderMonthRollup(models.Model):
    """What each wallet owner spent on model usage per calendar month (UTC): the user, for
    requests paid from their own wallet (``organization`` none), or the organization, for
    requests billed to it (``user`` none). The upper bounds ``backoffice.business.top_spenders``
    orders its candidates by. Written by the triggers: a row belongs to one wallet's owner, whose
    settlements already take turns on that wallet."""

    month = models.DateTimeField(help_text="the first instant (UTC) of the month")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    organization = models.ForeignKey(
        "orgs.Organization",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    charge = models.BigIntegerField(default=0, help_text="nanodollars")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                models.F("month"),
                Coalesce(models.F("user"), models.Value(0)),
                Coalesce(models.F("organization"), models.Value(0)),
                name="spendermonthrollup_one_row_per_payer",
            ),
        ]
        indexes = [
            # The biggest spenders of a month, read from the top (``rollups.spender_candidates``):
            # users and organizations apart, each read without stepping over the other.
            models.Index(
                fields=["month", "-charge"], condition=Q(user__isnull=False), name="spendermonth_user_charge_idx"
            ),
            models.Index(
                fields=["month", "-charge"],
                condition=Q(organization__isnull=False),
                name="spendermonth_org_charge_idx",
            ),
        ]

    def __str__(self):
        return f"{self.month:%Y-%m} user {self.user_id} org {self.organization_id}: {self.charge}"
