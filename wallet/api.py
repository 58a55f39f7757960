"""/api/wallet and /api/wallet/entries: a user's own wallet and ledger history (DRF).

The entry list answers JSON pages (cursor-paginated, newest first) or, for ``Accept: text/csv``
or ``?format=csv``, the *whole* filtered history streamed as CSV.
"""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, generics
from rest_framework.response import Response
from rest_framework.views import APIView

from infra.drf import CSVOrJSON, ResultsCursorPagination
from infra.streaming import csv_download

from .selectors import entries_csv_lines, entry_get, entry_list, wallet_summary
from .serializers import EntryFilterSerializer, EntrySerializer, WalletSerializer


class EntryCursorPagination(ResultsCursorPagination):
    ordering = "-id"  # ids only grow, so newest first and a cursor never skips or repeats a row


class WalletApi(APIView):
    @extend_schema(operation_id="wallet_get", responses=WalletSerializer)
    def get(self, request):
        return Response(WalletSerializer(wallet_summary(user=request.user)).data)


class EntryListApi(CSVOrJSON, generics.ListAPIView):
    serializer_class = EntrySerializer
    pagination_class = EntryCursorPagination
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
            return csv_download(
                request._request, entries_csv_lines(self.get_queryset()), filename="tokentill-entries.csv"
            )
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
