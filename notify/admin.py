"""Staff views of outbound webhooks: endpoints, their delivery log, the outbox, and alerts.

An endpoint's signing secret is shown exactly once — in the response to creating the endpoint or
to regenerating its secret (``no-store``), never on its page, in a list or in a log.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, Q
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from .models import SUBSCRIBABLE, Alert, Attempt, Delivery, DeliveryStatus, Endpoint, Event
from .services import (
    alert_resolve,
    delivery_replay,
    endpoint_enable,
    endpoint_secret_regenerate,
    endpoint_send_test,
    event_types_clean,
)


class EndpointForm(forms.ModelForm):
    event_types = forms.MultipleChoiceField(
        choices=SUBSCRIBABLE, widget=forms.CheckboxSelectMultiple, help_text="The events this endpoint receives."
    )

    class Meta:
        model = Endpoint
        fields = ["url", "description", "event_types", "enabled"]
        help_texts = {"url": "The receiver's full http:// or https:// address; each event is POSTed there, signed."}

    def clean_event_types(self):
        try:
            return event_types_clean(self.cleaned_data["event_types"])
        except ValidationError as exc:
            raise forms.ValidationError(exc.messages) from None


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin):
    form = EndpointForm
    list_display = ["url", "enabled", "types", "failing_since", "pending", "failed", "log"]
    list_filter = ["enabled"]
    search_fields = ["url", "description"]
    readonly_fields = ["failing_since", "disabled_reason", "created_at"]
    actions = ["send_test_event", "enable"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                pending_count=Count("deliveries", filter=Q(deliveries__status=DeliveryStatus.PENDING)),
                failed_count=Count("deliveries", filter=Q(deliveries__status=DeliveryStatus.FAILED)),
            )
        )

    @admin.display(description="events")
    def types(self, obj):
        return ", ".join(obj.event_types or [])

    @admin.display(description="pending", ordering="pending_count")
    def pending(self, obj):
        return obj.pending_count

    @admin.display(description="failed", ordering="failed_count")
    def failed(self, obj):
        return obj.failed_count

    @admin.display(description="delivery log")
    def log(self, obj):
        url = reverse("admin:notify_delivery_changelist") + f"?endpoint__id__exact={obj.pk}"
        return format_html('<a href="{}">deliveries</a>', url)

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path("<int:endpoint_id>/secret/", view(self.regenerate_secret_view), name="notify_endpoint_secret"),
            path("<int:endpoint_id>/test/", view(self.send_test_view), name="notify_endpoint_test"),
            *super().get_urls(),
        ]

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), "can_change": self.has_change_permission(request)}
        return super().change_view(request, object_id, form_url, extra_context)

    def response_add(self, request, obj, post_url_continue=None):
        # The one place the new secret is ever shown: in this response, never stored elsewhere.
        return self._secret_page(request, obj, created=True)

    def _secret_page(self, request, endpoint: Endpoint, *, created: bool):
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "endpoint": endpoint,
            "secret": endpoint.secret,
            "created": created,
            "title": "Signing secret",
        }
        response = TemplateResponse(request, "admin/notify/endpoint/secret.html", context)
        response["Cache-Control"] = "no-store"
        return response

    def regenerate_secret_view(self, request, endpoint_id: int):
        if request.method != "POST":
            return redirect("admin:notify_endpoint_change", endpoint_id)
        if not self.has_change_permission(request):
            raise PermissionDenied
        endpoint = endpoint_secret_regenerate(endpoint=get_object_or_404(Endpoint, pk=endpoint_id))
        return self._secret_page(request, endpoint, created=False)

    def send_test_view(self, request, endpoint_id: int):
        if request.method != "POST":
            return redirect("admin:notify_endpoint_change", endpoint_id)
        if not self.has_change_permission(request):
            raise PermissionDenied
        delivery = endpoint_send_test(endpoint=get_object_or_404(Endpoint, pk=endpoint_id))
        messages.success(request, f"Test event {delivery.event_id} queued; the worker delivers it.")
        return redirect(reverse("admin:notify_delivery_changelist") + f"?endpoint__id__exact={endpoint_id}")

    @admin.action(description="Send a test event", permissions=["change"])
    def send_test_event(self, request, queryset):
        for endpoint in queryset:
            endpoint_send_test(endpoint=endpoint)
        self.message_user(request, f"Queued a test event for {queryset.count()} endpoint(s).")

    @admin.action(description="Enable (and forget the failure streak)", permissions=["change"])
    def enable(self, request, queryset):
        for endpoint in queryset:
            endpoint_enable(endpoint=endpoint)
        self.message_user(request, f"Enabled {queryset.count()} endpoint(s).")


class AttemptInline(admin.TabularInline):
    model = Attempt
    fields = readonly_fields = ("started_at", "ok", "status_code", "latency_ms", "error")
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = [
        "event_type",
        "event_id",
        "target",
        "status",
        "last_status_code",
        "last_latency_ms",
        "attempts",
        "next_attempt_at",
        "created_at",
    ]
    list_filter = ["status", "channel", "endpoint", "event__type"]
    search_fields = ["event__id"]
    list_select_related = ["event", "endpoint"]
    readonly_fields = [
        "event",
        "channel",
        "endpoint",
        "status",
        "attempts",
        "next_attempt_at",
        "lease_until",
        "last_status_code",
        "last_error",
        "last_latency_ms",
        "created_at",
        "finished_at",
        "body",
    ]
    exclude = ["lease_token"]
    inlines = [AttemptInline]
    actions = ["replay"]

    @admin.display(description="event", ordering="event__type")
    def event_type(self, obj):
        return obj.event.type

    @admin.display(description="to")
    def target(self, obj):
        return obj.endpoint.url if obj.endpoint_id else "email"

    @admin.display(description="body sent")
    def body(self, obj):
        return format_html("<pre>{}</pre>", obj.event.body)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False  # a log: read, and replayed through the action

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.action(description="Replay (send again, same event id)", permissions=["replay"])
    def replay(self, request, queryset):
        replayed = sum(delivery_replay(delivery=delivery) for delivery in queryset)
        skipped = queryset.count() - replayed
        note = f" {skipped} still pending were left to the worker." if skipped else ""
        self.message_user(request, f"Queued {replayed} delivery(ies) again.{note}")

    def has_replay_permission(self, request):
        return request.user.has_perm("notify.change_endpoint")


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["id", "type", "user", "created_at", "dispatched_at"]
    list_filter = ["type"]
    search_fields = ["id", "user__email"]
    list_select_related = ["user"]
    readonly_fields = ["id", "type", "user", "data", "dedup_key", "created_at", "dispatched_at", "body"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ["kind", "message", "endpoint", "created_at", "resolved"]
    list_filter = ["resolved", "kind"]
    readonly_fields = ["kind", "message", "endpoint", "created_at", "resolved"]
    actions = ["resolve"]

    def has_add_permission(self, request):
        return False

    @admin.action(description="Mark resolved", permissions=["change"])
    def resolve(self, request, queryset):
        for alert in queryset:
            alert_resolve(alert=alert)
        self.message_user(request, "Resolved.")
