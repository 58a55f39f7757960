"""Staff views of money in. Amounts are shown in dollars; pack prices are edited in dollars."""

from django import forms
from django.contrib import admin, messages
from django.utils.html import format_html
from django.utils.text import Truncator

from infra.forms import MoneyField
from infra.money_html import money_html

from .models import Checkout, CreditPack, EventStatus, Payment, StaffAlert, Subscription, WebhookEvent
from .services import PaymentsError, payment_flagged_credit, staff_alert_resolve, webhook_event_replay


def _usd_column(field: str, label: str):
    @admin.display(description=label, ordering=field)
    def column(obj):
        return money_html(getattr(obj, field))

    return column


class CreditPackForm(forms.ModelForm):
    price_usd = MoneyField(label="Price (USD)", help_text="What the buyer pays, e.g. 10.00")
    credit_usd = MoneyField(label="Credit (USD)", help_text="What lands in the wallet, bonus included")

    class Meta:
        model = CreditPack
        fields = [
            "slug",
            "name",
            "currency",
            "recurring",
            "lemonsqueezy_variant_id",
            "stripe_price_id",
            "active",
            "sort_order",
        ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["price_usd"].initial = self.instance.price
            self.fields["credit_usd"].initial = self.instance.credit

    def save(self, commit=True):
        self.instance.price = self.cleaned_data["price_usd"]
        self.instance.credit = self.cleaned_data["credit_usd"]
        return super().save(commit=commit)


@admin.register(CreditPack)
class CreditPackAdmin(admin.ModelAdmin):
    form = CreditPackForm
    list_display = [
        "name",
        "slug",
        _usd_column("price", "price"),
        _usd_column("credit", "credit"),
        "recurring",
        "lemonsqueezy_variant_id",
        "stripe_price_id",
        "active",
        "sort_order",
    ]
    list_editable = ["lemonsqueezy_variant_id", "stripe_price_id", "active", "sort_order"]


@admin.register(Checkout)
class CheckoutAdmin(admin.ModelAdmin):
    list_display = ["public_id", "user", "pack", "provider", "status", "created_at"]
    list_filter = ["provider", "status"]
    search_fields = ["public_id", "provider_checkout_id", "user__email"]
    readonly_fields = [f.name for f in Checkout._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(Payment)
class PaymentAdmin(admin.ModelAdmin):
    list_display = [
        "provider_payment_id",
        "provider",
        "user",
        "pack",
        _usd_column("gross", "gross"),
        _usd_column("fee", "fee"),
        _usd_column("net", "net"),
        _usd_column("refunded_amount", "refunded"),
        _usd_column("credit", "credited"),
        "status",
        "test_mode",
        "created_at",
    ]
    list_filter = ["provider", "status", "test_mode"]
    search_fields = ["provider_payment_id", "payment_intent", "user__email"]
    readonly_fields = [f.name for f in Payment._meta.fields]
    actions = ["credit_flagged"]

    @admin.action(description="Credit the pack for selected flagged payments", permissions=["change"])
    def credit_flagged(self, request, queryset):
        credited = 0
        for payment in queryset.order_by("id"):
            try:
                payment_flagged_credit(payment=payment, staff_user=request.user)
            except PaymentsError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                credited += 1
        if credited:
            self.message_user(request, f"Credited {credited} flagged payment(s).", messages.SUCCESS)

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Subscription)
class SubscriptionAdmin(admin.ModelAdmin):
    list_display = ["provider_subscription_id", "provider", "user", "pack", _usd_column("credit", "credit"), "status"]
    list_filter = ["provider", "status"]
    search_fields = ["provider_subscription_id", "user__email"]
    readonly_fields = [f.name for f in Subscription._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(WebhookEvent)
class WebhookEventAdmin(admin.ModelAdmin):
    list_display = [
        "event_id",
        "provider",
        "event_type",
        "status",
        "short_error",
        "attempts",
        "test_mode",
        "created_at",
    ]
    list_filter = ["status", "provider", "event_type", "test_mode"]
    search_fields = ["event_id", "waiting_for"]
    readonly_fields = [f.name for f in WebhookEvent._meta.fields if f.name != "body"] + ["raw_body"]
    exclude = ["body"]
    actions = ["replay"]

    @admin.display(description="error / note")
    def short_error(self, obj):
        # Why a rejected body could not be read, why a failed one failed, or what processing noted.
        return Truncator(obj.error).chars(120)

    @admin.display(description="raw body")
    def raw_body(self, obj):
        return format_html("<pre style='white-space: pre-wrap'>{}</pre>", obj.body)

    @admin.action(description="Replay selected failed or waiting events")
    def replay(self, request, queryset):
        done = failed = skipped = 0
        for event in queryset.order_by("id"):
            if event.status not in {EventStatus.FAILED, EventStatus.PENDING, EventStatus.RECEIVED}:
                skipped += 1
                continue
            result = webhook_event_replay(event=event)
            if result.ok:
                done += 1
            else:
                failed += 1
        if done:
            self.message_user(request, f"Replayed {done} event(s).", messages.SUCCESS)
        if failed:
            self.message_user(request, f"{failed} event(s) failed again; see their error.", messages.ERROR)
        if skipped:
            self.message_user(
                request, f"Skipped {skipped} event(s) already processed, ignored or rejected.", messages.WARNING
            )

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(StaffAlert)
class StaffAlertAdmin(admin.ModelAdmin):
    list_display = ["created_at", "kind", "message", "payment", "event", "resolved"]
    list_filter = ["resolved", "kind"]
    readonly_fields = [f.name for f in StaffAlert._meta.fields]
    actions = ["resolve"]

    @admin.action(description="Mark selected alerts resolved")
    def resolve(self, request, queryset):
        count = 0
        for alert in queryset.filter(resolved=False):
            staff_alert_resolve(alert=alert)
            count += 1
        self.message_user(request, f"Resolved {count} alert(s).", messages.SUCCESS)

    def has_add_permission(self, request):
        return False
