"""Typed reads from a provider's JSON payload, each failure a ``MalformedEvent`` naming the field.

No Django. ``load_json`` parses with ``core.money.loads_decimal``: JSON integers arrive as
``int`` and every other number as ``Decimal``, so "an amount in cents" can insist on an integer
and a ``10.5`` or ``"1000"`` is refused instead of being rounded or coerced.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, overload

from core.money import loads_decimal

from .errors import MalformedEvent

MAX_ID_LENGTH = 200  # the widest id column we store (payments, webhook events)
MAX_TEXT_LENGTH = 500
# 10**11 cents is a billion dollars: far above any credit pack, far below what a BigIntegerField
# of nanodollars holds (9.2 × 10**18), so a forged huge number is refused here, not by the database.
MAX_CENTS = 10**11

_MISSING = object()


def load_json(body: str | bytes) -> object:
    """The body as JSON (numbers other than integers as Decimal), or ``MalformedEvent``."""
    try:
        return loads_decimal(body)
    except RecursionError:
        # json's C parser gives up on deep nesting (`[[[[…`) with RecursionError, not ValueError.
        raise MalformedEvent("the body is JSON nested too deeply to read") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integer literals
        raise MalformedEvent(f"the body is not JSON ({exc})"[:200]) from None


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Fields:
    """A JSON object and where it sits in the payload (``data.attributes``), for error messages."""

    def __init__(self, value: object, path: str):
        if not isinstance(value, dict):
            raise MalformedEvent(f"{path} must be an object, got {_describe(value)}")
        self.value: dict[str, Any] = value
        self.path = path

    def _get(self, key: str, required: bool) -> object:
        value = self.value.get(key, _MISSING)
        if value is _MISSING or value is None:
            if required:
                raise MalformedEvent(f"{self.path}.{key} is missing")
            return None
        return value

    def _bad(self, key: str, what: str, value: object) -> MalformedEvent:
        return MalformedEvent(f"{self.path}.{key} must be {what}, got {_describe(value)}")

    def obj(self, key: str) -> Fields:
        return Fields(self._get(key, True), f"{self.path}.{key}")

    def optional_obj(self, key: str) -> Fields | None:
        """An object, or None when absent or null."""
        value = self._get(key, False)
        return None if value is None else Fields(value, f"{self.path}.{key}")

    def text(self, key: str, *, required: bool = False, max_length: int = MAX_TEXT_LENGTH) -> str:
        """A string ('' when absent or null and not required). NUL is refused: PostgreSQL cannot
        store it, and no provider sends it."""
        value = self._get(key, required)
        if value is None:
            return ""
        if not isinstance(value, str) or "\x00" in value or len(value) > max_length:
            raise self._bad(key, f"a string of at most {max_length} characters", value)
        return value

    def ident(self, key: str, *, required: bool = True) -> str:
        """An object id: a non-empty string, or an integer (Lemon Squeezy mixes both)."""
        value = self._get(key, required)
        if value is None:
            return ""
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str) or not value or "\x00" in value or len(value) > MAX_ID_LENGTH:
            raise self._bad(key, f"an id (an integer or a string of 1 to {MAX_ID_LENGTH} characters)", value)
        return value

    def expandable_id(self, key: str) -> str:
        """A Stripe reference that is an id string, or the object itself when expanded."""
        value = self._get(key, False)
        if isinstance(value, dict):
            return Fields(value, f"{self.path}.{key}").ident("id")
        return self.ident(key, required=False)

    @overload
    def cents(self, key: str, *, required: Literal[True] = True) -> int: ...
    @overload
    def cents(self, key: str, *, required: bool) -> int | None: ...

    def cents(self, key: str, *, required: bool = True) -> int | None:
        """A whole number of cents. Its sign is the services' business (a negative total is flagged)."""
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) > MAX_CENTS:
            raise self._bad(key, "an integer number of cents", value)
        return value

    def integer(self, key: str) -> int | None:
        value = self._get(key, False)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise self._bad(key, "an integer", value)
        return value

    def flag(self, key: str) -> bool | None:
        value = self._get(key, False)
        if value is not None and not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def timestamp(self, key: str) -> datetime | None:
        """An ISO-8601 time (a missing offset read as UTC), or None when absent or null."""
        text = self.text(key, max_length=40)
        if not text:
            return None
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise self._bad(key, "an ISO-8601 time", text) from None
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    def string_map(self, key: str) -> dict[str, str]:
        """Custom data / metadata: an object of short scalar values, read as strings."""
        found = self.optional_obj(key)
        if found is None:
            return {}
        out = {}
        for name, value in found.value.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise found._bad(name, "a string", value)
            text = str(value)
            if "\x00" in text or len(text) > MAX_TEXT_LENGTH:
                raise found._bad(name, f"a string of at most {MAX_TEXT_LENGTH} characters", value)
            out[str(name)] = text
        return out
