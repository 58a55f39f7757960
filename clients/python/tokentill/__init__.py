"""Tokentill's Python client: sign in through the browser, keep the tokens in the OS keyring, call
models through the official openai SDK, handle 402 with a top-up, watch the balance live and keep
agent runs within a budget.

    from tokentill import Tokentill

    client = Tokentill("http://127.0.0.1:8000")
    if client.account is None:
        client.login_in_browser()
    reply = client.openai().chat.completions.create(model="tokentill/demo", messages=[...])
    print(reply.choices[0].message.content, client.last_charge, client.last_balance)
"""

from ._http import Charge
from ._runs import Run, RunSummary, Tool
from .client import Account, Balance, ChargeResult, DeviceCode, Tokentill
from .errors import (
    ApiError,
    InsufficientFunds,
    KeyringUnavailable,
    LoginFailed,
    RunLimitReached,
    SignedOut,
    TokentillError,
    TopupTimeout,
)
from .events import BalanceEvent

__version__ = "0.1.0"

__all__ = [
    "Account",
    "ApiError",
    "Balance",
    "BalanceEvent",
    "Charge",
    "ChargeResult",
    "DeviceCode",
    "InsufficientFunds",
    "KeyringUnavailable",
    "LoginFailed",
    "Run",
    "RunLimitReached",
    "RunSummary",
    "SignedOut",
    "Tokentill",
    "TokentillError",
    "Tool",
    "TopupTimeout",
]
