"""Tokens in the OS keyring (macOS Keychain, Windows Credential Locker, the Secret Service on
Linux), never in a file.

Layout, per server URL:

* service ``"<service_name> <server URL>"``, user ``<account email>`` → the token set as JSON
  (access, refresh, refresh_after, email, id);
* service ``"<service_name> <server URL> current"``, user ``"account"`` → the email of the account
  this app is signed in as, so a restarted app knows which entry is its own.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import keyring
import keyring.errors

from .errors import KeyringUnavailable

F = TypeVar("F", bound=Callable[..., Any])


def _keyring_call(method: F) -> F:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except keyring.errors.NoKeyringError as missing:
            raise KeyringUnavailable(
                "no OS keyring is available to keep the sign-in (tokens are never written to a file): "
                "on Linux run a Secret Service such as GNOME Keyring or KWallet, or pass keyring_backend="
            ) from missing

    return call  # type: ignore[return-value]


@dataclass(frozen=True)
class Tokens:
    access: str
    refresh: str
    # When to refresh the access token: shortly before it expires (wall-clock epoch seconds,
    # because another process may read the same entry).
    refresh_after: float
    email: str
    id: int | None = None

    @classmethod
    def issued(cls, pair: dict, *, email: str, id: int | None = None) -> Tokens:
        lifetime = float(pair.get("expires_in") or 900)
        return cls(
            access=pair["access"],
            refresh=pair["refresh"],
            refresh_after=time.time() + lifetime - min(30.0, lifetime / 4),
            email=email,
            id=id,
        )


class TokenStore:
    def __init__(self, base_url: str, *, service_name: str, backend: Any = None):
        # ``backend``: a keyring backend object (tests pass an in-memory one); None → the module's
        # configured keyring, as the user's platform provides it.
        self._keyring = backend if backend is not None else keyring
        self._service = f"{service_name} {base_url}"
        self._current = f"{service_name} {base_url} current"

    @_keyring_call
    def current_email(self) -> str | None:
        return self._keyring.get_password(self._current, "account")

    @_keyring_call
    def load(self) -> Tokens | None:
        email = self.current_email()
        if not email:
            return None
        raw = self._keyring.get_password(self._service, email)
        if not raw:
            return None
        try:
            return Tokens(**json.loads(raw))
        except (ValueError, TypeError):
            return None  # an entry from an incompatible version: as good as signed out

    @_keyring_call
    def save(self, tokens: Tokens) -> None:
        self._keyring.set_password(self._service, tokens.email, json.dumps(asdict(tokens)))
        self._keyring.set_password(self._current, "account", tokens.email)

    @_keyring_call
    def clear(self, email: str | None = None) -> None:
        """Forget ``email``'s tokens (the current account's by default), and the pointer to it."""
        current = self.current_email()
        email = email or current
        if email:
            self._delete(self._service, email)
        if current and current == email:
            self._delete(self._current, "account")

    def _delete(self, service: str, user: str) -> None:
        try:
            self._keyring.delete_password(service, user)
        except keyring.errors.PasswordDeleteError:
            pass  # already gone
