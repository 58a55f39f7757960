"""Portal page for usage: the user's proxied requests and what each cost, plus totals per day."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpResponseBadRequest
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.cache import never_cache

from .usage_selectors import usage_list, usage_summary

PAGE_SIZE = 50
SUMMARY_DAYS = 30


@never_cache
@login_required
def usage(request):
    model = request.GET.get("model", "").strip()[:200] or None
    if model and "\x00" in model:  # no model id has one, and PostgreSQL's text cannot hold it
        message = "Invalid filter: a model id has no NUL (U+0000) characters."
        return HttpResponseBadRequest(message, content_type="text/plain")
    since = timezone.now() - timedelta(days=SUMMARY_DAYS)
    page = Paginator(usage_list(user=request.user, model=model), PAGE_SIZE).get_page(request.GET.get("page"))
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
