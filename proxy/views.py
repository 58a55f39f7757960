"""Portal page for usage: the user's proxied requests and what each cost, plus totals per day;
and the same requests as a CSV download."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import HttpResponseBadRequest
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.cache import never_cache

from infra.keyset import BadCursor
from infra.streaming import csv_download

from .usage_selectors import usage_csv_lines, usage_list, usage_page, usage_summary

PAGE_SIZE = 50
SUMMARY_DAYS = 30


def _model(request) -> str | None:
    model = request.GET.get("model", "").strip()[:200] or None
    if model and "\x00" in model:  # no model id has one, and PostgreSQL's text cannot hold it
        raise ValueError("Invalid filter: a model id has no NUL (U+0000) characters.")
    return model


@never_cache
@login_required
def usage(request):
    """Requests newest first, a keyset page at a time ("Newer"/"Older": one indexed read per
    page however many requests there are, no page count)."""
    try:
        model = _model(request)
        page = usage_page(
            user=request.user,
            model=model,
            after=request.GET.get("after") or None,
            before=request.GET.get("before") or None,
            size=PAGE_SIZE,
        )
    except BadCursor:
        return HttpResponseBadRequest("That page link is not one this page wrote.", content_type="text/plain")
    except ValueError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain")
    since = timezone.now() - timedelta(days=SUMMARY_DAYS)
    summary = usage_summary(user=request.user, group_by="day", model=model, since=since)
    context = {
        "page": page,
        "model": model or "",
        "days": list(reversed(summary["results"])),  # newest day first, like the list below
        "totals": summary["totals"],
        "summary_days": SUMMARY_DAYS,
        "page_query": urlencode({"model": model}) if model else "",
    }
    return render(request, "portal/usage.html", context)


@login_required
def usage_csv(request):
    """``/usage.csv``: every request (``?model=`` to narrow), streamed."""
    try:
        model = _model(request)
    except ValueError as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain")
    return csv_download(
        request, usage_csv_lines(usage_list(user=request.user, model=model)), filename="tokentill-usage.csv"
    )
