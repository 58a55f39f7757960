"""Template filters for money. Amounts are integer nanodollars, shown by one rule everywhere
(``core.money.format_money``: up to six decimals, never rounded to a misleading "$0.00")."""

from django import template
from django.utils.safestring import SafeString

from core.money import format_money, format_usd
from infra.money_html import money_html

register = template.Library()


@register.filter
def money(nanos: int | None) -> SafeString:
    """The amount as shown, the exact 9 places in its ``title``: for a cell or a line of text."""
    return money_html(nanos)


@register.filter
def usd(nanos: int | None) -> str:
    """The amount as shown, text only: where the element carries the exact figure itself (a
    ``title`` that the live balance script also rewrites)."""
    return format_money(int(nanos or 0))


@register.filter
def usd9(nanos: int | None) -> str:
    """The exact amount, 9 places, for tooltips and CSV-like precision."""
    return format_usd(int(nanos or 0))
