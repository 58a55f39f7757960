"""``/api/usage``: a user's own usage records, one record, and totals per day or model;
``/api/runs/<run>``: what one of their agent runs did.

Views parse the query string, call a selector in ``proxy.usage_selectors`` and render; bad input
is a 400 with a human ``detail``; anyone else's record is a 404, never a 403 that confirms it exists.
"""

from datetime import datetime

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.exceptions import NotFound, ParseError
from rest_framework.response import Response
from rest_framework.views import APIView

from core.numbers import parse_id
from infra.drf import CSVOrJSON, ResultsCursorPagination, parse_instant, query_text
from infra.streaming import csv_download

from .serializers import (
    RunSerializer,
    UsageDaySerializer,
    UsageModelSerializer,
    UsageRecordSerializer,
    UsageSummarySerializer,
    UsageTotalsSerializer,
)
from .usage_selectors import GROUPINGS, run_summary, usage_csv_lines, usage_get, usage_list, usage_summary


class UsagePagination(ResultsCursorPagination):
    ordering = ("-created_at", "-id")  # ``-id`` breaks ties between equal times


def _bound(params, name: str, *, end: bool) -> datetime | None:
    raw = (params.get(name) or "").strip()
    if not raw:
        return None
    try:
        return parse_instant(raw, end_of_day=end)
    except ValueError as exc:
        raise ParseError(f"{name}: {exc}") from None


def _filters(params) -> dict:
    filters = {
        "model": query_text(params, "model"),
        "run": query_text(params, "run"),
        "since": _bound(params, "since", end=False),
    }
    filters["until"] = _bound(params, "until", end=True)
    key = params.get("key")
    if key:
        try:
            filters["api_key_id"] = parse_id(key)
        except ValueError:
            raise ParseError(f"key={key!r} is not an API key id") from None
    if filters["since"] and filters["until"] and filters["since"] >= filters["until"]:
        raise ParseError("since must be before until")
    return filters


_FILTER_PARAMS = [
    OpenApiParameter("model", str, description="only this model id"),
    OpenApiParameter("key", int, description="only requests made with this API key (one of yours)"),
    OpenApiParameter("run", str, description="only requests of this run (their X-Tokentill-Run)"),
    OpenApiParameter("since", OpenApiTypes.DATETIME, description="from this date or instant (inclusive)"),
    OpenApiParameter("until", OpenApiTypes.DATETIME, description="to this instant (exclusive) or date (inclusive)"),
]


class UsageListApi(CSVOrJSON, APIView):
    pagination_class = UsagePagination

    @extend_schema(
        parameters=[
            *_FILTER_PARAMS,
            OpenApiParameter("limit", int, description="page size, at most 200"),
            OpenApiParameter("format", str, enum=["csv"], description="csv: every filtered record as CSV"),
        ],
        responses=UsageRecordSerializer(many=True),
        summary="Your usage records, newest first (or all of them as CSV)",
    )
    def get(self, request):
        records = usage_list(user=request.user, **_filters(request.query_params))
        if request.accepted_renderer.format == "csv":
            return csv_download(request._request, usage_csv_lines(records), filename="tokentill-usage.csv")
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(records, request, view=self)
        return paginator.get_paginated_response(UsageRecordSerializer(page, many=True).data)


class UsageDetailApi(APIView):
    @extend_schema(responses=UsageRecordSerializer, summary="One of your usage records")
    def get(self, request, usage_id: int):
        record = usage_get(user=request.user, usage_id=usage_id)
        if record is None:
            # Also what a pruned record answers (prune_usage): its charge is still in the ledger.
            raise NotFound(
                "no such usage record; records older than the retention window are pruned, and their "
                "charges stay in /api/wallet/entries (reference: the request id)"
            )
        return Response(UsageRecordSerializer(record).data)


class UsageSummaryApi(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("group_by", str, enum=list(GROUPINGS), description="default: day"),
            *_FILTER_PARAMS,
        ],
        responses=UsageSummarySerializer,
        summary="Your usage totals per day (UTC) or per model",
    )
    def get(self, request):
        group_by = request.query_params.get("group_by") or "day"
        if group_by not in GROUPINGS:
            raise ParseError(f"group_by must be one of: {', '.join(GROUPINGS)}")
        summary = usage_summary(user=request.user, group_by=group_by, **_filters(request.query_params))
        row_serializer = UsageDaySerializer if group_by == "day" else UsageModelSerializer
        return Response(
            {
                "group_by": group_by,
                "results": row_serializer(summary["results"], many=True).data,
                "totals": UsageTotalsSerializer(summary["totals"]).data,
            }
        )


class RunDetailApi(APIView):
    @extend_schema(
        responses=RunSerializer,
        summary="One of your runs (X-Tokentill-Run): steps, spend, requests and tool charges",
        description="The run id is the path's rest, URL-encoded. 404 when you have no such run.",
    )
    def get(self, request, run: str):
        summary = run_summary(user=request.user, run=run)
        if summary is None:
            raise NotFound("no such run")
        return Response(RunSerializer(summary).data)
