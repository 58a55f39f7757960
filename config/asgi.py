"""ASGI entry point: Channels routes the streaming proxy and the WebSocket, Django the rest."""

import gc
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()  # before importing the routes: it sets up Django

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from config.routing import http_routes, websocket_routes  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": URLRouter([*http_routes, re_path(r"", django_asgi_app)]),
        "websocket": URLRouter(websocket_routes),
    }
)

# Everything loaded so far (settings, models, URLconfs, admin, endpoints) lives as long as the
# process. Freezing it moves it out of the cyclic garbage collector's generations, so full
# collections stop re-scanning it: measured under load, GC time per proxied request halved and
# the occasional full collection no longer stalls every request in flight for tens of ms.
gc.freeze()
