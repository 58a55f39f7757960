"""Channels routes: the streaming proxy endpoints and the live-events WebSocket."""

from django.urls import path, re_path

from accounts.consumers import events_application
from proxy.consumers import ChatCompletionsConsumer, EmbeddingsConsumer

http_routes: list = [
    path("v1/chat/completions", ChatCompletionsConsumer.as_asgi()),
    path("v1/embeddings", EmbeddingsConsumer.as_asgi()),
]
websocket_routes: list = [re_path(r"^ws/events/?$", events_application)]
