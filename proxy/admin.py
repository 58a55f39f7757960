"""Staff screens for the price table and the usage log.

Prices: saving a changed price inserts a new version (``proxy.prices.price_version_save``); the
row that was opened, and every usage record charged with it, stay as they were. Superseded
versions are shown read-only with the model's whole history on each page. Nothing is deletable:
a price row is part of how past charges are explained. Usage records are read-only evidence.
"""

from django import forms
from django.contrib import admin, messages
from django.db.models import F
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from core.money import format_usd
from infra.forms import MoneyField

from .models import ModelPrice, UsageRecord
from .prices import (
    PriceError,
    price_differs,
    price_history,
    price_is_current,
    price_validate,
    price_version_save,
    prices_set_enabled,
    prices_with_state,
)

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

    class Meta:
        model = ModelPrice
        fields = [
            "model",
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

    def clean(self):
        cleaned = super().clean()
        for name in ("prompt", "completion", "reasoning", "cache_read", "cache_write", "markup"):
            if cleaned.get(name) is not None and cleaned[name] < 0:
                self.add_error(name, "must not be negative")
        if "request_fee_usd" in cleaned:
            self.instance.request_fee = cleaned["request_fee_usd"]
        if "min_charge_usd" in cleaned:
            self.instance.min_charge = cleaned["min_charge_usd"]
        model = cleaned.get("model")
        if not self.instance.pk and model and ModelPrice.objects.filter(model=model).exists():
            self.add_error("model", "this model already has prices: open its current version to change them")
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
    list_filter = [VersionFilter, "enabled", "is_demo", "source"]
    search_fields = ["model", "name"]
    ordering = ["model", "-effective_from"]
    actions = ["enable_models", "disable_models"]
    readonly_fields = ["effective_from", "source", "version_history"]
    fieldsets = [
        (None, {"fields": ["model", "name", "enabled", "is_demo"]}),
        (
            f"Rates ({_PER_M}, before markup)",
            {"fields": ["prompt", "completion", "reasoning", "cache_read", "cache_write"]},
        ),
        ("Fees and markup", {"fields": ["request_fee_usd", "min_charge_usd", "markup"]}),
        ("Limits", {"fields": ["default_max_output", "context_length"]}),
        ("Version", {"fields": ["effective_from", "source", "version_history"]}),
    ]

    def get_queryset(self, request):
        return prices_with_state(super().get_queryset(request))

    def get_readonly_fields(self, request, obj=None):
        # The model id names the series of versions; renaming one version would split history.
        if obj is not None:
            return ["model", *self.readonly_fields]
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
                    prices_set_enabled(models=[obj.model], enabled=obj.enabled)
                return
        price_version_save(price=obj, source="admin")
        if change:
            self.message_user(
                request, f"Saved as a new version of {obj.model}; the previous version is kept.", messages.INFO
            )

    @admin.display(description="request fee (USD)")
    def request_fee_usd(self, obj):
        return format_usd(obj.request_fee)

    @admin.display(description="minimum charge (USD)")
    def min_charge_usd(self, obj):
        return format_usd(obj.min_charge)

    @admin.display(description="markup")
    def markup_shown(self, obj):
        return obj.markup if obj.markup is not None else "default"

    @admin.display(description="state", ordering=F("superseded").asc())
    def state(self, obj):
        if obj.superseded:
            return "superseded"
        return "in force" if obj.effective_from <= timezone.now() else "scheduled"

    @admin.display(description="all versions of this model, newest first")
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
                    format_usd(version.request_fee),
                    version.markup if version.markup is not None else "default",
                    "yes" if version.enabled else "no",
                    version.source or "—",
                )
                for version in price_history(model=obj.model)
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


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = ["created_at", "user", "model", "status", "tokens", "charge_usd", "estimated"]
    list_filter = ["status", "model", "estimated", "stream"]
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
        return format_usd(obj.charge)
