"""Whole numbers from outside (ids, limits, counts), read strictly. No Django imports here.

``int()`` is as lax as ``Decimal()``: it reads "٢" and "２" (any Unicode digit), "1_0", "+2" and
" 2\\n", and a JSON 2.0 or 1e30 arrives as a float that ``int()`` would truncate. An id or a limit
is an ``int`` (never a ``bool`` or a float) or a string of ASCII digits, and it must fit the
column it is compared with or stored in.
"""

from __future__ import annotations

import re

MAX_BIGINT = 2**63 - 1  # ids are bigints: a larger number names nothing, and SQLite cannot bind it
MAX_INT = 2**31 - 1  # limits stored or counted as a 32-bit integer (rpm, steps per run)

_DIGITS = re.compile(r"[0-9]+", re.ASCII)


def parse_whole(value: object, *, minimum: int = 0, maximum: int = MAX_BIGINT) -> int:
    """``value`` as an int in ``minimum..maximum``, or ``ValueError`` saying why not."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a whole number")
    if isinstance(value, str):
        # The length check first: int() refuses (and slowly) strings of thousands of digits.
        if not _DIGITS.fullmatch(value) or len(value) > len(str(maximum)):
            raise ValueError(f"{value!r} is not a whole number from {minimum} to {maximum}")
        value = int(value)
    if not minimum <= value <= maximum:
        raise ValueError(f"{value!r} is not a whole number from {minimum} to {maximum}")
    return value


def parse_id(value: object) -> int:
    """A database id (a positive bigint) written as an int or as ASCII digits."""
    return parse_whole(value, minimum=1, maximum=MAX_BIGINT)
