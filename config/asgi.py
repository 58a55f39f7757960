"""ASGI entry point: Channels routes the streaming proxy and the WebSocket, Django the rest."""

import gc
import logging
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()  # before importing the routes: it sets up Django

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import re_path  # noqa: E402

from config.listen import app_url_mismatch  # noqa: E402
from config.routing import http_routes, websocket_routes  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": URLRouter([*http_routes, re_path(r"", django_asgi_app)]),
        "websocket": URLRouter(websocket_routes),
    }
)

# Once per process (a worker imports this module once): topup_url, the top-up redirects and the
# keys page are built from APP_URL, so one that names this machine but another port sends users
# nowhere. Logging is configured by now (get_asgi_application ran django.setup()).
if problem := app_url_mismatch(settings.APP_URL, settings.LISTEN_HOST, settings.LISTEN_PORT):
    logging.getLogger(__name__).warning(
        "%s; topup_url and the keys page are built from APP_URL: set it to where users reach this "
        "server, or leave it unset to follow HOST/PORT.",
        problem,
    )

# Everything loaded so far (settings, models, URLconfs, admin, endpoints) lives as long as the
# process. Freezing it moves it out of the cyclic garbage collector's generations, so full
# collections stop re-scanning it: under load, GC time per proxied request halved and
# the occasional full collection no longer stalls every request in flight for tens of ms.
gc.freeze()
# And the youngest generation is collected every GC_YOUNG_THRESHOLD allocations, not Python's 700:
# each collection scans every young object still alive, and under load that is the state of every
# request in flight (64 at the benchmark's concurrency), so at 700 they were scanned over and over
# — 9 % of the server's CPU at concurrency 64, a third of that at this threshold (README,
# Benchmarks). Objects freed by reference counting, as nearly all of a request's are, never wait
# for a collection; only reference cycles do, a few thousand allocations longer.
GC_YOUNG_THRESHOLD = 20_000
gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
