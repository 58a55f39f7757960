"""Staff views of users, API keys and desktop logins.

Secrets never appear here: an API key shows its prefix only (the hash is not even a form field),
and refresh tokens are not registered at all. Keys cannot be added in the admin — the secret must
reach only its owner, through the portal or the API — and are revoked, never deleted, because
usage records point at them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm, UserChangeForm

from core.money import format_usd
from wallet import events
from wallet.services import wallet_get_or_create

from .forms import StaffLoginForm
from .models import ApiKey, Scope, TokenFamily, User
from .serializers import limits_clean
from .services import api_key_revoke, token_family_revoke

# Staff sign-in counts failures in the same buckets as /login and /api/auth/token, and is refused
# alike while throttled (the admin's own page and look; see accounts.views.staff_login).
admin.site.login_form = StaffLoginForm


# The mixin's method runs on the user form it is mixed into; at run time it adds no base.
if TYPE_CHECKING:
    _UserFormBase = forms.ModelForm
else:
    _UserFormBase = object


class _EmailCleaning(_UserFormBase):
    def clean_email(self):
        email = User.objects.normalize_email(self.cleaned_data["email"]).lower()
        others = User.objects.filter(email__iexact=email).exclude(pk=self.instance.pk)
        if others.exists():
            raise forms.ValidationError("A user with this email address already exists.")
        return email


class UserAddForm(_EmailCleaning, AdminUserCreationForm):
    class Meta:
        model = User
        fields = ("email",)
        field_classes: dict = {}


class UserEditForm(_EmailCleaning, UserChangeForm):
    class Meta:
        model = User
        fields = "__all__"
        field_classes: dict = {}


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    form = UserEditForm
    add_form = UserAddForm
    list_display = ("email", "is_staff", "is_active", "date_joined", "balance")
    list_filter = ("is_staff", "is_superuser", "is_active")
    list_select_related = ("wallet",)
    search_fields = ("email",)
    ordering = ("email",)
    readonly_fields = ("balance", "last_login", "date_joined")
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        ("Wallet", {"fields": ("balance",)}),
        ("Permissions", {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")}),
        ("Dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = ((None, {"classes": ("wide",), "fields": ("email", "usable_password", "password1", "password2")}),)

    @admin.display(description="balance (USD)", ordering="wallet__balance")
    def balance(self, user):
        wallet = getattr(user, "wallet", None)
        return format_usd(wallet.balance) if wallet is not None else "—"

    def save_model(self, request, obj, form, change):
        # Every user has a wallet: sign-up creates it in user_signup, and a user added here gets
        # it in the same transaction as the user row (the admin's change view runs in one).
        super().save_model(request, obj, form, change)
        wallet_get_or_create(user=obj)
        if change and "is_active" in form.changed_data and not obj.is_active:
            # A disabled account's credentials all stop working (accounts.auth); its open
            # /ws/events sockets close as soon as this commits.
            events.publish_revocation_on_commit(obj.pk, None)


class ApiKeyForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=Scope.choices,
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="proxy: call /v1 as the key's owner. billing: charge or credit *other* users — grant it "
        "only to your own server-side integrations.",
    )

    class Meta:
        model = ApiKey
        fields = ("name", "scopes", "limits", "expires_at")

    def clean_limits(self):
        return limits_clean(self.cleaned_data.get("limits"))


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ("name", "prefix", "user", "scope_list", "created_at", "last_used_at", "expires_at", "is_revoked")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), "created_at")
    list_select_related = ("user",)
    search_fields = ("name", "prefix", "user__email")
    readonly_fields = ("user", "prefix", "created_at", "last_used_at", "revoked_at")
    fields = ("user", "name", "prefix", "scopes", "limits", "expires_at", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke"]

    @admin.display(description="scopes")
    def scope_list(self, key):
        return ", ".join(key.scopes or []) or "—"

    @admin.display(boolean=True, description="revoked", ordering="revoked_at")
    def is_revoked(self, key):
        return key.revoked

    @admin.action(description="Revoke selected API keys")
    def revoke(self, request, queryset):
        keys = [key for key in queryset if not key.revoked]
        for key in keys:
            api_key_revoke(key=key)
        self.message_user(request, f"Revoked {len(keys)} API key(s).", messages.SUCCESS)

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(TokenFamily)
class TokenFamilyAdmin(admin.ModelAdmin):
    """One row per desktop login. Read-only; staff can end a login with the revoke action."""

    list_display = ("id", "name", "user", "created_at", "last_used_at", "revoked_at", "revoked_reason")
    list_filter = ("revoked_reason",)
    list_select_related = ("user",)
    search_fields = ("user__email",)
    actions = ["revoke"]

    @admin.action(description="Revoke selected logins (their tokens stop working)")
    def revoke(self, request, queryset):
        families = [family for family in queryset if family.revoked_at is None]
        for family in families:
            token_family_revoke(family=family, reason="staff")
        self.message_user(request, f"Revoked {len(families)} login(s).", messages.SUCCESS)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
