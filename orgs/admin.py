"""Organizations in the admin: read-mostly for staff (members and their limits change through the
portal and /api/orgs, where the role rules live); invitation tokens are never shown (only their
hashes exist)."""

from django.contrib import admin

from .models import Invitation, Membership, Organization


class MembershipInline(admin.TabularInline):
    model = Membership
    fields = readonly_fields = ("user", "role", "daily_spend", "monthly_spend", "allowed_models", "created_at")
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "is_active", "created_at"]
    list_filter = ["is_active"]
    search_fields = ["name", "slug", "memberships__user__email"]
    readonly_fields = ["slug", "created_at"]
    inlines = [MembershipInline]

    def has_add_permission(self, request):
        return False  # an organization is created by its owner (portal or /api/orgs)

    def has_delete_permission(self, request, obj=None):
        return False  # its wallet and ledger are kept


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    list_display = ["email", "organization", "role", "created_at", "expires_at", "accepted_at", "revoked_at"]
    list_select_related = ["organization"]
    search_fields = ["email", "organization__name"]
    exclude = ["token_hash"]
    readonly_fields = [
        "organization",
        "email",
        "role",
        "created_by",
        "created_at",
        "expires_at",
        "accepted_at",
        "accepted_by",
    ]

    def has_add_permission(self, request):
        return False
