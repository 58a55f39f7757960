"""Staff views of the ledger. Everything here is read-only; the one write is a correction.

Wallets are never edited through a form: saving the admin's copy of a wallet row would write back
a balance read seconds earlier over whatever settled since. A balance is changed only by posting
a correction entry through ``wallet_correct`` (amount, mandatory reason, the staff member who made
it). Entries cannot be added, changed or deleted here — nor anywhere else (see migration 0002).
"""

from __future__ import annotations

import uuid

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from core.money import format_usd
from infra.forms import MoneyField
from infra.money_html import money_html

from .models import Entry, Hold, HoldStatus, Wallet
from .services import WalletError, wallet_correct

RECENT_ENTRIES = 10


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class CorrectionForm(forms.Form):
    amount = MoneyField(
        sign="non_zero",
        sign_message="A correction cannot be zero.",
        label="Amount (USD)",
        help_text="Signed decimal: 2.50 adds money, -2.50 takes it away. Up to 9 decimal places.",
    )
    reason = forms.CharField(
        max_length=500, widget=forms.Textarea(attrs={"rows": 3}), help_text="Shown in the ledger; required."
    )
    # One token per rendered form: submitting the same form twice posts one correction.
    token = forms.UUIDField(widget=forms.HiddenInput)

    def clean_reason(self):
        reason = self.cleaned_data["reason"].strip()
        if not reason:
            raise forms.ValidationError("Say why: the reason is kept in the ledger.")
        return reason


@admin.register(Wallet)
class WalletAdmin(ReadOnlyAdmin):
    list_display = ["user", "organization", "balance_usd", "held_usd", "available_usd", "currency", "updated_at"]
    list_select_related = ["user", "organization"]
    search_fields = ["user__email", "organization__name", "organization__slug"]
    ordering = ["-updated_at"]
    fields = [
        "user",
        "organization",
        "balance_usd",
        "held_usd",
        "available_usd",
        "currency",
        "updated_at",
        "recent_entries",
        "active_holds",
    ]
    readonly_fields = fields
    change_form_template = "admin/wallet/wallet/change_form.html"

    @admin.display(description="balance (USD)", ordering="balance")
    def balance_usd(self, wallet):
        return money_html(wallet.balance)

    @admin.display(description="held (USD)", ordering="held")
    def held_usd(self, wallet):
        return money_html(wallet.held)

    @admin.display(description="available (USD)")
    def available_usd(self, wallet):
        return money_html(wallet.available)

    @admin.display(description="recent entries")
    def recent_entries(self, wallet):
        entries = wallet.entries.order_by("-id")[:RECENT_ENTRIES]
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    e.get_kind_display(),
                    money_html(e.amount),
                    money_html(e.balance_after),
                    e.description,
                )
                for e in entries
            ),
        )
        link = reverse("admin:wallet_entry_changelist") + f"?wallet__id__exact={wallet.pk}"
        return format_html(
            "<table><tr><th>when</th><th>kind</th><th>amount</th><th>balance after</th><th>description</th></tr>"
            '{}</table><p><a href="{}">All entries of this wallet</a></p>',
            rows,
            link,
        )

    @admin.display(description="active holds")
    def active_holds(self, wallet):
        holds = wallet.holds.filter(status=HoldStatus.ACTIVE).order_by("expires_at")
        link = reverse("admin:wallet_hold_changelist") + f"?wallet__id__exact={wallet.pk}"
        items = format_html_join(
            "", "<li>{} — {} until {}</li>", ((h.request_id, money_html(h.amount), h.expires_at) for h in holds)
        )
        return format_html('<ul>{}</ul><p><a href="{}">All holds of this wallet</a></p>', items or "none", link)

    def has_correct_permission(self, request) -> bool:
        # Changing a balance is what "change wallet" means; the row itself is never edited.
        return request.user.is_active and request.user.is_staff and request.user.has_perm("wallet.change_wallet")

    def get_urls(self):
        correct = self.admin_site.admin_view(self.correct_view)
        return [path("<int:wallet_id>/correct/", correct, name="wallet_wallet_correct"), *super().get_urls()]

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), "can_correct": self.has_correct_permission(request)}
        return super().change_view(request, object_id, form_url, extra_context)

    def correct_view(self, request, wallet_id: int):
        if not self.has_correct_permission(request):
            raise PermissionDenied
        wallet = get_object_or_404(Wallet.objects.select_related("user"), pk=wallet_id)
        form = CorrectionForm(request.POST or None, initial={"token": uuid.uuid4()})
        if request.method == "POST" and form.is_valid():
            amount = form.cleaned_data["amount"]
            try:
                posted = wallet_correct(
                    wallet=wallet,
                    amount=amount,
                    reason=form.cleaned_data["reason"],
                    staff_user=request.user,
                    idempotency_key=f"correction:{form.cleaned_data['token']}",
                )
            except WalletError as exc:
                form.add_error(None, str(exc))
            else:
                entry = posted.entry
                if posted.replayed:
                    messages.warning(request, "That correction was already recorded; nothing was posted twice.")
                else:
                    self.log_change(request, wallet, f"Correction {format_usd(amount)} USD: {entry.description}")
                    messages.success(
                        request,
                        f"Posted a correction of {format_usd(amount)} USD to {wallet.owner}. "
                        f"Balance is now {format_usd(entry.balance_after)} USD.",
                    )
                return HttpResponseRedirect(reverse("admin:wallet_wallet_change", args=[wallet.pk]))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Correct the balance of {wallet.owner}",
            "wallet": wallet,
            "balance": format_usd(wallet.balance),
            "available": format_usd(wallet.available),
            "form": form,
        }
        return TemplateResponse(request, "admin/wallet/wallet/correct.html", context)


@admin.register(Entry)
class EntryAdmin(ReadOnlyAdmin):
    list_display = ["id", "created_at", "user", "kind", "amount_usd", "balance_after_usd", "reference", "description"]
    list_filter = ["kind", "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["reference", "wallet__user__email"]
    list_select_related = ["wallet__user", "wallet__organization"]
    fields = [
        "id",
        "created_at",
        "wallet",
        "kind",
        "amount_usd",
        "balance_after_usd",
        "idempotency_key",
        "reference",
        "description",
        "metadata",
        "created_by",
    ]
    readonly_fields = fields

    @admin.display(description="amount (USD)", ordering="amount")
    def amount_usd(self, entry):
        return money_html(entry.amount)

    @admin.display(description="balance after (USD)")
    def balance_after_usd(self, entry):
        return money_html(entry.balance_after)

    @admin.display(description="owner", ordering="wallet__user__email")
    def user(self, entry):
        return entry.wallet.owner


@admin.register(Hold)
class HoldAdmin(ReadOnlyAdmin):
    list_display = ["request_id", "user", "amount_usd", "status", "created_at", "expires_at", "closed_at"]
    list_filter = ["status", "created_at"]
    search_fields = ["request_id", "wallet__user__email"]
    list_select_related = ["wallet__user", "wallet__organization"]
    fields = [
        "request_id",
        "wallet",
        "amount_usd",
        "status",
        "description",
        "metadata",
        "created_at",
        "expires_at",
        "closed_at",
    ]
    readonly_fields = fields

    @admin.display(description="amount (USD)", ordering="amount")
    def amount_usd(self, hold):
        return money_html(hold.amount)

    @admin.display(description="owner", ordering="wallet__user__email")
    def user(self, hold):
        return hold.wallet.owner
