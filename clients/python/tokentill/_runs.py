"""Run and tool labels, carried in context variables.

A ``contextvars.ContextVar`` is per thread and per asyncio task (a task copies its creator's
context), so two runs going on at once in two tasks or two threads never label each other's
requests, and a run's calls made anywhere inside its ``with`` block are labelled without passing
anything around.
"""

from __future__ import annotations

import contextvars
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .errors import usd

if TYPE_CHECKING:
    from .client import Tokentill


@dataclass
class Labels:
    run: str | None = None
    agent: str | None = None
    max_steps: int | None = None
    max_spend: Decimal | None = None
    tool: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.run:
            headers["X-Tokentill-Run"] = self.run
        if self.agent:
            headers["X-Tokentill-Agent"] = self.agent
        if self.run and self.max_steps is not None:
            headers["X-Tokentill-Run-Max-Steps"] = str(self.max_steps)
        if self.run and self.max_spend is not None:
            headers["X-Tokentill-Run-Max-Spend"] = f"{self.max_spend:f}"
        if self.tool:
            headers["X-Tokentill-Tool"] = self.tool
        return headers


_NONE = Labels()
current: contextvars.ContextVar[Labels | None] = contextvars.ContextVar("tokentill_labels", default=None)


def labels() -> Labels:
    return current.get() or _NONE


def label_request(request: Any) -> None:
    """httpx request hook: the labels of the run (and tool) this call is made in."""
    for name, value in labels().headers().items():
        request.headers.setdefault(name, value)


def money(value: Decimal | str | int | None, name: str) -> Decimal | None:
    """A USD amount from the caller. Floats are refused: money is never binary floating point."""
    if value is None:
        return None
    if isinstance(value, float):
        raise TypeError(f"{name} must be a Decimal, str or int (USD), not a float")
    amount = Decimal(str(value))
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{name} must be a non-negative amount of USD")
    return amount


class _Labelled(ABC):
    """A context (sync and async) that sets some labels for the calls made inside it."""

    @abstractmethod
    def _labels(self, outer: Labels) -> Labels: ...

    def __enter__(self):
        self._token = current.set(self._labels(labels()))
        return self

    def __exit__(self, *exc) -> None:
        current.reset(self._token)

    async def __aenter__(self):
        return self.__enter__()

    async def __aexit__(self, *exc) -> None:
        self.__exit__(*exc)


class Tool(_Labelled):
    def __init__(self, name: str):
        self.name = name

    def _labels(self, outer: Labels) -> Labels:
        return Labels(outer.run, outer.agent, outer.max_steps, outer.max_spend, self.name)


@dataclass
class RunSummary:
    """What the server counted for a run (``GET /api/runs/<id>``)."""

    run: str
    steps: int
    spend: Decimal
    requests: int
    tool_charges: int
    first_at: str | None = None
    last_at: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> RunSummary:
        return cls(
            run=data["run"],
            steps=int(data.get("steps") or 0),
            spend=usd(data.get("spend")) or Decimal(0),
            requests=int(data.get("requests") or 0),
            tool_charges=int(data.get("tool_charges") or 0),
            first_at=data.get("first_at"),
            last_at=data.get("last_at"),
        )


@dataclass
class Run(_Labelled):
    """One agent run: every model call and tool charge made inside ``with client.run(...)`` (or
    ``async with``) through this client carries its id, and the server enforces its limits on each
    request. After the block, ``steps`` and ``spend`` are what the server counted."""

    client: Tokentill
    id: str = field(default_factory=lambda: f"run_{uuid.uuid4().hex}")
    agent: str | None = None
    max_steps: int | None = None
    max_spend: Decimal | None = None
    summary: RunSummary | None = None

    def __post_init__(self):
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or int(self.max_steps) < 1):
            raise ValueError("max_steps must be a positive integer")
        self.max_spend = money(self.max_spend, "max_spend")

    def _labels(self, outer: Labels) -> Labels:
        return Labels(self.id, self.agent or outer.agent, self.max_steps, self.max_spend, None)

    @property
    def steps(self) -> int:
        return self.summary.steps if self.summary else 0

    @property
    def spend(self) -> Decimal:
        return self.summary.spend if self.summary else Decimal(0)

    def __exit__(self, exc_type, exc, tb) -> None:
        super().__exit__(exc_type, exc, tb)
        try:
            self.summary = self.client.run_summary(self.id)
        except Exception:
            if exc_type is None:
                raise
            # The block's own exception (a refused step, say) is the one the caller needs.

    async def __aexit__(self, exc_type, exc, tb) -> None:
        super().__exit__(exc_type, exc, tb)
        try:
            self.summary = await self.client.arun_summary(self.id)
        except Exception:
            if exc_type is None:
                raise


async def alabel_request(request: Any) -> None:
    label_request(request)
