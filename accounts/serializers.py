"""Input and output shapes for /api/auth and /api/keys.

``limits_clean`` is the one validator for an API key's ``limits``; the REST API and the admin
both use it, so a limit a user cannot set through one cannot be set through the other either.
"""

from __future__ import annotations

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from core.money import MoneyError, format_usd, parse_usd
from core.numbers import MAX_INT

from .models import ApiKey, User
from .weblinks import NEXT_PATHS, web_link_next_allowed

LIMIT_KEYS = (
    "rpm",
    "daily_spend",
    "monthly_spend",
    "allowed_models",
    "run_max_steps",
    "run_max_spend",
    "max_parallel",
    "allow_fallback",
)
DUPLICATE_EMAIL = "an account with this email address already exists"


def _positive_int(value: object, maximum: int) -> bool:
    # A JSON number only (1e30 arrives as a float, 2.0 too), and one that fits: the limits are
    # compared with counters and shown back, so 10**30 is not "no limit", it is a mistake.
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= maximum


def limits_clean(value: object) -> dict:
    """Validate and normalise ``{rpm, daily_spend, monthly_spend, allowed_models, run_max_steps,
    run_max_spend, max_parallel, allow_fallback}``.

    Missing keys mean "no limit" (null). Spend caps are decimal strings, stored as 9-place
    strings; numbers are refused because a JSON number may already have been rounded by a float
    on its way here. ``run_max_steps``/``run_max_spend`` bound each ``X-Tokentill-Run`` made with
    the key; unlike a daily cap, a run limit of zero would mean nothing, so they must be positive.
    Raises Django's ``ValidationError`` (DRF and admin forms both understand it).
    """
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise DjangoValidationError(f"limits must be an object with {', '.join(LIMIT_KEYS)}")
    unknown = sorted(set(value) - set(LIMIT_KEYS))
    if unknown:
        raise DjangoValidationError(f"unknown limit(s): {', '.join(unknown)}; allowed: {', '.join(LIMIT_KEYS)}")

    rpm = value.get("rpm")
    if rpm is not None and not _positive_int(rpm, MAX_INT):
        message = f"rpm must be a positive whole number of requests per minute (at most {MAX_INT}), or null"
        raise DjangoValidationError(message)
    steps = value.get("run_max_steps")
    if steps is not None and not _positive_int(steps, MAX_INT):
        raise DjangoValidationError(
            f"run_max_steps must be a positive whole number of model calls per run (at most {MAX_INT}), or null"
        )

    parallel = value.get("max_parallel")
    if parallel is not None and not _positive_int(parallel, MAX_INT):
        raise DjangoValidationError(
            f"max_parallel must be a positive whole number of requests in flight (at most {MAX_INT}), or null"
        )

    fallback = value.get("allow_fallback")
    if fallback is not None and not isinstance(fallback, bool):
        raise DjangoValidationError("allow_fallback must be true or false (or null: false)")

    cleaned: dict = {"rpm": rpm, "run_max_steps": steps, "max_parallel": parallel, "allow_fallback": fallback}
    for name in ("daily_spend", "monthly_spend", "run_max_spend"):
        raw = value.get(name)
        if raw is None:
            cleaned[name] = None
            continue
        if not isinstance(raw, str):
            raise DjangoValidationError(f'{name} must be a decimal string such as "5.00" (not a number), or null')
        try:
            nanos = parse_usd(raw)
        except MoneyError as exc:
            raise DjangoValidationError(f"{name}: {exc}") from None
        if nanos < 0:
            raise DjangoValidationError(f"{name} cannot be negative")
        if nanos == 0 and name == "run_max_spend":
            raise DjangoValidationError("run_max_spend must be more than zero, or null for no limit")
        cleaned[name] = format_usd(nanos)

    models = value.get("allowed_models")
    if models is not None:
        if not isinstance(models, list) or not models:
            raise DjangoValidationError("allowed_models must be a non-empty list of model ids, or null for every model")
        if not all(isinstance(model, str) and model.strip() for model in models):
            raise DjangoValidationError("allowed_models entries must be non-empty strings")
        # Order kept, duplicates dropped: the list is shown back to the user as they wrote it.
        models = list(dict.fromkeys(model.strip() for model in models))
    cleaned["allowed_models"] = models
    return {name: cleaned[name] for name in LIMIT_KEYS}


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


# --- browser sign-in, sessions, web links -----------------------------------------------------


class DeviceCodeRequestSerializer(serializers.Serializer):
    client_name = ClientNameField(help_text="the app's name, shown to the user on the approval page")


class DeviceCodeOutSerializer(serializers.Serializer):
    device_code = serializers.CharField(help_text="the app's secret for polling; never show it")
    user_code = serializers.CharField(help_text="XXXX-XXXX, for the user to type")
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
