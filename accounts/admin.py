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
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse
from django.urls import path, reverse

from infra.money_html import money_html
from wallet import events
from wallet.services import wallet_get_or_create

from .forms import StaffLoginForm
from .limits import limits_clean, user_limits_clean
from .models import ApiKey, Scope, TokenFamily, User
from .services import OperatorKeyRefused, api_key_revoke, operator_key_create, token_family_revoke

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
        help_texts = {
            "limits": 'JSON: {"daily_spend": "5.00", "monthly_spend": "50.00", "rpm": 60, "max_parallel": 4, '
            '"tpm": 100000, "tpd": 2000000}; leave a limit out (or null) for none. Counts across all the '
            "user's keys and sign-ins; the user's own budget can only be tighter.",
        }

    def clean_limits(self):
        return user_limits_clean(self.cleaned_data.get("limits"))


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    form = UserEditForm
    add_form = UserAddForm
    list_display = ("email", "is_staff", "is_active", "date_joined", "balance")
    list_filter = ("is_staff", "is_superuser", "is_active")
    list_select_related = ("wallet",)
    search_fields = ("email",)
    ordering = ("email",)
    readonly_fields = ("balance", "last_login", "date_joined", "own_limits")
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        ("Wallet", {"fields": ("balance",)}),
        ("Limits", {"fields": ("limits", "own_limits")}),
        ("Permissions", {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")}),
        ("Dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = ((None, {"classes": ("wide",), "fields": ("email", "usable_password", "password1", "password2")}),)

    @admin.display(description="balance (USD)", ordering="wallet__balance")
    def balance(self, user):
        wallet = getattr(user, "wallet", None)
        return money_html(wallet.balance) if wallet is not None else "—"

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
    # The ``admin`` scope is not offered: an operator key is minted whole by a superuser ("Mint
    # an operator key"), never made by ticking a box on some existing key.
    scopes = forms.MultipleChoiceField(
        choices=[choice for choice in Scope.choices if choice[0] != Scope.ADMIN],
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="proxy: call /v1 as the key's owner. billing: charge or credit *other* users — grant it "
        "only to your own server-side integrations.",
    )

    class Meta:
        model = ApiKey
        fields = ("name", "scopes", "limits", "expires_at")

    def clean_scopes(self):
        scopes = list(self.cleaned_data.get("scopes") or [])
        if self.instance.pk is not None and self.instance.has_scope(Scope.ADMIN):
            return [Scope.ADMIN]  # an operator key stays one, with nothing added
        return scopes

    def clean_limits(self):
        return limits_clean(self.cleaned_data.get("limits"))


class OperatorKeyForm(forms.Form):
    user = forms.ModelChoiceField(
        queryset=User.objects.filter(is_staff=True, is_active=True).order_by("email"),
        help_text="the staff member who will use it; every call is audited under their name",
    )
    name = forms.CharField(max_length=100, help_text='what it is for, e.g. "billing back office"')
    expires_at = forms.DateTimeField(required=False, help_text="optional; YYYY-MM-DD HH:MM:SS (UTC)")


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
    change_list_template = "admin/accounts/apikey/change_list.html"

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

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "can_mint_operator_key": request.user.is_superuser}
        return super().changelist_view(request, extra_context)

    def get_urls(self):
        mint = self.admin_site.admin_view(self.mint_operator_key_view)
        return [path("mint-operator-key/", mint, name="accounts_apikey_mint_operator"), *super().get_urls()]

    def mint_operator_key_view(self, request):
        """A superuser mints an operator key for a staff user; its secret is shown once, here."""
        if not request.user.is_superuser:
            raise PermissionDenied
        form = OperatorKeyForm(request.POST or None)
        context = {**self.admin_site.each_context(request), "opts": self.opts, "title": "Mint an operator key"}
        if request.method == "POST" and form.is_valid():
            try:
                key, secret = operator_key_create(
                    user=form.cleaned_data["user"],
                    name=form.cleaned_data["name"],
                    expires_at=form.cleaned_data["expires_at"],
                    minted_by=request.user,
                )
            except OperatorKeyRefused as exc:
                form.add_error(None, str(exc))
            else:
                self.log_addition(request, key, f"Minted operator key {key.prefix}… for {key.user}")
                change_url = reverse("admin:accounts_apikey_changelist")
                context.update({"key": key, "secret": secret, "change_url": change_url})
                return TemplateResponse(request, "admin/accounts/apikey/operator_key_minted.html", context)
        context["form"] = form
        return TemplateResponse(request, "admin/accounts/apikey/mint_operator_key.html", context)


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
