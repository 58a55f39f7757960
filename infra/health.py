"""Liveness and readiness probes for load balancers and orchestrators."""

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.http import require_GET


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


def _check_upstream() -> str:
    if not settings.UPSTREAM_API_KEY:
        return "demo"  # no key: the built-in demo model serves /v1, which is a working state
    if not settings.UPSTREAM_BASE_URL.startswith(("http://", "https://")):
        return "error: UPSTREAM_BASE_URL is not an http(s) URL"
    return "ok"


@require_GET
def readyz(request):
    checks = {"database": _check_database(), "channel_layer": _check_channel_layer(), "upstream": _check_upstream()}
    ready = all(not value.startswith("error") for value in checks.values())
    return JsonResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)
