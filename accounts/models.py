"""Accounts: users who log in by email, their API keys, and desktop token families.

Secrets are never stored: an API key is kept as a short lookup prefix plus the SHA-256 of the
whole key (the key is 256 random bits, so a fast hash is enough and keeps the proxy hot path
cheap); a refresh token likewise. Access tokens are signed, short-lived and name their family,
so revoking a family (logout, refresh-token reuse) also ends its access tokens.

Browser sign-in for apps (RFC 8628's device flow) and one-time web links follow the same rule:
a ``DeviceAuthorization`` keeps only the hashes of its device code and user code, a ``WebLink``
only the hash of its token, and each is used at most once — decided by one conditional UPDATE.
"""

import uuid
from typing import ClassVar

from django.contrib.auth.base_user import AbstractBaseUser, BaseUserManager
from django.contrib.auth.models import PermissionsMixin
from django.db import models
from django.utils import timezone


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def _create_user(self, email, password, **extra):
        if not email:
            raise ValueError("An email address is required")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_user(self, email, password=None, **extra):
        extra.setdefault("is_staff", False)
        extra.setdefault("is_superuser", False)
        return self._create_user(email, password, **extra)

    def create_superuser(self, email, password=None, **extra):
        extra.setdefault("is_staff", True)
        extra.setdefault("is_superuser", True)
        return self._create_user(email, password, **extra)


class User(AbstractBaseUser, PermissionsMixin):
    email = models.EmailField(unique=True)
    is_active = models.BooleanField(default=True)
    is_staff = models.BooleanField(default=False)
    date_joined = models.DateTimeField(default=timezone.now)
    # Limits on everything the user does, whichever key or sign-in they use (accounts.limits):
    # ``limits`` set by staff in the admin, ``own_limits`` the user's own budget (portal, API),
    # which can only tighten. Both {"daily_spend": "5.000000000"|None, "monthly_spend": …,
    # "rpm": int|None, "max_parallel": int|None, "tpm": int|None, "tpd": int|None}; {} for none.
    limits = models.JSONField(default=dict, blank=True, help_text="set by staff")
    own_limits = models.JSONField(default=dict, blank=True, help_text="the user's own budget; only tightens")

    objects = UserManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: ClassVar[list[str]] = []

    def __str__(self):
        return self.email


class Scope(models.TextChoices):
    PROXY = "proxy", "Proxy (call /v1 as this user)"
    BILLING = "billing", "Billing (charge or credit other users)"
    # The operator API (/api/admin/…). Minted only by a superuser, for a staff user, in the admin
    # (``accounts.services.operator_key_create``); a key with it works nowhere else.
    ADMIN = "admin", "Operator API (staff only)"


def default_scopes():
    return [Scope.PROXY]


def default_limits():
    return {
        "rpm": None,
        "daily_spend": None,
        "monthly_spend": None,
        "allowed_models": None,
        "run_max_steps": None,
        "run_max_spend": None,
        "max_parallel": None,
        "tpm": None,
        "tpd": None,
    }


class ApiKey(models.Model):
    PREFIX_LENGTH = 12  # "tt_" + 9 characters: unique lookup, reveals nothing useful

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_keys")
    # An organization's key (made by one of its owners or admins, ``user``) always bills the
    # organization's wallet; None: the user's own key.
    organization = models.ForeignKey(
        "orgs.Organization", null=True, blank=True, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=PREFIX_LENGTH, unique=True)
    key_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=default_scopes)
    # {"rpm": int|None, "daily_spend": "1.000000000"|None, "monthly_spend": ..., "allowed_models": [..]|None,
    #  "run_max_steps": int|None, "run_max_spend": "0.500000000"|None, "max_parallel": int|None,
    #  "tpm": int|None, "tpd": int|None} — validated by accounts.limits
    limits = models.JSONField(default=default_limits)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API key"

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def has_scope(self, scope: str) -> bool:
        return scope in (self.scopes or [])


DEFAULT_SESSION_NAME = "API sign-in"


class TokenFamily(models.Model):
    """One login on one device: every refresh token rotated from it shares the family."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="token_families")
    # What the user sees in "Signed-in apps": the device flow's client_name, or DEFAULT_SESSION_NAME.
    name = models.CharField(max_length=100, default=DEFAULT_SESSION_NAME)
    created_at = models.DateTimeField(default=timezone.now)
    # Written at sign-in and when a refresh token is used, not on every request: a write per
    # request would also change the row version the proxy's remembered principals are checked by.
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_reason = models.CharField(max_length=40, blank=True)

    class Meta:
        verbose_name_plural = "token families"

    def __str__(self):
        return f"session {self.pk} of {self.user_id}"


class RefreshToken(models.Model):
    family = models.ForeignKey(TokenFamily, on_delete=models.CASCADE, related_name="refresh_tokens")
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"refresh token {self.pk} (family {self.family_id})"


class DeviceStatus(models.TextChoices):
    PENDING = "pending", "Waiting for the user"
    APPROVED = "approved", "Approved, not yet collected"
    DENIED = "denied", "Denied"
    REDEEMED = "redeemed", "Tokens issued"


class DeviceAuthorization(models.Model):
    """One browser sign-in an app asked for (RFC 8628): the app holds the device code and polls,
    the user types the user code on the portal's /device page and approves or denies.

    Both codes are kept hashed. The user code is short (8 letters) by design, so it is keyed with
    the server's secret (HMAC) rather than hashed plainly: a copy of the table alone does not give
    the codes back. It is unique only among pending authorizations — an old code may come back.
    """

    device_code_hash = models.CharField(max_length=64, unique=True)
    user_code_hash = models.CharField(max_length=64)
    client_name = models.CharField(max_length=100)
    status = models.CharField(max_length=20, choices=DeviceStatus.choices, default=DeviceStatus.PENDING)
    user = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.CASCADE, related_name="device_authorizations"
    )
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    interval = models.PositiveIntegerField(help_text="seconds the app must wait between polls")
    last_polled_at = models.DateTimeField(null=True, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    # The login the approval became, once the app collected its tokens.
    family = models.ForeignKey(TokenFamily, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user_code_hash"],
                condition=models.Q(status="pending"),
                name="deviceauthorization_pending_user_code_unique",
            )
        ]

    def __str__(self):
        return f"{self.client_name} ({self.status})"


class WebLink(models.Model):
    """A one-time link that signs a browser into the portal as ``user`` and lands on ``next``."""

    token_hash = models.CharField(max_length=64, unique=True)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="web_links")
    next = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"web link for {self.user_id} to {self.next}"
