"""Form fields shared by the apps' admin and portal forms."""

from __future__ import annotations

from django import forms

from core.money import MoneyError, format_usd, parse_usd

_SIGN_RULES = {
    "positive": (lambda nanos: nanos > 0, "Must be more than zero."),
    "non_negative": (lambda nanos: nanos >= 0, "Must not be negative."),
    "non_zero": (lambda nanos: nanos != 0, "Cannot be zero."),
}


class MoneyField(forms.CharField):
    """US dollars typed by a person, cleaned to integer nanodollars.

    Parsed by ``core.money.parse_usd`` — the one strict parser for money from outside, never
    through a float, at most 9 decimal places — and checked against ``sign``: ``"positive"``,
    ``"non_negative"`` or ``"non_zero"`` (a staff correction may take money away). An initial
    value in nanodollars is shown as a 9-place decimal string.
    """

    def __init__(self, *, sign: str = "positive", sign_message: str | None = None, **kwargs):
        self.sign_check, default_message = _SIGN_RULES[sign]
        self.sign_message = sign_message or default_message
        super().__init__(**kwargs)

    def prepare_value(self, value):
        if isinstance(value, int) and not isinstance(value, bool):
            return format_usd(value)
        return super().prepare_value(value)

    def to_python(self, value) -> int | None:  # type: ignore[override]
        text = super().to_python(value)
        if text in self.empty_values:
            return None
        try:
            nanos = parse_usd(text)
        except MoneyError as exc:
            raise forms.ValidationError(str(exc), code="invalid") from None
        if not self.sign_check(nanos):
            raise forms.ValidationError(self.sign_message, code="sign")
        return nanos
