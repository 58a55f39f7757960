"""DRF glue for the account API (``/api``): one error shape, the list endpoints' page shape and
their date filters."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.utils.dateparse import parse_date, parse_datetime
from rest_framework import exceptions
from rest_framework.exceptions import NotFound, ParseError
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response
from rest_framework.views import exception_handler

from core.money import MoneyError


def api_exception_handler(exc, context):
    """One error shape for /api: DRF's ``{"detail": ...}``, also for errors DRF does not raise itself."""
    if isinstance(exc, MoneyError):
        exc = exceptions.ValidationError({"detail": str(exc)})
    response = exception_handler(exc, context)
    if response is not None and isinstance(exc, (Http404, PermissionDenied)):
        response.data = {"detail": str(exc) or response.data.get("detail", "")}
    return response


class ResultsCursorPagination(CursorPagination):
    """``{"results": [...], "next": url|null}``, newest first, ``?limit=`` up to 200.

    A cursor, not page numbers: new rows land at the top while a client pages down, and an
    offset would then show some of them twice. Subclasses set ``ordering``.
    """

    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 200

    def decode_cursor(self, request):
        try:
            return super().decode_cursor(request)
        except NotFound:
            raise ParseError("cursor is not one this API handed out") from None

    def get_paginated_response(self, data):
        return Response({"results": data, "next": self.get_next_link()})

    def get_paginated_response_schema(self, schema):
        return {
            "type": "object",
            "required": ["results", "next"],
            "properties": {"results": schema, "next": {"type": "string", "format": "uri", "nullable": True}},
        }


def parse_instant(raw: str, *, end_of_day: bool = False) -> datetime:
    """A ``since``/``until`` value: a date (a whole UTC day) or an ISO 8601 date-time (UTC if naive).

    ``end_of_day=True`` turns a bare date into the start of the *next* day, so an exclusive
    ``until=2026-01-31`` still includes everything on the 31st. Raises ``ValueError``.
    """
    text = str(raw).strip()
    try:
        # Date first: Python 3.11's fromisoformat would read "2026-01-31" as a midnight datetime.
        day = parse_date(text)
    except ValueError:  # well-formed but impossible, like 2026-13-45
        day = None
    if day is not None:
        start = datetime.combine(day, time.min, tzinfo=UTC)
        return start + timedelta(days=1) if end_of_day else start
    # An unencoded "+01:00" in a query string arrives as " 01:00"; read it as the sender meant.
    for candidate in (text, text.replace(" ", "+")):
        try:
            moment = parse_datetime(candidate)
        except ValueError:
            moment = None
        if moment is not None:
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    raise ValueError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO 8601 date-time (YYYY-MM-DDTHH:MM:SSZ)")
