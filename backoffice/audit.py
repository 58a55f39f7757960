"""Writing the operator audit log (``backoffice.models.AuditEntry``).

What is stored must be storable and harmless whatever a caller sends: text loses NUL characters
(PostgreSQL's text and JSON types cannot hold them) and lone surrogates (not encodable as UTF-8),
long strings are cut, deep or wide structures are summarised, and any field whose name looks
like a secret is masked. The operator API takes no secret, so a masked field is someone sending
what they should not; it is still not kept.
"""

from __future__ import annotations

import re

from .models import AuditEntry, Outcome

MAX_TEXT = 500  # characters of any one string kept
MAX_ITEMS = 50  # entries of any one object or list kept
MAX_DEPTH = 4
MASKED = "[masked]"
_SECRET_NAME = re.compile(r"pass|secret|token|authori[sz]ation|api_?key|cookie|credential", re.IGNORECASE)
_SURROGATES = re.compile("[\ud800-\udfff]")


def storable_text(value: str, *, limit: int = MAX_TEXT) -> str:
    """``value`` without NUL characters or lone surrogates, at most ``limit`` characters."""
    text = _SURROGATES.sub("\ufffd", value.replace("\x00", ""))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def storable(value: object, *, depth: int = 0) -> object:
    """A JSON-safe, storable copy of request data (see the module docstring)."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):  # NaN and infinities are not JSON; the value is kept as text
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, str):
        return storable_text(value)
    if depth >= MAX_DEPTH:
        return "[nested too deeply]"
    if isinstance(value, dict):
        kept = {}
        for index, (name, item) in enumerate(value.items()):
            if index >= MAX_ITEMS:
                kept["…"] = f"{len(value) - MAX_ITEMS} more"
                break
            name = storable_text(str(name), limit=100)
            kept[name] = MASKED if _SECRET_NAME.search(name) else storable(item, depth=depth + 1)
        return kept
    if isinstance(value, list | tuple):
        kept_list = [storable(item, depth=depth + 1) for item in list(value)[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            kept_list.append(f"… {len(value) - MAX_ITEMS} more")
        return kept_list
    return storable_text(str(value))


def outcome_of(status_code: int) -> str:
    if status_code >= 500:
        return Outcome.FAILED
    return Outcome.REFUSED if status_code >= 400 else Outcome.OK


def audit_record(
    *,
    principal,
    method: str,
    path: str,
    operation: str,
    target: str,
    query: dict,
    body: object,
    idempotency_key: str,
    status_code: int,
    detail: str,
) -> AuditEntry:
    """One row, committed on its own (never inside the call's own transaction, so a call that
    failed and rolled back is still recorded)."""
    request_data: dict = {}
    if query:
        request_data["query"] = storable(query)
    if body not in (None, {}, [], ""):
        request_data["body"] = storable(body)
    return AuditEntry.objects.create(
        actor=principal.user,
        actor_email=principal.user.email,
        api_key=principal.api_key,
        key_prefix=principal.api_key.prefix if principal.api_key is not None else "",
        method=method[:10],
        path=storable_text(path),
        operation=operation[:64],
        target=storable_text(target, limit=100),
        request_data=request_data,
        idempotency_key=storable_text(idempotency_key, limit=200),
        status_code=status_code,
        outcome=outcome_of(status_code),
        detail=storable_text(detail, limit=1000),
    )
