"""Staff-configured upstreams: saving one (its API key encrypted at rest), what staff may see of
its key, testing that it answers, and re-encrypting every key after an encryption key rotation.

The plain key exists only in the form that receives it and in the per-process config the proxy
calls the upstream with (``proxy.upstream.config_of``); it is never rendered, logged or returned.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from django.db import transaction

from core.money import loads_decimal

from . import keyvault, upstream
from .models import RESERVED_UPSTREAM_NAMES, Upstream, UpstreamKind
from .selectors import price_cache_clear

# Kinds that cannot be called without a key (an OpenAI-compatible server on the LAN often can).
KEY_REQUIRED = {UpstreamKind.OPENROUTER, UpstreamKind.ANTHROPIC}
SHOWN_KEY_CHARS = 4  # the most of a key staff ever see again, and only of a long one


class UpstreamError(ValueError):
    """An upstream that cannot be saved as given; the message says which field and why."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


def ca_bundle_check(ca_bundle: str) -> None:
    """Raise ``UpstreamError`` unless ``ca_bundle`` (PEM text or a file path) loads as certificates."""
    if not ca_bundle.strip():
        return
    if not upstream.is_pem(ca_bundle) and not Path(ca_bundle.strip()).is_file():
        raise UpstreamError("ca_bundle", f"{ca_bundle.strip()!r} is neither PEM text nor a file on this server")
    try:
        upstream.verify(upstream.UpstreamConfig(name="check", kind="openai", base_url="", ca_bundle=ca_bundle.strip()))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise UpstreamError("ca_bundle", f"these are not PEM certificates Python can load ({exc})") from None


def upstream_validate(*, row: Upstream, api_key: str = "", remove_key: bool = False) -> None:
    """Raise ``UpstreamError`` (naming the field) unless ``row`` can be saved with that key
    change. The model's own validators (URL scheme, numbers) are Django's, run by ``full_clean``."""
    api_key = api_key.strip()
    if remove_key and api_key:
        raise UpstreamError("api_key", "either type a new key or remove the stored one, not both")
    if row.name in RESERVED_UPSTREAM_NAMES:
        raise UpstreamError("name", f"{row.name!r} is reserved (the settings upstream and the demo model)")
    parts = urlsplit(row.base_url.strip())
    if parts.scheme not in ("http", "https"):
        shown = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise UpstreamError("base_url", f"the base URL must start with http:// or https:// (this one has {shown})")
    if parts.username or parts.password:
        # A URL is shown on the dashboard and in messages; a secret belongs in the key field.
        raise UpstreamError("base_url", "the base URL must not carry credentials: put the key in the API key field")
    ca_bundle_check(row.ca_bundle)
    if api_key and not keyvault.configured():
        raise UpstreamError(
            "api_key",
            "UPSTREAM_KEY_ENCRYPTION_KEY is not set, so the key cannot be stored encrypted; "
            f"set it (generate one with {keyvault.GENERATE}) and restart",
        )
    keeps_key = bool(api_key) or (bool(row.api_key_encrypted) and not remove_key)
    if row.kind in KEY_REQUIRED and not keeps_key:
        raise UpstreamError("api_key", f"an upstream of kind {row.get_kind_display()} needs an API key")


@transaction.atomic
def upstream_save(*, row: Upstream, api_key: str = "", remove_key: bool = False) -> Upstream:
    """Validate and save ``row``; ``api_key`` (when given) replaces the stored key, encrypted.

    The proxy's routing cache is dropped on commit in this process; the others see the change
    within ``PROXY_PRICE_CACHE_SECONDS``.
    """
    upstream_validate(row=row, api_key=api_key, remove_key=remove_key)
    if api_key.strip():
        row.api_key_encrypted = keyvault.encrypt(api_key.strip())
    elif remove_key:
        row.api_key_encrypted = ""
    row.base_url = row.base_url.strip().rstrip("/")
    row.ca_bundle = row.ca_bundle.strip()
    row.full_clean()
    row.save()
    transaction.on_commit(price_cache_clear)
    return row


def key_status(row: Upstream) -> str:
    """What staff may see of a stored key: whether there is one, and the last characters of a
    long one — or why it cannot be used."""
    if not row.api_key_encrypted:
        return "not set"
    try:
        plain = keyvault.decrypt(row.api_key_encrypted)
    except keyvault.KeyVaultError as exc:
        return f"set, but unusable: {exc}"
    if len(plain) >= 16:
        return f"set (ends in …{plain[-SHOWN_KEY_CHARS:]})"
    return "set"


@dataclass(frozen=True)
class ConnectionTest:
    ok: bool
    message: str


def upstream_test(config: upstream.UpstreamConfig, *, timeout: float = 10.0) -> ConnectionTest:
    """Ask the upstream for its model list (``GET /models``) with its key, certificates and
    timeouts: does it answer, and does it accept the key? (No generation, so nothing is billed.)"""
    if config.unusable:
        return ConnectionTest(False, config.unusable)
    limit = httpx.Timeout(min(config.read_timeout, timeout), connect=min(config.connect_timeout, timeout))
    try:
        with httpx.Client(timeout=limit, trust_env=False, verify=upstream.verify(config)) as client:
            response = client.get(upstream.url("models", config), headers=upstream.headers(config))
    except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
        # httpx names the URL and the failure, never the request's headers (the key).
        return ConnectionTest(False, f"could not reach {config.base_url}: {type(exc).__name__}: {exc}")
    if response.status_code != 200:
        detail = upstream.error_message(response.content[:65536])
        return ConnectionTest(False, f"HTTP {response.status_code} from {config.base_url}/models: {detail}"[:500])
    try:
        listed = loads_decimal(response.content).get("data")
    except (ValueError, AttributeError):
        listed = None
    count = f", {len(listed)} models listed" if isinstance(listed, list) else ""
    return ConnectionTest(True, f"HTTP 200 from {config.base_url}/models{count}")


def upstream_keys_rotate() -> int:
    """Re-encrypt every stored key with the newest ``UPSTREAM_KEY_ENCRYPTION_KEY`` (the first in
    the list). Raises ``KeyVaultError`` — and changes nothing — if any stored key cannot be
    decrypted with the keys given. Returns how many keys were re-encrypted."""
    with transaction.atomic():
        rows = list(Upstream.objects.select_for_update().exclude(api_key_encrypted=""))
        for row in rows:
            row.api_key_encrypted = keyvault.rotate(row.api_key_encrypted)
        Upstream.objects.bulk_update(rows, ["api_key_encrypted"])
        transaction.on_commit(price_cache_clear)
    return len(rows)
