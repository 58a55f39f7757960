"""Keyset ("seek") pagination and chunked reads, newest first, for every list of usage records or
ledger entries a person or an export reads (portal, organization and staff pages, CSV exports).

A page starts *below* the last row the reader saw, named by its sort key, not at an offset: the
database seeks to it in an index (``(owner, created_at, id)`` for usage records, ``(wallet, id)``
for entries) and reads one page, however deep; rows that arrive meanwhile land above it and
shift nothing. Nothing here counts the whole list.

Two orders exist: by id (the ledger's append order) and by ``(created_at, id)`` (usage records,
whose id order can differ from their time order by a little). The condition for "after (t, i)"
is written ``created_at <= t AND (created_at < t OR id < i)`` rather than a row comparison: the
first term is the index range both databases seek on, the second drops the few rows of the same
instant already shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import Q, QuerySet

_MICROSECOND = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_DIGITS = 18  # a bigint; anything longer names no row (and SQLite could not compare it)


class BadCursor(ValueError):
    """A page cursor that this list never wrote."""


@dataclass(frozen=True)
class Keyset:
    """A newest-first order and how its cursors read and write.

    ``fields`` is ``("id",)`` or ``("created_at", "id")``; the cursor is the id, or the instant in
    epoch microseconds and the id (``"1765080000123456.42"``).
    """

    fields: tuple[str, ...]

    @property
    def ordering(self) -> list[str]:
        return [f"-{name}" for name in self.fields]

    def cursor(self, row: Any) -> str:
        """The cursor naming ``row`` (a model instance or a ``.values()`` dict)."""
        values = self.key(row)
        if len(values) == 1:
            return str(values[0])
        return f"{(values[0] - _EPOCH) // _MICROSECOND}.{values[1]}"

    def parse(self, raw: str) -> tuple:
        parts = raw.split(".") if len(self.fields) == 2 else [raw]
        if len(parts) != len(self.fields) or not all(p.isdigit() and len(p) <= _MAX_DIGITS for p in parts):
            raise BadCursor(raw)
        if len(parts) == 1:
            return (int(parts[0]),)
        return (_EPOCH + int(parts[0]) * _MICROSECOND, int(parts[1]))

    def below(self, key: tuple) -> Q:
        """Rows after ``key`` in this (newest-first) order."""
        if len(key) == 1:
            return Q(pk__lt=key[0])
        return Q(**{f"{self.fields[0]}__lte": key[0]}) & (Q(**{f"{self.fields[0]}__lt": key[0]}) | Q(pk__lt=key[1]))

    def above(self, key: tuple) -> Q:
        """Rows before ``key`` in this order (newer)."""
        if len(key) == 1:
            return Q(pk__gt=key[0])
        return Q(**{f"{self.fields[0]}__gte": key[0]}) & (Q(**{f"{self.fields[0]}__gt": key[0]}) | Q(pk__gt=key[1]))

    def key(self, row: Any) -> tuple:
        """The sort key of ``row`` (a model instance or a ``.values()`` dict)."""
        return tuple(row[name] if isinstance(row, dict) else getattr(row, name) for name in self.fields)


BY_ID = Keyset(fields=("id",))
BY_TIME = Keyset(fields=("created_at", "id"))


@dataclass(frozen=True)
class Page:
    rows: list
    older: str | None  # cursor for the next page down (``?after=``), None on the last page
    newer: str | None  # cursor for the page above (``?before=``), None on the first page

    @property
    def first(self) -> bool:
        return self.newer is None


def keyset_page(
    rows: QuerySet, *, keyset: Keyset, size: int, after: str | None = None, before: str | None = None
) -> Page:
    """One page of ``rows`` in ``keyset``'s order: the first, the one below the cursor ``after``,
    or the one above the cursor ``before``. Raises ``BadCursor`` for a cursor it did not write.

    One query per page (two when a ``before`` page reaches the top: it is then the first page,
    read afresh, so it is full even when rows arrived above).
    """
    if before:
        key = keyset.parse(before)
        upward = list(rows.filter(keyset.above(key)).order_by(*keyset.fields)[: size + 1])
        if len(upward) <= size:
            return keyset_page(rows, keyset=keyset, size=size)
        found = list(reversed(upward[:size]))
        return Page(found, keyset.cursor(found[-1]), keyset.cursor(found[0]))
    if after:
        rows = rows.filter(keyset.below(keyset.parse(after)))
    found = list(rows.order_by(*keyset.ordering)[: size + 1])
    more = len(found) > size
    found = found[:size]
    older = keyset.cursor(found[-1]) if more else None
    newer = keyset.cursor(found[0]) if after and found else None
    return Page(found, older, newer)


def keyset_chunks(rows: QuerySet, *, keyset: Keyset, size: int) -> Iterator[list]:
    """Every row of ``rows`` (a ``.values()`` or model queryset) in ``keyset``'s order, as lists of
    at most ``size``: each one bounded query that seeks below the last row of the one before.

    This, not ``QuerySet.iterator()``, is how an export of a million rows keeps constant memory
    on every setup: ``iterator()`` relies on a server-side cursor on PostgreSQL, which a
    transaction-mode pooler (PgBouncer) forbids (``DISABLE_SERVER_SIDE_CURSORS``), and without
    one psycopg fetches the whole result into the client. Each chunk is also a short read, so an
    export that a slow client drains for minutes holds no snapshot open that long.
    """
    ordered = rows.order_by(*keyset.ordering)
    chunk = list(ordered[:size])
    while chunk:
        yield chunk
        if len(chunk) < size:
            return
        chunk = list(ordered.filter(keyset.below(keyset.key(chunk[-1])))[:size])
