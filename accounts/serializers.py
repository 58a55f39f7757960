"""Input and output shapes for /api/auth, /api/keys and /api/account/limits.

The limits themselves are validated by ``accounts.limits`` (the REST API, the portal and the
admin all use it, so a limit refused through one is refused through the others too).
"""

from __future__ import annotations

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from core.money import format_usd

from .limits import LIMIT_KEYS, USER_LIMIT_KEYS, limits_clean, user_limits_effective
from .models import ApiKey, User
from .weblinks import NEXT_PATHS, web_link_next_allowed

DUPLICATE_EMAIL = "an account with this email address already exists"


# --- auth -------------------------------------------------------------------------------------


class SignupSerializer(serializers.Serializer):
    email = serializers.EmailField(max_length=254)
    password = serializers.CharField(write_only=True, trim_whitespace=False, style={"input_type": "password"})

    def validate_email(self, value):
        return User.objects.normalize_email(value).lower()

    def validate(self, attrs):
        # The password first, with Django's validators (including "too similar to the email"): a
        # weak password's answer must not depend on whether the address has an account. Only a
        # caller whose password passes learns that (README, Security: why it cannot be hidden).
        try:
            validate_password(attrs["password"], user=User(email=attrs["email"]))
        except DjangoValidationError as exc:
            raise serializers.ValidationError({"password": list(exc.messages)}) from None
        # A friendly early answer; the UNIQUE constraint still decides a race (see the view).
        if User.objects.filter(email__iexact=attrs["email"]).exists():
            raise serializers.ValidationError({"email": [DUPLICATE_EMAIL]})
        return attrs


class ClientNameField(serializers.CharField):
    """An app's name as the user will see it in "Signed-in apps": 1–100 printable characters."""

    def __init__(self, **kwargs):
        super().__init__(max_length=100, **kwargs)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if not value.isprintable():
            raise serializers.ValidationError("must be printable text (no control characters or line breaks)")
        return value


class CredentialsSerializer(serializers.Serializer):
    email = serializers.CharField(max_length=254)
    password = serializers.CharField(write_only=True, trim_whitespace=False, max_length=4096)
    client_name = ClientNameField(required=False, help_text='names this login in "Signed-in apps"')


class RefreshSerializer(serializers.Serializer):
    refresh = serializers.CharField(max_length=200)


class UserOutSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    email = serializers.EmailField()


class SignupOutSerializer(serializers.Serializer):
    user = UserOutSerializer()
    access = serializers.CharField()
    refresh = serializers.CharField()
    expires_in = serializers.IntegerField(help_text="access token lifetime in seconds")


class TokenPairOutSerializer(serializers.Serializer):
    access = serializers.CharField()
    refresh = serializers.CharField()
    expires_in = serializers.IntegerField(help_text="access token lifetime in seconds")


# --- keys -------------------------------------------------------------------------------------


class LimitsOutSerializer(serializers.Serializer):
    """Documentation shape of ``limits`` (stored as JSON, rendered as-is)."""

    rpm = serializers.IntegerField(allow_null=True, min_value=1)
    daily_spend = serializers.CharField(allow_null=True, help_text='USD decimal string, e.g. "5.000000000"')
    monthly_spend = serializers.CharField(allow_null=True, help_text="USD decimal string")
    allowed_models = serializers.ListField(child=serializers.CharField(), allow_null=True)
    run_max_steps = serializers.IntegerField(allow_null=True, min_value=1, help_text="model calls per X-Tokentill-Run")
    run_max_spend = serializers.CharField(allow_null=True, help_text="USD decimal string, spend per X-Tokentill-Run")
    max_parallel = serializers.IntegerField(allow_null=True, min_value=1, help_text="requests in flight at once")
    allow_fallback = serializers.BooleanField(
        allow_null=True, help_text="a wallet running low is served by the model's cheaper fallback (null: false)"
    )
    tpm = serializers.IntegerField(allow_null=True, min_value=1, help_text="tokens per minute (prompt + completion)")
    tpd = serializers.IntegerField(allow_null=True, min_value=1, help_text="tokens per day (UTC)")


@extend_schema_field(LimitsOutSerializer)
class LimitsField(serializers.JSONField):
    def to_internal_value(self, data):
        return limits_clean(super().to_internal_value(data))


