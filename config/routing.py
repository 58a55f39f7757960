"""Channels routes: the metered endpoints (plain ASGI applications, streamed and not) and the
live-events WebSocket."""

from django.urls import path, re_path

from accounts.consumers import events_application
from proxy.endpoints import chat_completions, count_tokens, embeddings, messages, responses

http_routes: list = [
    path("v1/chat/completions", chat_completions),
    path("v1/embeddings", embeddings),
    path("v1/responses", responses),
    path("v1/messages", messages),
    path("v1/messages/count_tokens", count_tokens),
]
websocket_routes: list = [re_path(r"^ws/events/?$", events_application)]
