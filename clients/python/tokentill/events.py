"""``/ws/events``: the wallet's balance as it changes, over a WebSocket that comes back by itself.

Why not websockets' own reconnecting iterator: its handshake headers are fixed when it is
created, and a socket the server closed with 4401 (the access token expired or was revoked) must
come back with a refreshed token.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ._session import Session
from .errors import ApiError, SignedOut, usd

CLOSE_UNAUTHENTICATED = 4401
USER_AGENT = "tokentill-python"


@dataclass(frozen=True)
class BalanceEvent:
    """The wallet after a change (USD). ``reason``: ``snapshot`` (first event after each
    (re)connect), ``usage``, ``charge``, ``top_up``, ``refund``, ``grant``…"""

    balance: Decimal
    held: Decimal
    available: Decimal
    reason: str

    @classmethod
    def from_json(cls, data: dict) -> BalanceEvent:
        return cls(
            balance=usd(data.get("balance")) or Decimal(0),
            held=usd(data.get("held")) or Decimal(0),
            available=usd(data.get("available")) or Decimal(0),
            reason=str(data.get("reason") or ""),
        )


def backoff_delay(attempt: int, *, initial: float, maximum: float) -> float:
    """Exponential backoff with jitter: many clients that lost one server do not all come back
    in the same instant."""
    return min(maximum, initial * 2**attempt) * random.uniform(0.5, 1.0)  # noqa: S311 (not crypto)


async def watch(
    session: Session,
    url: str,
    *,
    initial_backoff: float = 0.5,
    max_backoff: float = 30.0,
    open_timeout: float = 10.0,
) -> AsyncIterator[BalanceEvent]:
    attempt = 0
    refused_in_a_row = 0
    while True:
        tokens = await session.acurrent()  # SignedOut ends the watch: nothing to retry
        try:
            async with connect(
                url,
                additional_headers={"Authorization": f"Bearer {tokens.access}"},
                user_agent_header=USER_AGENT,
                open_timeout=open_timeout,
            ) as socket:
                async for message in socket:
                    data = json.loads(message)
                    if isinstance(data, dict) and data.get("type") == "balance":
                        attempt, refused_in_a_row = 0, 0
                        yield BalanceEvent.from_json(data)
        except ConnectionClosed as closed:
            if closed.rcvd is not None and closed.rcvd.code == CLOSE_UNAUTHENTICATED:
                refused_in_a_row += 1
                if refused_in_a_row > 1:
                    raise SignedOut("the server refused this sign-in for live events") from None
                await session.arefresh(seen=tokens)
                continue
        except InvalidStatus as refused:
            status = refused.response.status_code
            if status < 500 and status != 429:
                raise ApiError(status, f"the server refused the events socket ({status})") from None
        except (OSError, InvalidHandshake, TimeoutError):
            pass  # the server is down or restarting: try again after a pause
        await asyncio.sleep(backoff_delay(attempt, initial=initial_backoff, maximum=max_backoff))
        attempt += 1
