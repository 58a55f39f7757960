"""Staff screens for the upstreams, the price table and the usage log.

Upstreams: the API key is a write-only field — typed once, stored encrypted, never shown again
(the page says whether one is set); a "test connection" action asks each selected upstream for
its model list. Never deleted (price rows and usage records name them): disabled instead.

Prices: saving a changed price inserts a new version (``proxy.prices.price_version_save``); the
row that was opened, and every usage record charged with it, stay as they were. Superseded
versions are shown read-only with the series' whole history on each page, and every upstream
serving the model in the order they are tried. Nothing is deletable: a price row is part of how
past charges are explained. Usage records are read-only evidence.
"""

from urllib.parse import urlsplit

from django import forms
from django.contrib import admin, messages
from django.db.models import F
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from infra.forms import MoneyField
from infra.money_html import money_html

from . import routing, upstream
from .models import AgentRoute, ModelAlias, ModelFallback, ModelPrice, Upstream, UsageRecord
from .prices import (
    PriceError,
    price_differs,
    price_history,
    price_is_current,
    price_routes,
    price_validate,
    price_version_save,
    prices_set_enabled,
    prices_with_state,
    series_of,
)
from .tiers import (
    TierError,
    agent_route_save,
    agent_route_validate,
    alias_save,
    alias_validate,
    fallback_save,
    fallback_validate,
    tier_delete,
)
from .upstreams import UpstreamError, key_status, upstream_save, upstream_test, upstream_validate

_PER_M = "USD per 1M tokens"


