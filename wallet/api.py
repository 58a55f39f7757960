"""/api/wallet and /api/wallet/entries: a user's own wallet and ledger history (DRF).

The entry list answers JSON pages (cursor-paginated, newest first) or, for ``Accept: text/csv``
or ``?format=csv``, the *whole* filtered history streamed as CSV.
"""

from __future__ import annotations

import itertools

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import Http404, StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, generics
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from infra.drf import ResultsCursorPagination

from .selectors import entries_csv_lines, entry_get, entry_list, wallet_summary
from .serializers import EntryFilterSerializer, EntrySerializer, WalletSerializer

CSV_LINES_PER_CHUNK = 500


class CSVRenderer(BaseRenderer):
    """Lets content negotiation pick CSV for ``Accept: text/csv`` and for ``?format=csv`` (DRF's own
    format override, which answers 404 for a format no renderer claims)."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        # The export view streams its lines itself; this path serves a caller that passes the
        # lines (an iterable of strings) to be rendered in one piece.
        return "".join(data).encode(self.charset)


class EntryCursorPagination(ResultsCursorPagination):
    ordering = "-id"  # ids only grow, so newest first and a cursor never skips or repeats a row


class WalletApi(APIView):
    @extend_schema(operation_id="wallet_get", responses=WalletSerializer)
    def get(self, request):
        return Response(WalletSerializer(wallet_summary(user=request.user)).data)


def _chunks(lines):
    while chunk := "".join(itertools.islice(lines, CSV_LINES_PER_CHUNK)):
        yield chunk


async def _achunks(lines):
    # Under ASGI a synchronous iterator would be read to the end into memory before the first
    # byte goes out; pull each chunk from the database in the request's sync thread instead.
    chunks = _chunks(lines)
    while chunk := await sync_to_async(next, thread_sensitive=True)(chunks, ""):
        yield chunk


class EntryListApi(generics.ListAPIView):
    serializer_class = EntrySerializer
    pagination_class = EntryCursorPagination
    renderer_classes = [*api_settings.DEFAULT_RENDERER_CLASSES, CSVRenderer]
    filters: dict

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        # Blank parameters (``?kind=&since=``) mean "no filter".
        params = {name: value for name, value in request.query_params.items() if value != ""}
        filters = EntryFilterSerializer(data=params)
        if not filters.is_valid():
            detail = "; ".join(f"{name}: {' '.join(map(str, errors))}" for name, errors in filters.errors.items())
            raise exceptions.ValidationError({"detail": detail, **filters.errors})
        self.filters = filters.validated_data

    def handle_exception(self, exc):
        # Errors stay JSON even when the client asked for CSV.
        request = self.request
        if getattr(getattr(request, "accepted_renderer", None), "format", None) == "csv":
            request.accepted_renderer, request.accepted_media_type = JSONRenderer(), "application/json"
        return super().handle_exception(exc)

    def get_queryset(self):
        return entry_list(user=self.request.user, **self.filters)

    @extend_schema(
        operation_id="wallet_entries_list",
        parameters=[
            EntryFilterSerializer,
            OpenApiParameter("format", str, enum=["csv"], description="csv: the whole filtered history as CSV"),
        ],
        responses={200: EntrySerializer(many=True), 400: OpenApiResponse(description="bad kind or date")},
    )
    def get(self, request, *args, **kwargs):
        if request.accepted_renderer.format == "csv":
            lines = entries_csv_lines(self.get_queryset())
            asgi = isinstance(request._request, ASGIRequest)
            response = StreamingHttpResponse(
                _achunks(lines) if asgi else _chunks(lines), content_type="text/csv; charset=utf-8"
            )
            response["Content-Disposition"] = 'attachment; filename="tokentill-entries.csv"'
            return response
        return self.list(request, *args, **kwargs)


class EntryDetailApi(generics.RetrieveAPIView):
    serializer_class = EntrySerializer

    def get_object(self):
        entry = entry_get(user=self.request.user, entry_id=self.kwargs["entry_id"])
        if entry is None:
            raise Http404("no such entry")
        return entry

    @extend_schema(operation_id="wallet_entries_get")
    def get(self, request, *args, **kwargs):
        return self.retrieve(request, *args, **kwargs)
