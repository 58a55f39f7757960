"""Channels routes: the streaming proxy endpoint and the live-events WebSocket."""

from django.urls import re_path

from wallet.consumers import events_application

http_routes: list = []
websocket_routes: list = [re_path(r"^ws/events/?$", events_application)]
