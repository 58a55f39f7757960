"""Channels routes: the metered endpoints (plain ASGI applications, streamed and not) and the
live-events WebSocket."""

from django.urls import path, re_path

from accounts.consumers import events_application
from proxy.endpoints import chat_completions, embeddings

http_routes: list = [
    path("v1/chat/completions", chat_completions),
    path("v1/embeddings", embeddings),
]
websocket_routes: list = [re_path(r"^ws/events/?$", events_application)]
