"""``/api/admin/reports/…``: the business reports as JSON, or CSV with ``?format=csv`` (or
``Accept: text/csv``). Same operator key, same audit log as the rest of the operator API.
Amounts are 9-place USD strings; periods are UTC."""

from __future__ import annotations

import csv
import io

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response

from core.money import format_usd
from wallet.selectors import csv_safe_text
from wallet.serializers import InstantField

from . import business
from .api import ERRORS, OperatorView

MONEY = {*business.MONEY_FIELDS, "charged", "upstream_cost", "margin", "usage", "tools", "spent"}
MONEY |= {"owed_to_users", "owed_to_us", "held"}


class ReportCSVRenderer(BaseRenderer):
    """``results`` as CSV rows (header from the first row's keys); text cells that a spreadsheet
    would run as a formula are quoted (model ids and agent labels come from clients)."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        rows = data.get("results") if isinstance(data, dict) else None
        if rows is None:  # an error, or a report of one row
            rows = [data] if isinstance(data, dict) else []
        out = io.StringIO()
        writer = csv.writer(out)
        if rows:
            writer.writerow(list(rows[0]))
            for row in rows:
                writer.writerow([_cell(name, value) for name, value in row.items()])
        return out.getvalue().encode(self.charset)


def _cell(name: str, value: object) -> object:
    return csv_safe_text(value) if isinstance(value, str) and name not in MONEY else value


def _usd(row: dict) -> dict:
    return {key: format_usd(value) if key in MONEY and isinstance(value, int) else value for key, value in row.items()}


class RangeSerializer(serializers.Serializer):
    since = InstantField(required=False, help_text="inclusive; a date or an ISO 8601 datetime (UTC if no offset)")
    until = InstantField(required=False, end_of_day=True, help_text="exclusive; a bare date includes that whole day")

    def validate(self, attrs):
        since, until = attrs.get("since"), attrs.get("until")
        if since and until and since >= until:
            raise serializers.ValidationError({"until": "must be after since"})
        return attrs


class MoneyReportFilter(RangeSerializer):
    group_by = serializers.ChoiceField(choices=list(business.PERIODS), default="day")


class UsageReportFilter(RangeSerializer):
    group_by = serializers.ChoiceField(choices=list(business.USAGE_GROUPS), default="model")


class TopFilter(RangeSerializer):
    limit = serializers.IntegerField(min_value=1, max_value=200, default=10)
    kind = serializers.ChoiceField(
        choices=list(business.SPENDER_KINDS), default="user", help_text="whose wallets: users' or organizations'"
    )


def _money_row(name: str, **kwargs):
    return inline_serializer(
        name=name,
        **kwargs,
        fields={
            "period": serializers.DateField(),
            "payments": serializers.IntegerField(),
            "requests": serializers.IntegerField(),
            **{field: serializers.CharField(help_text="USD") for field in business.MONEY_FIELDS},
        },
    )


class _ReportView(OperatorView):
    renderer_classes = [JSONRenderer, ReportCSVRenderer]
    filter_class: type[serializers.Serializer]

    def filters(self, request) -> dict:
        params = {k: v for k, v in request.query_params.items() if k != "format"}
        found = self.filter_class(data=params)
        found.is_valid(raise_exception=True)
        return dict(found.validated_data)


_CSV = OpenApiParameter("format", str, enum=["json", "csv"], description="csv: the rows as CSV")


class MoneyReportView(_ReportView):
    filter_class = MoneyReportFilter
    operations = {"get": "admin_reports_money"}

    @extend_schema(
        operation_id="admin_reports_money",
        tags=["operator"],
        summary="Revenue, fees, net, refunds, charged, upstream cost and margin by day, week or month",
        parameters=[MoneyReportFilter, _CSV],
        responses={
            200: inline_serializer(
                "MoneyReport", {"results": _money_row("MoneyRow", many=True), "totals": serializers.DictField()}
            ),
            400: OpenApiResponse(description="bad filter"),
            **ERRORS,
        },
    )
    def get(self, request):
        found = self.filters(request)
        rows = business.money_by_period(period=found.pop("group_by"), **found)
        return Response({"results": [_usd(row) for row in rows], "totals": _usd(business.totals_of(rows))})


class UsageReportView(_ReportView):
    filter_class = UsageReportFilter
    operations = {"get": "admin_reports_usage"}

    @extend_schema(
        operation_id="admin_reports_usage",
        tags=["operator"],
        summary="Model usage by model, user, organization or agent label: requests, tokens, charged, cost, margin",
        parameters=[UsageReportFilter, _CSV],
        responses={
            200: OpenApiResponse(
                description="{results: [{key, requests, prompt_tokens, completion_tokens, "
                "charged, upstream_cost, margin}]}"
            ),
            **ERRORS,
        },
    )
    def get(self, request):
        found = self.filters(request)
        rows = business.usage_by(group=found.pop("group_by"), **found)
        return Response({"results": [_usd(row) for row in rows]})


class TopSpendersView(_ReportView):
    filter_class = TopFilter
    operations = {"get": "admin_reports_top_spenders"}

    @extend_schema(
        operation_id="admin_reports_top_spenders",
        tags=["operator"],
        summary="The users (or organizations) who spent the most from their wallet (model usage plus tool charges)",
        parameters=[TopFilter, _CSV],
        responses={
            200: OpenApiResponse(
                description="{results: [{user, email, usage, tools, spent}]}; with kind=organization "
                "{results: [{organization, name, slug, usage, tools, spent}]}"
            ),
            **ERRORS,
        },
    )
    def get(self, request):
        rows = business.top_spenders(**self.filters(request))
        return Response({"results": [_usd(row) for row in rows]})


class LiabilitiesView(_ReportView):
    filter_class = RangeSerializer
    operations = {"get": "admin_reports_liabilities"}

    @extend_schema(
        operation_id="admin_reports_liabilities",
        tags=["operator"],
        summary="Unspent credit owed to users (Σ positive balances), and what wallets below zero owe",
        parameters=[_CSV],
        responses={
            200: inline_serializer(
                "Liabilities",
                {
                    "owed_to_users": serializers.CharField(),
                    "wallets_in_credit": serializers.IntegerField(),
                    "owed_to_us": serializers.CharField(),
                    "wallets_below_zero": serializers.IntegerField(),
                    "held": serializers.CharField(),
                },
            ),
            **ERRORS,
        },
    )
    def get(self, request):
        return Response(_usd(vars(business.liabilities())))
