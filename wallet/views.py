"""Portal pages for the wallet: the home page (balance, recent entries), the ledger history, and the
notification settings (the low-balance threshold lives on the wallet; the email choices in notify)."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache

from infra.keyset import BadCursor
from infra.streaming import csv_download
from notify.services import preference_get

from . import alerts
from .alerts import alert_settings_save
from .forms import NotificationSettingsForm
from .models import EntryKind
from .selectors import WalletStatus, entries_csv_lines, entry_list, entry_page, wallet_summary
from .services import wallet_get_or_create

RECENT_ENTRIES = 10
LAST_DAY = date(9999, 1, 1)
HISTORY_PAGE_SIZE = 50


def start_of_day(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=timezone.get_current_timezone())


class HistoryFilter(forms.Form):
    kind = forms.ChoiceField(choices=[("", "All kinds"), *EntryKind.choices], required=False)
    since = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))

    def clean_until(self):
        # "To" is a whole day, so the filter ends at the next midnight: the last day Python has
        # (9999-12-31) has none. The API's bounds (infra.drf.parse_instant) apply here too.
        until = self.cleaned_data.get("until")
        if until is not None and until >= LAST_DAY:
            raise forms.ValidationError(f"Choose a date before {LAST_DAY:%Y-%m-%d}.", code="out_of_range")
        return until

    def selector_filters(self) -> dict:
        """The filters for ``entry_list``; ``until`` is a whole day, so it ends at the next midnight."""
        data = self.cleaned_data if self.is_valid() else {}
        since, until = data.get("since"), data.get("until")
        return {
            "kind": data.get("kind") or None,
            "since": start_of_day(since) if since else None,
            "until": start_of_day(until + timedelta(days=1)) if until else None,
        }

    def query_string(self) -> str:
        data = self.cleaned_data if self.is_valid() else {}
        return urlencode({name: value for name, value in data.items() if value})


@never_cache
@login_required
def home(request):
    summary = wallet_summary(user=request.user)
    context = {
        "wallet": summary,
        "low": summary.status in (WalletStatus.LOW, WalletStatus.BLOCKED),
        "blocked": summary.status == WalletStatus.BLOCKED,
        "entries": entry_list(user=request.user)[:RECENT_ENTRIES],
    }
    return render(request, "portal/home.html", context)


@never_cache
@login_required
def history(request):
    """The ledger, newest first, a keyset page at a time: "Older" continues below the last entry
    shown and "Newer" goes back up, each one indexed read however long the history is (no page
    numbers: they would cost an OFFSET and a COUNT over the whole history)."""
    filters = HistoryFilter(request.GET or None)
    if filters.errors:
        page = None
    else:
        try:
            page = entry_page(
                user=request.user,
                after=request.GET.get("after") or None,
                before=request.GET.get("before") or None,
                size=HISTORY_PAGE_SIZE,
                **filters.selector_filters(),
            )
        except BadCursor:
            return HttpResponseBadRequest("That page link is not one this page wrote.", content_type="text/plain")
    context = {"filters": filters, "page": page, "query": filters.query_string()}
    return render(request, "portal/history.html", context)


@login_required
def history_csv(request):
    filters = HistoryFilter(request.GET or None)
    if filters.errors:  # an export must never silently widen to the whole history
        reasons = "; ".join(f"{name}: {' '.join(errors)}" for name, errors in filters.errors.items())
        return HttpResponseBadRequest(f"Invalid filter: {reasons}", content_type="text/plain")
    entries = entry_list(user=request.user, **filters.selector_filters())
    return csv_download(request, entries_csv_lines(entries), filename="tokentill-history.csv")


@never_cache
@login_required
def notification_settings(request):
    """``/settings/notifications``: the low-balance threshold and which emails the user gets."""
    wallet = wallet_get_or_create(user=request.user)
    preference = preference_get(user=request.user)
    if request.method == "POST":
        form = NotificationSettingsForm(request.POST)
        if form.is_valid():
            alert_settings_save(user=request.user, threshold=form.cleaned_data["threshold"], emails=form.emails())
            messages.success(request, "Notification settings saved.")
            return redirect("portal:notification_settings")
    else:
        form = NotificationSettingsForm(
            initial=NotificationSettingsForm.initial_for(threshold=wallet.low_balance_threshold, preference=preference)
        )
    context = {
        "form": form,
        "default_threshold": alerts.lines()[0],
        "threshold_in_force": alerts.threshold_in_force(wallet.low_balance_threshold),
    }
    return render(request, "portal/notification_settings.html", context, status=400 if form.errors else 200)
