"""Liveness and readiness probes for load balancers and orchestrators.

``/readyz`` checks what this floor knows (the database, the channel layer); the apps above add
their own through ``register_check`` and ``register_report`` from their ``AppConfig.ready()`` —
infra imports no app, so the proxy's upstream checks plug in here rather than being imported.
A check answers a short string: ``"ok"``, another word for a working state (``"demo"``), or
``"error: …"``, which makes the process unready (503). A report is extra JSON shown beside the
checks that never changes readiness (the upstreams' circuit breakers: an upstream that is down
is not this process's fault, and taking the process out of the load balancer would not help).
"""

from collections.abc import Callable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.http import require_GET

_checks: dict[str, Callable[[], str]] = {}
_reports: dict[str, Callable[[], object]] = {}


def register_check(name: str, check: Callable[[], str]) -> None:
    """Add (or replace) a readiness check shown as ``checks[name]``."""
    _checks[name] = check


def register_report(name: str, report: Callable[[], object]) -> None:
    """Add (or replace) an informational section shown as ``[name]`` beside the checks."""
    _reports[name] = report


@require_GET
def healthz(request):
    return JsonResponse({"status": "ok"})


def _check_database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # report, don't crash the probe
        return f"error: {type(exc).__name__}"
    return "ok"


def _check_channel_layer() -> str:
    layer = get_channel_layer()
    if layer is None:
        return "error: no channel layer configured"
    try:
        channel = async_to_sync(layer.new_channel)()
        async_to_sync(layer.send)(channel, {"type": "readyz.ping"})
        async_to_sync(layer.receive)(channel)
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"


def _safely(probe: Callable[[], object]) -> object:
    try:
        return probe()
    except Exception as exc:  # a broken check reports itself; it never breaks the probe
        return f"error: {type(exc).__name__}"


@require_GET
def readyz(request):
    checks = {"database": _check_database(), "channel_layer": _check_channel_layer()}
    checks.update({name: str(_safely(check)) for name, check in _checks.items()})
    ready = all(not value.startswith("error") for value in checks.values())
    body: dict[str, object] = {"status": "ok" if ready else "unavailable", "checks": checks}
    body.update({name: _safely(report) for name, report in _reports.items()})
    return JsonResponse(body, status=200 if ready else 503)