class ModelPriceForm(forms.ModelForm):
    # Fees are money (integer nanodollars in the table) but staff type dollars: parsed strictly,
    # at most 9 decimal places, never through a float.
    request_fee_usd = MoneyField(
        sign="non_negative",
        label="Request fee (USD)",
        initial=0,
        help_text="USD per request, before markup, e.g. 0.0005",
    )
    min_charge_usd = MoneyField(
        sign="non_negative",
        label="Minimum charge (USD)",
        initial=0,
        help_text="the least a request is charged, e.g. 0.000010",
    )
    overrun_cap_usd = MoneyField(
        sign="non_negative",
        required=False,
        label="Overrun cap (USD)",
        help_text="the most a request may settle above its hold; the rest is operator loss "
        "(blank: the HOLD_OVERRUN_CAP setting)",
    )
    priority = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=32767,
        initial=0,
        help_text="among the upstreams serving this model, lower is tried first (blank: unchanged, 0 when new)",
    )

    class Meta:
        model = ModelPrice
        fields = [
            "model",
            "upstream",
            "priority",
            "name",
            "enabled",
            "prompt",
            "completion",
            "reasoning",
            "cache_read",
            "cache_write",
            "markup",
            "default_max_output",
            "context_length",
            "image_tokens",
            "image_low_tokens",
            "audio_tokens",
            "file_tokens",
            "is_demo",
        ]
        labels = {
            "prompt": f"Prompt ({_PER_M})",
            "completion": f"Completion ({_PER_M})",
            "reasoning": f"Reasoning ({_PER_M})",
            "cache_read": f"Cache read ({_PER_M})",
            "cache_write": f"Cache write ({_PER_M})",
            "markup": "Markup override (fraction; blank = the MARKUP setting)",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["request_fee_usd"] = self.instance.request_fee
            self.initial["min_charge_usd"] = self.instance.min_charge
            self.initial["overrun_cap_usd"] = self.instance.overrun_cap

    def clean_priority(self):
        priority = self.cleaned_data.get("priority")
        return self.instance.priority if priority is None else priority

    def clean(self):
        cleaned = super().clean()
        for name in ("prompt", "completion", "reasoning", "cache_read", "cache_write", "markup"):
            if cleaned.get(name) is not None and cleaned[name] < 0:
                self.add_error(name, "must not be negative")
        if "request_fee_usd" in cleaned:
            self.instance.request_fee = cleaned["request_fee_usd"]
        if "min_charge_usd" in cleaned:
            self.instance.min_charge = cleaned["min_charge_usd"]
        if "overrun_cap_usd" in cleaned:
            self.instance.overrun_cap = cleaned["overrun_cap_usd"]
        model = cleaned.get("model")
        series = series_of(cleaned.get("upstream"))
        if not self.instance.pk and model and ModelPrice.objects.filter(series, model=model).exists():
            at = f"at {cleaned['upstream']}" if cleaned.get("upstream") else "at the default upstream"
            self.add_error("model", f"this model already has prices {at}: open its current version to change them")
        return cleaned

    def _post_clean(self):
        super()._post_clean()  # builds the instance from the form
        if not self.errors:
            try:
                price_validate(self.instance)
            except PriceError as exc:
                self.add_error(None, str(exc))


class VersionFilter(admin.SimpleListFilter):
    title = "version"
    parameter_name = "version"

    def lookups(self, request, model_admin):
        return [("current", "In force or scheduled"), ("superseded", "Superseded")]

    def queryset(self, request, queryset):
        if self.value() == "current":
            return queryset.filter(superseded=False)
        if self.value() == "superseded":
            return queryset.filter(superseded=True)
        return queryset


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    form = ModelPriceForm
    list_display = [
        "model",
        "upstream_shown",
        "priority",
        "name",
        "enabled",
        "prompt",
        "completion",
        "request_fee_usd",
        "markup_shown",
        "effective_from",
        "state",
        "source",
    ]
    list_filter = [VersionFilter, "enabled", "upstream", "is_demo", "source"]
    list_select_related = ["upstream"]
    search_fields = ["model", "name"]
    ordering = ["model", "-effective_from"]
    actions = ["enable_models", "disable_models"]
    readonly_fields = ["effective_from", "source", "routes", "version_history"]
    fieldsets = [
        (None, {"fields": ["model", "name", "enabled", "is_demo"]}),
        ("Served by", {"fields": ["upstream", "priority", "routes"]}),
        (
            f"Rates ({_PER_M}, before markup)",
            {"fields": ["prompt", "completion", "reasoning", "cache_read", "cache_write"]},
        ),
        ("Fees and markup", {"fields": ["request_fee_usd", "min_charge_usd", "markup"]}),
        ("Limits", {"fields": ["default_max_output", "context_length"]}),
        (
            "Honest holds",
            {
                "fields": ["image_tokens", "image_low_tokens", "audio_tokens", "file_tokens", "overrun_cap_usd"],
                "description": "What a hold assumes each non-text part of a prompt costs (blank: the HOLD_*_TOKENS "
                "settings), and how far a request may settle above its hold.",
            },
        ),
        ("Version", {"fields": ["effective_from", "source", "version_history"]}),
    ]

    def get_queryset(self, request):
        return prices_with_state(super().get_queryset(request))

    def get_readonly_fields(self, request, obj=None):
        # The model id and upstream name the series of versions; changing them on one version
        # would split history.
        if obj is not None:
            return ["model", "upstream", *self.readonly_fields]
        return self.readonly_fields

    def has_change_permission(self, request, obj=None):
        # A superseded version is history: viewable, never editable (editing it would silently
        # re-price the model from stale numbers).
        if obj is not None and not price_is_current(obj):
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        if change:
            stored = ModelPrice.objects.get(pk=obj.pk)
            if not price_differs(stored, obj):
                # Only availability changed (or nothing): a switch, not a price — see prices_set_enabled.
                if stored.enabled != obj.enabled:
                    prices_set_enabled(models=[obj.model], enabled=obj.enabled, upstream=obj.upstream)
                return
        price_version_save(price=obj, source="admin")
        if change:
            self.message_user(
                request, f"Saved as a new version of {obj.model}; the previous version is kept.", messages.INFO
            )

    @admin.display(description="upstream", ordering="upstream__name")
    def upstream_shown(self, obj):
        return obj.upstream_name

    @admin.display(description="upstreams serving this model, in the order they are tried")
    def routes(self, obj):
        if obj is None or not obj.pk:
            return "—"
        rows = format_html_join(
            "",
            '<tr{}><td>{}</td><td>{}</td><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>',
            (
                (
                    mark_safe(' style="font-weight:bold"') if route.pk == obj.pk else "",
                    route.priority,
                    route.upstream_name,
                    reverse("admin:proxy_modelprice_change", args=[route.pk]),
                    f"{route.effective_from:%Y-%m-%d %H:%M:%S}",
                    route.prompt,
                    route.completion,
                    "yes" if route.enabled and (route.upstream is None or route.upstream.enabled) else "no",
                )
                for route in price_routes(model=obj.model)
            ),
        )
        return format_html(
            "<table><thead><tr><th>priority</th><th>upstream</th><th>version in force</th><th>prompt</th>"
            "<th>completion</th><th>serving</th></tr></thead><tbody>{}</tbody></table>"
            "<p>Add a price for another upstream with <em>Add model price</em> (same model id, another "
            "upstream). A request goes to the first serving upstream whose circuit breaker is closed; "
            "on a failure before any output it moves to the next.</p>",
            rows,
        )

    @admin.display(description="request fee (USD)")
    def request_fee_usd(self, obj):
        return money_html(obj.request_fee)

    @admin.display(description="minimum charge (USD)")
    def min_charge_usd(self, obj):
        return money_html(obj.min_charge)

    @admin.display(description="markup")
    def markup_shown(self, obj):
        return obj.markup if obj.markup is not None else "default"

    @admin.display(description="state", ordering=F("superseded").asc())
    def state(self, obj):
        if obj.superseded:
            return "superseded"
        return "in force" if obj.effective_from <= timezone.now() else "scheduled"

    @admin.display(description="all versions of this model at this upstream, newest first")
    def version_history(self, obj):
        if obj is None or not obj.pk:
            return "—"
        rows = format_html_join(
            "",
            '<tr{}><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    mark_safe(' style="font-weight:bold"') if version.pk == obj.pk else "",
                    reverse("admin:proxy_modelprice_change", args=[version.pk]),
                    f"{version.effective_from:%Y-%m-%d %H:%M:%S}",
                    version.prompt,
                    version.completion,
                    version.reasoning,
                    version.cache_read,
                    money_html(version.request_fee),
                    version.markup if version.markup is not None else "default",
                    "yes" if version.enabled else "no",
                    version.source or "—",
                )
                for version in price_history(model=obj.model, upstream=obj.upstream_id)
            ),
        )
        return format_html(
            "<table><thead><tr><th>effective from (UTC)</th><th>prompt</th><th>completion</th><th>reasoning</th>"
            "<th>cache read</th><th>request fee</th><th>markup</th><th>enabled</th><th>source</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )

    @admin.action(description="Enable selected models (put on sale)")
    def enable_models(self, request, queryset):
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable selected models (take off sale)")
    def disable_models(self, request, queryset):
        self._set_enabled(request, queryset, False)

    def _set_enabled(self, request, queryset, enabled: bool):
        models = sorted(set(queryset.values_list("model", flat=True)))
        prices_set_enabled(models=models, enabled=enabled)
        verb = "enabled" if enabled else "disabled"
        self.message_user(request, f"{len(models)} model(s) {verb}: {', '.join(models)}", messages.SUCCESS)


class UpstreamForm(forms.ModelForm):
    # Write-only: the stored key is never put back into the page (render_value=False), and a
    # blank field on a change keeps it.
    api_key = forms.CharField(
        label="API key",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="stored encrypted and never shown again; leave blank to keep the stored key",
    )
    remove_api_key = forms.BooleanField(label="Remove the stored key", required=False)

    class Meta:
        model = Upstream
        fields = [
            "name",
            "kind",
            "base_url",
            "enabled",
            "ca_bundle",
            "connect_timeout",
            "read_timeout",
            "max_connections",
            "max_concurrency",
        ]
        widgets = {"ca_bundle": forms.Textarea(attrs={"rows": 4, "cols": 80})}

    def clean_base_url(self):
        # Before the model's URL validator, whose "Enter a valid URL." does not say what is wrong.
        url = self.cleaned_data["base_url"].strip().rstrip("/")
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https"):
            shown = f"{scheme}://" if scheme else "no scheme"
            raise forms.ValidationError(f"The base URL must start with http:// or https:// (this one has {shown}).")
        return url

    def _post_clean(self):
        super()._post_clean()  # builds the instance and runs the model's validators
        if self.errors:
            return
        try:
            upstream_validate(
                row=self.instance,
                api_key=self.cleaned_data.get("api_key") or "",
                remove_key=self.cleaned_data.get("remove_api_key", False),
            )
        except UpstreamError as exc:
            self.add_error(exc.field if exc.field in self.fields else None, str(exc))


@admin.register(Upstream)
class UpstreamAdmin(admin.ModelAdmin):
    form = UpstreamForm
    list_display = ["name", "kind", "base_url", "enabled", "key", "max_concurrency", "breaker"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "base_url"]
    actions = ["test_connection"]
    readonly_fields = ["key", "breaker", "created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["name", "kind", "base_url", "enabled"]}),
        ("API key", {"fields": ["key", "api_key", "remove_api_key"]}),
        (
            "Connection",
            {"fields": ["ca_bundle", "connect_timeout", "read_timeout", "max_connections", "max_concurrency"]},
        ),
        ("State", {"fields": ["breaker", "created_at", "updated_at"]}),
    ]

    def get_readonly_fields(self, request, obj=None):
        # Usage records name the upstream that served them: a rename would orphan them.
        if obj is not None:
            return ["name", *self.readonly_fields]
        return self.readonly_fields

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        upstream_save(
            row=obj,
            api_key=form.cleaned_data.get("api_key") or "",
            remove_key=form.cleaned_data.get("remove_api_key", False),
        )

    @admin.display(description="API key")
    def key(self, obj):
        return key_status(obj) if obj is not None and obj.pk else "not set"

    @admin.display(description="circuit breaker (this process)")
    def breaker(self, obj):
        if obj is None or not obj.pk:
            return "—"
        state = routing.breaker(obj.name).snapshot()
        if state.state == "open":
            return f"open, probe in {state.retry_in:.0f} s ({state.failures} failures in a row)"
        return state.state.replace("_", "-") + (f" ({state.failures} failures in a row)" if state.failures else "")

    @admin.action(description="Test connection (GET /models with the stored key)")
    def test_connection(self, request, queryset):
        for row in queryset:
            result = upstream_test(upstream.config_of(row))
            level = messages.SUCCESS if result.ok else messages.ERROR
            self.message_user(request, f"Test connection to {row.name}: {result.message}", level)


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = [
        "created_at",
        "user",
        "model",
        "served_model",
        "fallback",
        "upstream",
        "status",
        "tokens",
        "charge_usd",
        "operator_loss_usd",
        "estimated",
    ]
    list_filter = ["status", "model", "served_model", "fallback", "upstream", "estimated", "stream"]
    search_fields = ["request_id", "user__email", "generation_id"]
    list_select_related = ["user"]
    date_hierarchy = "created_at"
    show_full_result_count = False  # COUNT(*) over a large usage table on every page is not free

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="tokens (prompt / completion)")
    def tokens(self, obj):
        return f"{obj.prompt_tokens} / {obj.completion_tokens}"

    @admin.display(description="charge (USD)", ordering="charge")
    def charge_usd(self, obj):
        return money_html(obj.charge)

    @admin.display(description="operator loss (USD)", ordering="operator_loss")
    def operator_loss_usd(self, obj):
        return money_html(obj.operator_loss) if obj.operator_loss else "—"


