"""Template filters for money. Amounts are integer nanodollars; the portal shows cents."""

from decimal import ROUND_HALF_UP, Decimal

from django import template

from core.money import format_cents, format_usd

register = template.Library()


@register.filter
def cents(nanos: int | None) -> str:
    """12345678901 → "$12.35" (display only, half-up)."""
    return format_cents(int(nanos or 0))


@register.filter
def usd9(nanos: int | None) -> str:
    """The exact amount, 9 places, for tooltips and CSV-like precision."""
    return format_usd(int(nanos or 0))


@register.filter
def usd_rate(value: Decimal | None, places: int = 6) -> str:
    """A Decimal USD figure (an upstream cost) to ``places`` decimals, half-up; blank if unknown."""
    if value is None:
        return "—"
    return f"${Decimal(value).quantize(Decimal(1).scaleb(-int(places)), rounding=ROUND_HALF_UP)}"
