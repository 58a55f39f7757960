"""A streamed CSV download that keeps memory flat under WSGI and ASGI alike."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, StreamingHttpResponse

LINES_PER_CHUNK = 500


def _chunks(lines: Iterator[str]) -> Iterator[str]:
    while chunk := "".join(itertools.islice(lines, LINES_PER_CHUNK)):
        yield chunk


async def _achunks(lines: Iterator[str]) -> AsyncIterator[str]:
    # Under ASGI, Django reads a synchronous iterator to the end into memory before the first
    # byte goes out; pull each chunk from the database in the request's sync thread instead.
    chunks = _chunks(lines)

    def pull() -> str:
        return next(chunks, "")

    while chunk := await sync_to_async(pull, thread_sensitive=True)():
        yield chunk


def csv_download(request: HttpRequest, lines: Iterator[str], *, filename: str) -> StreamingHttpResponse:
    """``lines`` (CSV text, header first) as an attachment, sent a chunk at a time as it is read."""
    asgi = isinstance(request, ASGIRequest)
    response = StreamingHttpResponse(
        _achunks(lines) if asgi else _chunks(lines), content_type="text/csv; charset=utf-8"
    )
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["Cache-Control"] = "no-store"
    return response