# --- model aliases, fallbacks and agent routes (proxy.tiers) -----------------------------------


class TierForm(forms.ModelForm):
    """Runs ``validate`` (``proxy.tiers``) on the built instance and shows its error on the field."""

    validate = None

    def _post_clean(self):
        super()._post_clean()
        if self.errors:
            return
        try:
            type(self).validate(self.instance)
        except TierError as exc:
            self.add_error(exc.field if exc.field in self.fields else None, str(exc))


_BELOW_HELP = (
    "USD: with fallback allowed, a wallet whose available balance is under this is served by the "
    "fallback even when it could afford the model (blank: only when it cannot)"
)


class ModelAliasForm(TierForm):
    validate = alias_validate
    fallback_below = MoneyField(
        sign="non_negative", required=False, label="Fall back below (USD)", help_text=_BELOW_HELP
    )

    class Meta:
        model = ModelAlias
        fields = ["name", "model", "description", "fallback", "fallback_below"]


class ModelFallbackForm(TierForm):
    validate = fallback_validate
    fallback_below = MoneyField(
        sign="non_negative", required=False, label="Fall back below (USD)", help_text=_BELOW_HELP
    )

    class Meta:
        model = ModelFallback
        fields = ["model", "fallback", "fallback_below"]


class AgentRouteForm(TierForm):
    validate = agent_route_validate

    class Meta:
        model = AgentRoute
        fields = ["agent", "alias"]


