"""What the proxy tells the operator's systems, through notify's outbox.

* ``usage.cap_reached``: a spend cap or token limit refused a request (a key's or a user's daily
  or monthly spend cap or tokens per minute or day, a member's daily or monthly spend limit in an
  organization, a run's spend limit). Once per cap and window:
  the cap's counter key is the event's dedup key, so an agent retrying into a full cap every
  second announces it once.
* ``usage.summary``: per user, per hour, what their requests did (registered with the delivery
  worker in ``ProxyConfig.ready``; produced only while some endpoint subscribes to it).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from core.money import format_usd
from notify.models import EventType
from notify.services import event_emit, event_emit_once

from . import rollups


def cap_reached(
    *,
    user_id: int,
    api_key,
    run: str,
    counter: str,
    limit: int,
    code: str,
    message: str,
    retry_after: int,
    scope: str,
    unit: str = "usd",
    organization_id: int | None = None,
) -> None:
    """Announce a full cap (``counter`` is its cache key: one event per cap and window).
    ``scope``: whose cap ("api_key", "user", "member", "run"); ``unit``: "usd" (``limit`` in nanodollars)
    or "tokens"; ``organization_id``: for a member's cap, the organization it is inside."""
    event_emit_once(
        type=EventType.USAGE_CAP_REACHED,
        user_id=user_id,
        data={
            "code": code,
            "message": message,
            "scope": scope,
            "unit": unit,
            "limit": format_usd(limit) if unit == "usd" else str(limit),
            "api_key": {"id": api_key.pk, "prefix": api_key.prefix} if api_key is not None else None,
            "run": run or None,
            "organization": {"id": organization_id} if organization_id is not None else None,
            "retry_after": retry_after,
        },
        dedup_key=f"usage.cap_reached:{counter}"[:200],
        ttl=max(retry_after, 60),
    )


def usage_summaries(hour: datetime) -> None:
    """One ``usage.summary`` per user with requests created in [hour, hour + 1 h)."""
    end = hour + timedelta(hours=1)
    rows = rollups.totals(
        measures=["requests", "refused", "prompt_tokens", "completion_tokens", "charge"],
        keys={"user_id": "user_id", "model": "model"},
        since=hour,
        until=end,
    )
    for row in rows:
        row["requests"] -= row["refused"]  # admitted ones
    rows.sort(key=lambda row: (row["user_id"], row["model"]))
    by_user: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_user.setdefault(row["user_id"], []).append(row)
    for user_id, models in by_user.items():
        event_emit(
            type=EventType.USAGE_SUMMARY,
            user_id=user_id,
            data={
                "period": {"start": hour.isoformat(), "end": end.isoformat()},
                "requests": sum(row["requests"] for row in models),
                "refused": sum(row["refused"] for row in models),
                "prompt_tokens": sum(row["prompt_tokens"] for row in models),
                "completion_tokens": sum(row["completion_tokens"] for row in models),
                "charge": format_usd(sum(int(row["charge"]) for row in models)),
                "models": [
                    {
                        "model": row["model"],
                        "requests": row["requests"],
                        "prompt_tokens": row["prompt_tokens"],
                        "completion_tokens": row["completion_tokens"],
                        "charge": format_usd(int(row["charge"])),
                    }
                    for row in models
                ],
            },
            dedup_key=f"usage.summary:{user_id}:{hour:%Y%m%d%H}",
        )
