"""Channels routes: the streaming proxy endpoint and the live-events WebSocket."""

http_routes: list = []
websocket_routes: list = []
