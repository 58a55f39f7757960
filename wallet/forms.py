"""Portal forms for the wallet's own settings."""

from __future__ import annotations

from django import forms

from core.money import format_usd

from .alerts import InvalidThreshold, threshold_parse


class NotificationSettingsForm(forms.Form):
    """The low-balance threshold (a money string, strictly) and which emails to get."""

    threshold = forms.CharField(
        required=False,
        max_length=30,
        label="Low-balance threshold (USD)",
        help_text="Email me when my balance falls below this amount, e.g. 5 or 2.50. Leave empty for the "
        "default; 0 turns the low-balance email off.",
        widget=forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"}),
    )
    email_low_balance = forms.BooleanField(required=False, label="Balance below my threshold")
    email_depleted = forms.BooleanField(required=False, label="Balance used up (requests are refused)")
    email_payments = forms.BooleanField(required=False, label="Payments received, refunded or failed")
    email_subscription = forms.BooleanField(required=False, label="Subscription renewals")

    EMAIL_FIELDS = ("email_low_balance", "email_depleted", "email_payments", "email_subscription")

    @classmethod
    def initial_for(cls, *, threshold: int | None, preference) -> dict:
        initial = {name: getattr(preference, name) for name in cls.EMAIL_FIELDS}
        initial["threshold"] = "" if threshold is None else format_usd(threshold).rstrip("0").rstrip(".")
        return initial

    def clean_threshold(self) -> int | None:
        try:
            return threshold_parse(self.cleaned_data.get("threshold", ""))
        except InvalidThreshold as exc:
            raise forms.ValidationError(str(exc)) from None

    def emails(self) -> dict[str, bool]:
        return {name: self.cleaned_data[name] for name in self.EMAIL_FIELDS}
