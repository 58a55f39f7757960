"""Where the server listens, and whether ``APP_URL`` points there. No Django imports.

``scripts/run`` (and the tests' live servers) start uvicorn with ``--host "$HOST" --port "$PORT"``
and export both, so the settings can derive ``APP_URL`` — the base of ``topup_url``, the top-up
redirects and the keys page — from them when it is not set, and ``config.asgi`` can warn once at
start-up when an ``APP_URL`` that names this machine names another port.
"""

from __future__ import annotations

from urllib.parse import urlsplit

WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]"}  # noqa: S104  (recognised, not bound)
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _bare(host: str) -> str:
    return host.strip().lower().removeprefix("[").removesuffix("]")


def listen_url(host: str, port: int) -> str:
    """The URL a browser on this machine reaches the server at: a wildcard address (listen on every
    interface) is reached through the loopback one."""
    host = _bare(host) or "127.0.0.1"
    if host in {_bare(h) for h in WILDCARD_HOSTS}:
        host = "127.0.0.1"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}"


def app_url_mismatch(app_url: str, host: str, port: int) -> str | None:
    """Why ``app_url`` cannot reach a server listening on ``host:port``, or None.

    Only an APP_URL that names this machine (a loopback name, or ``host`` itself) can be checked:
    behind a reverse proxy it names the public host and rightly differs from where uvicorn listens.
    """
    try:
        parts = urlsplit(app_url)
        app_host, app_port = _bare(parts.hostname or ""), parts.port
    except ValueError:
        return f"APP_URL {app_url!r} is not a URL"
    if app_port is None:
        app_port = 443 if parts.scheme == "https" else 80
    listening = _bare(host) or "127.0.0.1"
    wildcard = listening in {_bare(h) for h in WILDCARD_HOSTS}
    loopback = {_bare(h) for h in LOOPBACK_HOSTS}
    if app_host != listening and app_host not in loopback:
        return None  # a public name (a proxy in front): nothing we can check
    where = f"{host or '127.0.0.1'}:{port}"
    if app_port != port:
        return f"APP_URL {app_url} points at port {app_port}, but this server listens on {where}"
    if app_host in loopback and not wildcard and listening not in loopback:
        return f"APP_URL {app_url} points at this machine's loopback, but this server listens on {where}"
    return None
