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
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response
from rest_framework.settings import api_settings
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


class CSVOrJSON:
    """For a list view that also answers CSV (``Accept: text/csv`` or ``?format=csv``): the
    renderers, and errors that stay JSON when the client asked for CSV."""

    renderer_classes = [*api_settings.DEFAULT_RENDERER_CLASSES, CSVRenderer]

    def handle_exception(self, exc):
        request = self.request  # type: ignore[attr-defined]
        if getattr(getattr(request, "accepted_renderer", None), "format", None) == "csv":
            request.accepted_renderer, request.accepted_media_type = JSONRenderer(), "application/json"
        return super().handle_exception(exc)  # type: ignore[misc]


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


# The instants a filter may name. Python's datetime reaches year 9999, but the day after
# 9999-12-31 does not exist and an offset such as +23:00 (which PostgreSQL refuses beyond ±15:59)
# can push year 1 below datetime.min; inside these bounds every instant converts to UTC, moves a
# day forward and is stored by both databases.
EARLIEST_INSTANT = datetime(1, 1, 2, tzinfo=UTC)
LATEST_INSTANT = datetime(9999, 1, 1, tzinfo=UTC)


def parse_instant(raw: str, *, end_of_day: bool = False) -> datetime:
    """A ``since``/``until`` value: a date (a whole UTC day) or an ISO 8601 date-time (UTC if naive),
    returned in UTC, from ``EARLIEST_INSTANT`` to ``LATEST_INSTANT``.

    ``end_of_day=True`` turns a bare date into the start of the *next* day, so an exclusive
    ``until=2026-01-31`` still includes everything on the 31st. Raises ``ValueError``.
    """
    moment = _instant(str(raw).strip(), end_of_day=end_of_day)
    if not EARLIEST_INSTANT <= moment <= LATEST_INSTANT:
        raise ValueError(f"{str(raw).strip()!r} is out of range: dates run from 0001-01-02 to 9998-12-31")
    return moment


def _instant(text: str, *, end_of_day: bool) -> datetime:
    out_of_range = ValueError(f"{text!r} is out of range: dates run from 0001-01-02 to 9998-12-31")
    try:
        # Date first: Python 3.11's fromisoformat would read "2026-01-31" as a midnight datetime.
        day = parse_date(text)
    except ValueError:  # well-formed but impossible, like 2026-13-45
        day = None
    if day is not None:
        start = datetime.combine(day, time.min, tzinfo=UTC)
        try:
            return start + timedelta(days=1) if end_of_day else start
        except OverflowError:
            raise out_of_range from None
    # An unencoded "+01:00" in a query string arrives as " 01:00"; read it as the sender meant.
    for candidate in (text, text.replace(" ", "+")):
        try:
            moment = parse_datetime(candidate)
        except ValueError:
            moment = None
        if moment is not None:
            try:
                return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
            except OverflowError:
                raise out_of_range from None
    raise ValueError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO 8601 date-time (YYYY-MM-DDTHH:MM:SSZ)")


def query_text(params, name: str) -> str | None:
    """A free-text query parameter (a model id, a run), blank meaning "no filter". NUL is refused:
    PostgreSQL's text cannot hold it, and no stored value contains one."""
    value = params.get(name) or None
    if value is not None and "\x00" in value:
        raise ParseError(f"{name} must not contain NUL (U+0000) characters")
    return value
