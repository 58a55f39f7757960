"""Shapes for the /api wallet endpoints: amounts leave as 9-place decimal strings, never floats."""

from __future__ import annotations

from datetime import datetime

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from core.money import format_usd
from infra.drf import parse_instant

from .models import Entry, EntryKind


@extend_schema_field({"type": "string", "format": "decimal", "example": "12.345678901"})
class MoneyField(serializers.Field):
    """Integer nanodollars out as ``"12.345678901"``."""

    def __init__(self, **kwargs):
        kwargs.setdefault("read_only", True)
        super().__init__(**kwargs)

    def to_representation(self, value: int) -> str:
        return format_usd(value)


class WalletSerializer(serializers.Serializer):
    balance = MoneyField()
    held = MoneyField()
    available = MoneyField()
    currency = serializers.CharField(read_only=True)
    status = serializers.ChoiceField(
        choices=["ok", "low", "blocked"],
        read_only=True,
        help_text="ok; low (available below low_balance_threshold); blocked (balance ≤ 0 or available "
        "below MIN_BALANCE, so requests are refused until a top-up)",
    )
    low_balance_threshold = MoneyField()


class EntrySerializer(serializers.ModelSerializer):
    amount = MoneyField()
    balance_after = MoneyField()

    class Meta:
        model = Entry
        fields = ["id", "kind", "amount", "balance_after", "description", "reference", "created_at", "metadata"]
        read_only_fields = fields


@extend_schema_field(OpenApiTypes.STR)
class InstantField(serializers.Field):
    """An ISO 8601 datetime, or a bare date meaning that day's start in UTC.

    ``end_of_day=True`` turns a bare date into the start of the *next* day, so ``until=2026-01-31``
    (an exclusive bound) still includes everything on the 31st. A datetime without an offset is UTC.
    """

    def __init__(self, *, end_of_day: bool = False, **kwargs):
        self.end_of_day = end_of_day
        super().__init__(**kwargs)

    def to_internal_value(self, data) -> datetime:
        try:
            return parse_instant(data, end_of_day=self.end_of_day)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def to_representation(self, value):
        return value.isoformat()


class EntryFilterSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=EntryKind.choices, required=False)
    since = InstantField(required=False, help_text="inclusive; a date or an ISO 8601 datetime (UTC if no offset)")
    until = InstantField(required=False, end_of_day=True, help_text="exclusive; a bare date includes that whole day")

    def validate(self, attrs):
        since, until = attrs.get("since"), attrs.get("until")
        if since and until and since >= until:
            raise serializers.ValidationError({"until": "must be after since"})
        return attrs
