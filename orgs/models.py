"""Organizations: teams that share one wallet.

* An ``Organization`` owns a wallet of its own (``wallet.Wallet.organization``; a wallet belongs
  to a user or to an organization, never both — a CHECK constraint says so) and API keys of its
  own (``accounts.ApiKey.organization``), which always bill it.
* A ``Membership`` gives a user a role in it — owner, admin or member — and the member's own
  limits inside it: daily and monthly spend (nanodollars) and the models they may use. A member
  spends from the organization's wallet by naming it (``X-Tokentill-Org``); deleting the
  membership ends that at once, since every such request looks the membership up.
* An ``Invitation`` is an email link: only the SHA-256 of its token is stored, it expires, and it
  is used at most once — decided by one conditional UPDATE.
"""

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Organization(models.Model):
    name = models.CharField(max_length=100)
    # Unique, and never all digits: ``X-Tokentill-Org`` takes an id or a slug, so a slug must not
    # read as an id.
    slug = models.SlugField(max_length=50, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    # Disabled by an operator: its keys and ``X-Tokentill-Org`` are refused on /v1 (403
    # ``organization_disabled``); its members' own wallets are not affected.
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [models.CheckConstraint(condition=~Q(slug__regex=r"^[0-9]+$"), name="organization_slug_not_id")]

    def __str__(self):
        return self.name


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"


# Who may manage the organization: its members and invitations, keys, limits and top-ups.
MANAGERS = (Role.OWNER, Role.ADMIN)


class Membership(models.Model):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    # Nanodollars; None: no limit of that kind.
    daily_spend = models.BigIntegerField(null=True, blank=True)
    monthly_spend = models.BigIntegerField(null=True, blank=True)
    # None: every model; a list: only those.
    allowed_models = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "user"], name="membership_one_per_user"),
            models.CheckConstraint(condition=Q(role__in=Role.values), name="membership_role_known"),
            models.CheckConstraint(
                condition=(Q(daily_spend__isnull=True) | Q(daily_spend__gte=0))
                & (Q(monthly_spend__isnull=True) | Q(monthly_spend__gte=0)),
                name="membership_limits_non_negative",
            ),
        ]

    def __str__(self):
        return f"{self.user} in {self.organization} ({self.role})"

    @property
    def manages(self) -> bool:
        return self.role in MANAGERS


class Invitation(models.Model):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField()
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    token_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.CheckConstraint(condition=Q(role__in=Role.values), name="invitation_role_known")]

    def __str__(self):
        return f"invitation of {self.email} to {self.organization}"

    @property
    def status(self) -> str:
        if self.accepted_at is not None:
            return "accepted"
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "pending"
