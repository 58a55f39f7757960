"""How usage records and usage totals look on ``/api``: amounts as 9-place USD strings."""

from decimal import Decimal

from rest_framework import serializers

from core.money import format_usd, usd_to_nanos
from wallet.serializers import MoneyField

from .models import UsageRecord


def usd_9(value: Decimal | None) -> str | None:
    """An upstream cost (exact decimal USD, up to 15 places) as the API's 9-place string."""
    return None if value is None else format_usd(usd_to_nanos(value))


class UsageRecordSerializer(serializers.ModelSerializer):
    upstream = serializers.SerializerMethodField(
        help_text='the upstream that served it ("default": the settings upstream; "demo"); null if none did'
    )
    upstream_cost = serializers.SerializerMethodField(help_text="USD the upstream charged us; null if unknown")
    charge = MoneyField(help_text="USD debited from the wallet")

    class Meta:
        model = UsageRecord
        fields = [
            "id",
            "request_id",
            "model",
            "alias",
            "served_model",
            "fallback",
            "upstream_model",
            "upstream",
            "stream",
            "status",
            "prompt_tokens",
            "completion_tokens",
            "reasoning_tokens",
            "cached_tokens",
            "upstream_cost",
            "charge",
            "estimated",
            "latency_ms",
            "created_at",
            "run",
            "agent",
            "tool",
        ]
        read_only_fields = fields

    def get_upstream(self, record) -> str | None:
        return record.upstream or None

    def get_upstream_cost(self, record) -> str | None:
        return usd_9(record.upstream_cost)


class UsageTotalsSerializer(serializers.Serializer):
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    reasoning_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField()
    upstream_cost = serializers.SerializerMethodField()
    charge = MoneyField()

    def get_upstream_cost(self, row) -> str:
        return usd_9(row["upstream_cost"])


class UsageDaySerializer(UsageTotalsSerializer):
    day = serializers.DateField()


class UsageModelSerializer(UsageTotalsSerializer):
    model = serializers.CharField()


class _UsageGroupSerializer(UsageTotalsSerializer):
    day = serializers.DateField(required=False, help_text="present when group_by=day (a UTC day)")
    model = serializers.CharField(required=False, help_text="present when group_by=model")


class UsageSummarySerializer(serializers.Serializer):
    """Documents the summary's shape for the schema; the view renders the parts itself."""

    group_by = serializers.ChoiceField(choices=["day", "model"])
    results = _UsageGroupSerializer(many=True)
    totals = UsageTotalsSerializer()


class RunSerializer(serializers.Serializer):
    run = serializers.CharField(help_text="the X-Tokentill-Run id")
    steps = serializers.IntegerField(help_text="model calls admitted (what a run step limit counts)")
    spend = MoneyField(help_text="USD charged: settled model calls plus tool charges made in the run")
    requests = serializers.IntegerField(help_text="model calls, refused ones included")
    tool_charges = serializers.IntegerField()
    first_at = serializers.DateTimeField()
    last_at = serializers.DateTimeField()
