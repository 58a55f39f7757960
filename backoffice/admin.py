"""The operator audit log in the admin: read-only (no add, change or delete — the database
refuses them too, migration 0002), searchable by who, what and target."""

from django.contrib import admin

from .models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ("created_at", "actor_email", "key_prefix", "method", "path", "status_code", "outcome", "detail")
    list_filter = ("outcome", "operation", "method", "created_at")
    search_fields = ("actor_email", "key_prefix", "path", "target", "idempotency_key")
    date_hierarchy = "created_at"
    fields = (
        "created_at",
        "actor",
        "actor_email",
        "api_key",
        "key_prefix",
        "method",
        "path",
        "operation",
        "target",
        "request_data",
        "idempotency_key",
        "status_code",
        "outcome",
        "detail",
    )
    readonly_fields = fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
