"""What can go wrong, as exceptions an app can catch by name.

``InsufficientFunds`` and ``RunLimitReached`` subclass the openai SDK's own status errors, so code
that already catches ``openai.APIStatusError`` (or ``openai.RateLimitError``) keeps working.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import openai


class TokentillError(Exception):
    """Base of the errors this package raises itself."""


class SignedOut(TokentillError):
    """No usable sign-in for this server: never signed in, signed out, or the server refused the
    refresh token (revoked from the portal, reused, expired). The stored tokens are gone; sign in
    again with ``login_in_browser()`` or ``login_with_password()``."""


class KeyringUnavailable(TokentillError):
    """There is no OS keyring to keep the sign-in in (tokens are never written to a plain file).
    On Linux, run a Secret Service (GNOME Keyring, KWallet); or pass ``keyring_backend=``."""


class LoginFailed(TokentillError):
    """A sign-in that did not succeed. ``reason``: ``invalid_credentials``, ``throttled``,
    ``access_denied`` (the user pressed Deny), ``expired_token`` (the code was not approved in
    time) or ``invalid_grant`` (an unknown or already used code)."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


class ApiError(TokentillError):
    """The server answered an ``/api`` call with an error; ``detail`` is its message."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class TopupTimeout(TokentillError, TimeoutError):
    """No top-up arrived within the time ``topup()`` waited."""


def usd(value: Any) -> Decimal | None:
    """A 9-place USD string from the server as a Decimal (never a float); None when absent."""
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


class InsufficientFunds(openai.APIStatusError):
    """HTTP 402: the wallet cannot cover the request, so the server refused it before it reached
    the model. ``balance`` and ``needed`` are Decimals in USD (``needed``: what the request would
    have held); ``topup_url`` is the portal's top-up page (``Tokentill.topup()`` opens it signed in)."""

    def __init__(self, message: str, *, response: Any, body: object):
        super().__init__(message, response=response, body=body)
        data = body if isinstance(body, dict) else {}
        self.balance: Decimal | None = usd(data.get("balance"))
        self.needed: Decimal | None = usd(data.get("needed"))
        self.topup_url: str | None = data.get("topup_url")


class RunLimitReached(openai.RateLimitError):
    """HTTP 429 ``run_step_limit`` / ``run_spend_limit``: this run (``Tokentill.run()``) has used
    the steps or the money it was allowed, and the server refused the next step."""

    def __init__(self, message: str, *, response: Any, body: object):
        super().__init__(message, response=response, body=body)
        self.code: str | None = body.get("code") if isinstance(body, dict) else None


RUN_LIMIT_CODES = frozenset({"run_step_limit", "run_spend_limit"})


def status_error_for(message: str, *, response: Any, body: object) -> openai.APIStatusError | None:
    """Our own exception for a refusal the openai SDK would raise as a plain status error."""
    code = body.get("code") if isinstance(body, dict) else None
    if response.status_code == 402:
        return InsufficientFunds(message, response=response, body=body)
    if response.status_code == 429 and code in RUN_LIMIT_CODES:
        return RunLimitReached(message, response=response, body=body)
    return None
