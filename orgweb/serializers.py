"""Shapes of the organizations API. Money is a USD decimal string with 9 places."""

from __future__ import annotations

from rest_framework import serializers

from accounts.serializers import ApiKeySerializer
from core.money import MoneyError, format_usd, parse_usd
from orgs.models import Invitation, Membership, Organization, Role
from proxy.serializers import UsageRecordSerializer
from wallet.serializers import EntrySerializer

MAX_ALLOWED_MODELS = 200


class OrganizationSerializer(serializers.ModelSerializer):
    role = serializers.SerializerMethodField(help_text="your role in it")

    class Meta:
        model = Organization
        fields = ["id", "name", "slug", "created_at", "role"]
        read_only_fields = fields

    def get_role(self, org) -> str:
        return self.context["roles"][org.pk]


class OrganizationInSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)


def _money(nanos):
    return format_usd(nanos) if nanos is not None else None


class UsdStringField(serializers.CharField):
    """A USD amount as a decimal string: a JSON number (a float on the way in) is refused."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            raise serializers.ValidationError('a USD amount is a decimal string, such as "2.50"')
        return super().to_internal_value(data)


class MemberLimitsSerializer(serializers.Serializer):
    """``daily_spend``/``monthly_spend``: USD strings or null (no limit); ``allowed_models``: a
    list of model ids or null (every model)."""

    daily_spend = UsdStringField(allow_null=True, required=False, max_length=40)
    monthly_spend = UsdStringField(allow_null=True, required=False, max_length=40)
    allowed_models = serializers.ListField(
        child=serializers.CharField(max_length=200), allow_null=True, required=False, max_length=MAX_ALLOWED_MODELS
    )

    def _spend(self, value):
        if value is None:
            return None
        try:
            nanos = parse_usd(value)
        except MoneyError as exc:
            raise serializers.ValidationError(str(exc)) from None
        if nanos < 0:
            raise serializers.ValidationError("a spend limit cannot be negative")
        return nanos

    def validate_daily_spend(self, value):
        return self._spend(value)

    def validate_monthly_spend(self, value):
        return self._spend(value)


class MemberSerializer(serializers.ModelSerializer):
    user = serializers.SerializerMethodField()
    limits = serializers.SerializerMethodField(help_text="null unless you manage the organization or it is yours")
    spend = serializers.SerializerMethodField(help_text="today's and this month's spend (UTC); same visibility")

    class Meta:
        model = Membership
        fields = ["id", "user", "role", "limits", "spend", "created_at"]
        read_only_fields = fields

    def _visible(self, membership) -> bool:
        viewer = self.context["viewer"]
        return viewer.manages or viewer.pk == membership.pk

    def get_user(self, membership) -> dict:
        return {"id": membership.user_id, "email": membership.user.email}

    def get_limits(self, membership) -> dict | None:
        if not self._visible(membership):
            return None
        return {
            "daily_spend": _money(membership.daily_spend),
            "monthly_spend": _money(membership.monthly_spend),
            "allowed_models": membership.allowed_models,
        }

    def get_spend(self, membership) -> dict | None:
        if not self._visible(membership):
            return None
        spent = self.context["spend"].get(membership.user_id, {"today": 0, "month": 0})
        return {"today": format_usd(spent["today"]), "month": format_usd(spent["month"])}


class MemberUpdateSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=Role.choices, required=False)
    limits = MemberLimitsSerializer(required=False)


class InvitationSerializer(serializers.ModelSerializer):
    status = serializers.CharField(read_only=True)

    class Meta:
        model = Invitation
        fields = ["id", "email", "role", "status", "created_at", "expires_at"]
        read_only_fields = fields


class InvitationInSerializer(serializers.Serializer):
    email = serializers.EmailField()
    role = serializers.ChoiceField(choices=Role.choices, default=Role.MEMBER)


class InvitationCreatedSerializer(InvitationSerializer):
    url = serializers.SerializerMethodField(help_text="the invitation link, shown once")
    token = serializers.SerializerMethodField(help_text="the token in that link, shown once")

    class Meta(InvitationSerializer.Meta):
        fields = [*InvitationSerializer.Meta.fields, "url", "token"]
        read_only_fields = fields

    def get_url(self, invitation) -> str:
        return self.context["url"]

    def get_token(self, invitation) -> str:
        return self.context["token"]


class AcceptSerializer(serializers.Serializer):
    token = serializers.CharField(max_length=200)


class OrgKeySerializer(ApiKeySerializer):
    created_by = serializers.SerializerMethodField()

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "created_by"]
        read_only_fields = fields

    def get_created_by(self, key) -> dict:
        return {"id": key.user_id, "email": key.user.email}


class OrgEntrySerializer(EntrySerializer):
    member = serializers.IntegerField(source="member_id", allow_null=True, read_only=True)

    class Meta(EntrySerializer.Meta):
        fields = [*EntrySerializer.Meta.fields, "member"]
        read_only_fields = fields


class OrgUsageSerializer(UsageRecordSerializer):
    member = serializers.SerializerMethodField()

    class Meta(UsageRecordSerializer.Meta):
        fields = [*UsageRecordSerializer.Meta.fields, "member"]
        read_only_fields = fields

    def get_member(self, record) -> dict:
        return {"id": record.user_id, "email": record.user.email}


class OrgUsageSummaryRowSerializer(serializers.Serializer):
    member = serializers.IntegerField(required=False, help_text="by=member: the member's user id")
    email = serializers.CharField(required=False, help_text="by=member: their email")
    day = serializers.DateField(required=False, help_text="by=day: the UTC day")
    model = serializers.CharField(required=False, help_text="by=model: the model asked for")
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    charge = serializers.CharField(help_text="USD charged (settled requests)")
    held = serializers.CharField(help_text="USD held by requests in flight")


class OrgUsageSummarySerializer(serializers.Serializer):
    by = serializers.ChoiceField(choices=["member", "day", "model"])
    results = OrgUsageSummaryRowSerializer(many=True)
