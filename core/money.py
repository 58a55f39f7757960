"""Money: integer nanodollars inside, 9-place decimal strings at the edges.

No Django imports here. ``1 USD = 10**9 nanodollars``. Every conversion from a fractional value
rounds half-up explicitly; floats are refused outright because a float cannot say what amount
its author meant (0.1 is not one tenth).
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

NANOS_PER_USD = 10**9
MAX_DIGITS_USD = 13  # amounts from 10¹³ USD up are refused: nanodollars live in a 64-bit integer
_NANO = Decimal(1).scaleb(-9)
# What an amount from outside may look like: ASCII digits with at most one dot, and a leading minus
# for the callers that accept one (a staff correction). Python's Decimal() is far laxer — it reads
# "١٠" and "０.０１" (any Unicode digit), "1_0", "+0.01", "1e3", and strips surrounding whitespace
# (a non-breaking space, a newline) — so the form is checked before Decimal() sees the text.
_AMOUNT_TEXT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)


class MoneyError(ValueError):
    """An amount that cannot be understood as US dollars."""


def _as_decimal(value: object) -> Decimal:
    if isinstance(value, bool) or isinstance(value, float):
        raise MoneyError(f"refusing {type(value).__name__} {value!r} as money: use a decimal string")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except InvalidOperation:
            raise MoneyError(f"{value!r} is not a decimal amount") from None
    else:
        raise MoneyError(f"refusing {type(value).__name__} as money")
    if not result.is_finite():
        raise MoneyError(f"{value!r} is not a finite amount")
    if result and result.adjusted() >= MAX_DIGITS_USD:
        # Before any arithmetic: "1e999990" would otherwise become a million-digit integer (and
        # seconds of CPU) on its way to a bigint it can never fit.
        raise MoneyError(f"{value!r} is too large to be an amount of money")
    return result


def usd_to_nanos(value: Decimal | str | int) -> int:
    """Dollars (Decimal, decimal string or whole int dollars) → nanodollars, half-up."""
    return int((_as_decimal(value) * NANOS_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


def parse_usd(value: object, *, max_places: int = 9) -> int:
    """Parse an amount from outside strictly: a decimal string of ASCII digits with at most one dot
    (``"12.5"``, ``"-3"``, ``".5"``) and at most ``max_places`` decimals, or an ``int``/``Decimal``
    from our own code. No floats, no exponent, no ``+``, no whitespace, no other script's digits:
    whoever takes text from a person strips it first (Django's form fields do)."""
    if isinstance(value, str) and not _AMOUNT_TEXT.fullmatch(value):
        raise MoneyError(f'{value!r} is not a decimal amount: write ASCII digits with at most one dot, like "0.01"')
    amount = _as_decimal(value)
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -max_places:
        raise MoneyError(f"{value!r} has more than {max_places} decimal places")
    return usd_to_nanos(amount)


def nanos_to_decimal(nanos: int) -> Decimal:
    if not isinstance(nanos, int) or isinstance(nanos, bool):
        raise MoneyError(f"nanodollar amounts are ints, not {type(nanos).__name__}")
    return (Decimal(nanos) * _NANO).quantize(_NANO)


def format_usd(nanos: int) -> str:
    """12345678901 → "12.345678901" (always 9 places, sign kept)."""
    return f"{nanos_to_decimal(nanos):.9f}"


SHOWN_PLACES = 6  # what people read; the exact 9 places go in a title or an export
_SHOWN = Decimal(1).scaleb(-SHOWN_PLACES)


def format_money(nanos: int) -> str:
    """The one display rule for an amount, on every page: dollars half-up to at most
    ``SHOWN_PLACES`` decimals, trailing zeros trimmed down to cents, thousands separated.

    12_345_678_901 → "$12.345679", 12_340_000_000 → "$12.34", 139_000 → "$0.000139",
    -5_000_000 → "-$0.005". Rounding to cents would show a $0.000139 request as "$0.00"; a
    non-zero amount too small even for six places (under half a micro-dollar) is shown whole, to
    the nanodollar ("$0.000000139"), so nothing that is not zero ever reads as zero.
    """
    exact = nanos_to_decimal(nanos)
    shown = exact.quantize(_SHOWN, rounding=ROUND_HALF_UP)
    if not shown and nanos:
        shown = exact
    places = max(2, len(f"{shown:f}".partition(".")[2].rstrip("0")))
    sign = "-" if shown < 0 else ""
    return f"{sign}${abs(shown):,.{places}f}"


def mul_round(nanos_or_decimal: Decimal | int, factor: Decimal | int) -> int:
    """``round_half_up(a × b)`` to a whole nanodollar; used for cost × (1 + markup)."""
    product = _as_decimal(nanos_or_decimal) * _as_decimal(factor)
    return int(product.to_integral_value(rounding=ROUND_HALF_UP))


def loads_decimal(raw: bytes | str) -> object:
    """Parse JSON from an upstream or provider with every number as Decimal, never float."""
    return json.loads(raw, parse_float=Decimal)
