"""The proxy's part of ``/readyz`` (registered by ``ProxyConfig.ready``): is the upstream
configuration usable, and the state of each upstream's circuit breaker in this process."""

from __future__ import annotations

from django.db import DatabaseError

from . import routing, upstream
from .selectors import upstreams_configured


def _configured() -> list[upstream.UpstreamConfig] | None:
    """Every enabled upstream, or None when the database cannot say (``checks.database`` does)."""
    try:
        return upstreams_configured()
    except DatabaseError:
        return None


def upstream_check() -> str:
    """``ok``; ``demo`` with no upstream at all (the built-in demo model serves ``/v1``, a working
    state); ``error: …`` for a configuration no request could succeed with."""
    default = upstream.default()
    if default.api_key and not default.base_url.startswith(("http://", "https://")):
        return "error: UPSTREAM_BASE_URL is not an http(s) URL"
    configs = _configured() or [default]
    broken = [f"upstream {c.name}: {c.unusable}" for c in configs if c.unusable]
    if broken:
        return "error: " + "; ".join(broken)
    if not default.api_key and len(configs) == 1:
        return "demo"  # no key and no other upstream: the built-in demo model serves /v1
    return "ok"


def upstream_report() -> dict[str, dict]:
    """Each upstream's kind, circuit breaker (closed, open, half_open) and load in this process."""
    return routing.states(_configured() or [upstream.default()])