class ApiKeySerializer(serializers.ModelSerializer):
    revoked = serializers.BooleanField(read_only=True)
    limits = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "expires_at", "revoked", "scopes", "limits"]
        read_only_fields = fields

    @extend_schema_field(LimitsOutSerializer)
    def get_limits(self, key):
        return {name: (key.limits or {}).get(name) for name in LIMIT_KEYS}


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.SerializerMethodField(help_text="the secret; shown this once and never again")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields

    def get_key(self, key) -> str:
        return self.context["secret"]


class ApiKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    limits = LimitsField(required=False, allow_null=True, help_text="see LimitsOut; missing keys mean no limit")

    def validate_expires_at(self, value):
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("expires_at must be in the future")
        return value


class ApiKeyUpdateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, required=False)
    limits = LimitsField(
        required=False,
        allow_null=True,
        help_text="replaces the whole limits object; missing keys (or null) mean no limit",
    )

    def validate_limits(self, value):
        # null clears every limit; stored as the full all-null object so readers see one shape.
        return limits_clean(value)


# --- a user's limits (/api/account/limits) ---------------------------------------------------


class UserLimitsSerializer(serializers.Serializer):
    """One set of a user's limits (null: no limit)."""

    daily_spend = serializers.CharField(allow_null=True, help_text='USD decimal string, e.g. "5.000000000"')
    monthly_spend = serializers.CharField(allow_null=True, help_text="USD decimal string")
    rpm = serializers.IntegerField(allow_null=True, min_value=1, help_text="requests per minute")
    max_parallel = serializers.IntegerField(allow_null=True, min_value=1, help_text="requests in flight at once")
    tpm = serializers.IntegerField(allow_null=True, min_value=1, help_text="tokens per minute")
    tpd = serializers.IntegerField(allow_null=True, min_value=1, help_text="tokens per day (UTC)")


class AccountLimitsSerializer(serializers.Serializer):
    staff = UserLimitsSerializer(help_text="set by the operator's staff")
    own = UserLimitsSerializer(help_text="your own budget: can only be tighter than staff's")
    effective = UserLimitsSerializer(help_text="in force: the stricter of the two, limit by limit")


def account_limits_data(user: User) -> dict:
    """``AccountLimitsSerializer``'s data for ``user``."""
    effective = user_limits_effective(user)

    def shown(name: str, value):
        if value is None:
            return None
        return format_usd(value) if name.endswith("_spend") else value

    return {
        "staff": {name: (user.limits or {}).get(name) for name in USER_LIMIT_KEYS},
        "own": {name: (user.own_limits or {}).get(name) for name in USER_LIMIT_KEYS},
        "effective": {name: shown(name, effective.get(name)) for name in USER_LIMIT_KEYS},
    }


# --- browser sign-in, sessions, web links -----------------------------------------------------


class DeviceCodeRequestSerializer(serializers.Serializer):
    client_name = ClientNameField(help_text="the app's name, shown to the user on the approval page")


class DeviceCodeOutSerializer(serializers.Serializer):
    device_code = serializers.CharField(help_text="the app's secret for polling; never show it")
    user_code = serializers.CharField(help_text="two groups of four letters such as BDFH-KMNP, for the user to type")
    verification_uri = serializers.CharField()
    verification_uri_complete = serializers.CharField(help_text="verification_uri with the code filled in")
    expires_in = serializers.IntegerField(help_text="seconds")
    interval = serializers.IntegerField(help_text="seconds to wait between polls")


class DeviceTokenRequestSerializer(serializers.Serializer):
    device_code = serializers.CharField(max_length=200)


class DeviceTokenErrorSerializer(serializers.Serializer):
    error = serializers.ChoiceField(
        ["authorization_pending", "slow_down", "access_denied", "expired_token", "invalid_grant"]
    )
    detail = serializers.CharField()
    interval = serializers.IntegerField(required=False, help_text="slow_down only: the new interval")


class SessionSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(allow_null=True)
    current = serializers.SerializerMethodField(help_text="the session this request's access token belongs to")

    def get_current(self, family) -> bool:
        return family.pk == self.context.get("current_family_id")


class WebLinkRequestSerializer(serializers.Serializer):
    next = serializers.CharField(max_length=200, trim_whitespace=False)

    def validate_next(self, value):
        if not web_link_next_allowed(value):
            raise serializers.ValidationError(
                f"must be one of {', '.join(NEXT_PATHS)} or /topup/<pack slug>: a web link only leads to this site"
            )
        return value


class WebLinkOutSerializer(serializers.Serializer):
    url = serializers.CharField()
    expires_in = serializers.IntegerField(help_text="seconds")
