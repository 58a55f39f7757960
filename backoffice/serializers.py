"""Shapes of the operator API (``/api/admin/``). Amounts are 9-place USD strings in and out; an
amount sent as a JSON number is refused, so no float ever touches money."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from accounts.limits import limits_clean
from accounts.serializers import ApiKeySerializer, LimitsField
from core.money import MoneyError, format_usd, parse_usd, usd_to_nanos
from wallet.models import EntryKind
from wallet.serializers import EntrySerializer, MoneyField, WalletSerializer

MAX_AMOUNT_USD = Decimal(1_000_000)  # per grant or correction, as on /v1/user/balance/deposit
GRANT_KINDS = [EntryKind.BONUS, EntryKind.TRIAL, EntryKind.GRANT]


@extend_schema_field({"type": "string", "format": "decimal", "example": "5.000000000"})
class UsdAmountField(serializers.Field):
    """A USD decimal string → integer nanodollars; ``sign``: "positive" or "non_zero"."""

    def __init__(self, *, sign: str, **kwargs):
        self.sign = sign
        super().__init__(**kwargs)

    def to_internal_value(self, data) -> int:
        if not isinstance(data, str):
            raise serializers.ValidationError(
                'a decimal string such as "5.00"; JSON numbers are refused so that no float touches money',
                code="invalid_amount",
            )
        try:
            decimal = Decimal(data.strip())
        except InvalidOperation:
            decimal = None
        if decimal is not None and decimal.is_finite() and decimal.copy_abs() > MAX_AMOUNT_USD:
            limit = format_usd(usd_to_nanos(MAX_AMOUNT_USD))
            raise serializers.ValidationError(f"at most {limit} USD per call", code="invalid_amount")
        try:
            amount = parse_usd(data)
        except MoneyError as exc:
            raise serializers.ValidationError(str(exc), code="invalid_amount") from None
        if self.sign == "positive" and amount <= 0:
            raise serializers.ValidationError("must be positive", code="invalid_amount")
        if amount == 0:
            raise serializers.ValidationError("cannot be zero", code="invalid_amount")
        return amount

    def to_representation(self, value: int) -> str:
        return format_usd(value)


class ReasonField(serializers.CharField):
    def __init__(self, **kwargs):
        super().__init__(max_length=500, help_text="why; kept in the ledger entry's description", **kwargs)

    def to_internal_value(self, data):
        value = super().to_internal_value(data).replace("\x00", "")
        if not value.strip():
            raise serializers.ValidationError("say why: the reason is kept in the ledger", code="blank")
        return value.strip()


class UserSearchSerializer(serializers.Serializer):
    q = serializers.CharField(required=False, allow_blank=True, max_length=254, help_text="part of the email, or an id")
    is_active = serializers.BooleanField(required=False, allow_null=True, default=None)
    is_staff = serializers.BooleanField(required=False, allow_null=True, default=None)


class UserRowSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    email = serializers.EmailField()
    is_active = serializers.BooleanField()
    is_staff = serializers.BooleanField()
    date_joined = serializers.DateTimeField()
    balance = serializers.SerializerMethodField(help_text="USD; 0 for an account that has no wallet yet")

    def get_balance(self, user) -> str:
        wallet = getattr(user, "wallet", None)  # a missing one-to-one raises an AttributeError
        return format_usd(wallet.balance if wallet is not None else 0)


class OperatorKeySerializer(ApiKeySerializer):
    revoked_at = serializers.DateTimeField(read_only=True)

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "revoked_at"]
        read_only_fields = fields


class SessionOutSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)
    revoked_reason = serializers.CharField()


class ActivitySerializer(serializers.Serializer):
    last_activity = serializers.DateTimeField(allow_null=True, help_text="the latest of the moments below")
    last_login = serializers.DateTimeField(allow_null=True, help_text="portal or admin sign-in")
    last_key_use = serializers.DateTimeField(allow_null=True, help_text="to the minute")
    last_app_use = serializers.DateTimeField(allow_null=True, help_text="a desktop login signed in or refreshed")
    last_request = serializers.DateTimeField(allow_null=True, help_text="the newest usage record")
    last_entry = serializers.DateTimeField(allow_null=True, help_text="the newest ledger entry")


class UserDetailSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    email = serializers.EmailField()
    is_active = serializers.BooleanField()
    is_staff = serializers.BooleanField()
    is_superuser = serializers.BooleanField()
    date_joined = serializers.DateTimeField()
    wallet = WalletSerializer()
    keys = OperatorKeySerializer(many=True, help_text="every key, revoked ones included, with its limits")
    sessions = SessionOutSerializer(many=True, help_text="active logins")
    activity = ActivitySerializer()


class UserStateSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    email = serializers.EmailField()
    is_active = serializers.BooleanField()
    changed = serializers.BooleanField(help_text="false when the account already was in that state")


class KeyLimitsSerializer(serializers.Serializer):
    limits = LimitsField(
        allow_null=True, help_text="replaces the key's whole limits object; missing keys (or null) mean no limit"
    )

    def validate_limits(self, value):
        return limits_clean(value)  # null clears every limit: stored as the all-null object


class SignOutSerializer(serializers.Serializer):
    signed_out = serializers.IntegerField(help_text="logins ended by this call")


class GrantSerializer(serializers.Serializer):
    amount = UsdAmountField(sign="positive", help_text='USD decimal string, e.g. "5.00"; at most 1,000,000')
    reason = ReasonField()
    kind = serializers.ChoiceField(choices=GRANT_KINDS, default=EntryKind.BONUS, help_text="the entry's kind")


class CorrectionSerializer(serializers.Serializer):
    amount = UsdAmountField(sign="non_zero", help_text='signed USD decimal string: "2.50" adds, "-2.50" takes away')
    reason = ReasonField()


class PostedSerializer(serializers.Serializer):
    user = serializers.IntegerField(source="wallet.user_id", allow_null=True, help_text="null on an organization's")
    organization = serializers.IntegerField(
        source="wallet.organization_id", allow_null=True, help_text="null on a user's wallet"
    )
    entry = EntrySerializer(source="*")
    balance = MoneyField(source="balance_after", help_text="the balance right after this entry")


class OrgSearchSerializer(serializers.Serializer):
    q = serializers.CharField(
        required=False, allow_blank=True, max_length=100, help_text="part of the name or slug, or an id"
    )


class OrgRowSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    slug = serializers.CharField()
    created_at = serializers.DateTimeField()
    balance = serializers.SerializerMethodField(help_text="USD; 0 for an organization that has no wallet yet")

    def get_balance(self, org) -> str:
        wallet = getattr(org, "wallet", None)  # a missing one-to-one raises an AttributeError
        return format_usd(wallet.balance if wallet is not None else 0)


class OperatorMemberSerializer(serializers.Serializer):
    id = serializers.IntegerField(help_text="the membership's id")
    user = serializers.IntegerField(source="user_id")
    email = serializers.EmailField(source="user.email")
    role = serializers.CharField()
    daily_spend = MoneyField(allow_null=True, help_text="USD; null: no daily limit")
    monthly_spend = MoneyField(allow_null=True, help_text="USD; null: no monthly limit")
    allowed_models = serializers.ListField(
        child=serializers.CharField(), allow_null=True, help_text="null: every model"
    )
    created_at = serializers.DateTimeField()


class OrgActivitySerializer(serializers.Serializer):
    last_activity = serializers.DateTimeField(allow_null=True, help_text="the latest of the moments below")
    last_key_use = serializers.DateTimeField(allow_null=True, help_text="of its own keys, to the minute")
    last_request = serializers.DateTimeField(allow_null=True, help_text="the newest usage record billed to it")
    last_entry = serializers.DateTimeField(allow_null=True, help_text="the newest ledger entry of its wallet")


class OrgStateSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    is_active = serializers.BooleanField()
    changed = serializers.BooleanField(help_text="false when it already was so")


class OrgDetailSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    slug = serializers.CharField()
    is_active = serializers.BooleanField(help_text="false: disabled by an operator")
    created_at = serializers.DateTimeField()
    wallet = WalletSerializer()
    members = OperatorMemberSerializer(many=True, help_text="with their roles and limits, oldest first")
    keys = OperatorKeySerializer(many=True, help_text="its own keys, revoked ones included, with their limits")
    activity = OrgActivitySerializer()