class TierAdmin(admin.ModelAdmin):
    """Saved and deleted through ``proxy.tiers``, which drops the proxy's cache on commit."""

    save = None

    def save_model(self, request, obj, form, change):
        type(self).save(row=obj)

    def delete_model(self, request, obj):
        tier_delete(row=obj)

    def delete_queryset(self, request, queryset):
        for row in queryset:
            tier_delete(row=row)

    @admin.display(description="fall back below")
    def fallback_below_usd(self, obj):
        return money_html(obj.fallback_below) if obj.fallback_below is not None else "—"


@admin.register(ModelAlias)
class ModelAliasAdmin(TierAdmin):
    form = ModelAliasForm
    save = alias_save
    list_display = ["name", "model", "fallback", "fallback_below_usd", "description", "updated_at"]
    search_fields = ["name", "model"]


@admin.register(ModelFallback)
class ModelFallbackAdmin(TierAdmin):
    form = ModelFallbackForm
    save = fallback_save
    list_display = ["model", "fallback", "fallback_below_usd"]
    search_fields = ["model", "fallback"]


@admin.register(AgentRoute)
class AgentRouteAdmin(TierAdmin):
    form = AgentRouteForm
    save = agent_route_save
    list_display = ["agent", "alias", "updated_at"]
    search_fields = ["agent", "alias__name"]
