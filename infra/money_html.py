"""Money in HTML: the one display rule (``core.money.format_money``) with the exact amount, to the
nanodollar, in a ``title`` that browsers show on hover. Admin columns, the staff pages, the
dashboard and the portal's templates (the ``money`` filter) all render amounts through here."""

from __future__ import annotations

from django.utils.html import format_html
from django.utils.safestring import SafeString

from core.money import format_money, format_usd


def money_html(nanos: int | None) -> SafeString:
    """``139_000`` → ``<span class="money" title="0.000139000">$0.000139</span>``."""
    amount = int(nanos or 0)
    return format_html('<span class="money" title="{}">{}</span>', format_usd(amount), format_money(amount))
