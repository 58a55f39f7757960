"""The wallet's ``/v1`` endpoints (Django Ninja): balance, tool charges and billing deposits.

* ``GET /v1/user/balance`` — the caller's own wallet.
* ``POST /v1/user/charge`` — debit a tool charge now. ``user`` (an email address or a numeric
  user id) charges someone else and needs an API key with the ``billing`` scope.
* ``POST /v1/user/balance/deposit`` — credit a trial, bonus or grant; ``billing`` scope only.

Both writes require an ``Idempotency-Key`` header, stored namespaced on the target wallet
(``charge:<key>``, ``deposit:<key>``) on the entry they post. Once an entry is posted, a retry
with the same key answers that entry's result and changes nothing; the same key with a different
amount is a 409. A charge refused for funds (402) posts nothing, so its key is still unused: the
same request retried after a top-up is charged then — what an agent retrying after the user tops
up needs — and only from that 200 on does the key answer the same body. Amounts are decimal
strings: a JSON number is refused rather than read through a float.

An API key's limits hold here as on the proxy (``proxy.limits``): ``BearerAuth`` counts every
request against its rpm, and a tool charge is reserved against its spend caps before it is
posted and kept only if it was (not for a 402, a 409 or a replay). A charge made with
``X-Tokentill-Run`` is part of that run of the charged user: it is reserved against the run's
spend limit the same way, and its ledger entry is labelled with the run (``CHARGE_RUN_FIELD``).
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from functools import wraps
from typing import Any, Literal

from django.conf import settings
from django.utils import timezone
from ninja import Header, Router, Schema, Status
from pydantic import Field

from accounts.auth import Principal
from accounts.models import Scope, User
from accounts.ninja_auth import BearerAuth
from proxy import limits

from .models import Entry, EntryKind
from .money import MoneyError, format_usd, parse_usd, usd_to_nanos
from .selectors import wallet_summary
from .services import (
    IdempotencyConflict,
    InsufficientFunds,
    WalletError,
    wallet_charge,
    wallet_credit,
    wallet_get_or_create,
)

router = Router(tags=["wallet"], auth=BearerAuth())

MAX_IDEMPOTENCY_KEY = 128  # stored as "charge:<key>" in a 200-character column
# One charge or deposit moves at most this much. Far above any tool charge or grant, far below
# what the ledger's bigint nanodollars hold (about 9.2 billion USD), so no single amount, nor a
# balance built from a few thousand of them, can overflow a column.
MAX_AMOUNT_USD = Decimal(1_000_000)
MAX_METADATA_BYTES = 4096  # the metadata object as compact UTF-8 JSON; it is copied into the ledger
MAX_USER_ID = 2**63 - 1


class Refused(Exception):
    """An answer in the OpenAI error shape; raised by helpers, rendered by ``_openai_errors``."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _openai_errors(view):
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        # Imported here: config.v1 imports this module while it is still being set up.
        from config.v1 import openai_error

        try:
            return view(request, *args, **kwargs)
        except Refused as exc:
            type_ = {403: "permission_error", 404: "not_found_error"}.get(exc.status, "invalid_request_error")
            return openai_error(request, exc.status, exc.message, type_, exc.code, param=exc.param)
        except IdempotencyConflict:
            return openai_error(
                request,
                409,
                "this Idempotency-Key was already used for a different request",
                "invalid_request_error",
                "idempotency_conflict",
                param="Idempotency-Key",
            )

    return wrapper


def _amount(value: object) -> int:
    if not isinstance(value, str):
        raise Refused(
            400,
            'amount must be a decimal string such as "0.010000000"; JSON numbers are refused so that no '
            "float ever touches money",
            "invalid_amount",
            "amount",
        )
    # The per-operation bound comes first so that every amount past it, however it is written, gets
    # the same answer ("1e999990" and "-1e30" included, which parse_usd would refuse as
    # unrepresentable); parse_usd then judges the form of what is left.
    try:
        decimal = Decimal(value.strip())
    except InvalidOperation:
        decimal = None  # parse_usd says what is wrong with it
    if decimal is not None and decimal.is_finite() and decimal.copy_abs() > MAX_AMOUNT_USD:
        message = f"amount must be at most {format_usd(usd_to_nanos(MAX_AMOUNT_USD))} USD"
        raise Refused(400, message, "invalid_amount", "amount")
    try:
        amount = parse_usd(value)
    except MoneyError as exc:
        raise Refused(400, f"amount: {exc}", "invalid_amount", "amount") from None
    if amount <= 0:
        raise Refused(400, "amount must be positive", "invalid_amount", "amount")
    return amount


def _metadata(value: dict[str, Any] | None) -> dict[str, Any]:
    """A small flat object: it is stored on the ledger entry and shown in every listing of it."""
    if not value:
        return {}
    if any(isinstance(item, dict | list) for item in value.values()):
        message = "metadata must be a flat object of strings, numbers, booleans or null"
        raise Refused(400, message, "invalid_request", "metadata")
    try:
        # allow_nan=False: Python's JSON reader accepts NaN, which neither database's JSON does.
        size = len(json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode())
    except ValueError:
        raise Refused(400, "metadata: NaN and Infinity are not JSON numbers", "invalid_request", "metadata") from None
    if size > MAX_METADATA_BYTES:
        message = f"metadata is {size} bytes of JSON; at most {MAX_METADATA_BYTES} are stored"
        raise Refused(400, message, "invalid_request", "metadata")
    return value


def _charge_metadata(principal: Principal, value: dict[str, Any] | None, run: str) -> dict[str, Any]:
    """The caller's metadata plus the API key that made the charge and the run it was made in:
    what the key's and the run's spend counters are rebuilt from when the cache loses them. A
    caller cannot set either itself (or someone else's key or run could be made to look spent)."""
    metadata = _metadata(value)
    for name in (limits.CHARGE_API_KEY_FIELD, limits.CHARGE_RUN_FIELD):
        if name in metadata:
            message = f"metadata.{name} is recorded by Tokentill, not set by the caller"
            raise Refused(400, message, "invalid_request", "metadata")
    if principal.api_key is not None:
        metadata = {**metadata, limits.CHARGE_API_KEY_FIELD: principal.api_key.pk}
    if run:
        metadata = {**metadata, limits.CHARGE_RUN_FIELD: run}
    return metadata


def _run_ask(request) -> limits.RunAsk:
    try:
        return limits.run_ask_parse(request.headers)
    except limits.InvalidRunHeader as exc:
        raise Refused(400, exc.message, "invalid_request", exc.header) from None


def _key(value: str | None) -> str:
    key = (value or "").strip()
    if not key:
        raise Refused(400, "the Idempotency-Key header is required", "idempotency_key_required", "Idempotency-Key")
    if len(key) > MAX_IDEMPOTENCY_KEY:
        message = f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters"
        raise Refused(400, message, "invalid_request", "Idempotency-Key")
    return key


def _require_billing(principal: Principal, what: str) -> None:
    if not principal.has_scope(Scope.BILLING):
        raise Refused(403, f"{what} needs an API key with the billing scope", "insufficient_scope")


def _user(ref: str | int) -> User:
    """A user by email address (case-insensitive) or by numeric id."""
    text = str(ref).strip()
    # isascii(): "²" is a digit to isdigit() but not to int(); the length bound keeps int() from
    # refusing thousands of digits (and the id within a bigint).
    if text.isascii() and text.isdigit():
        in_range = len(text) <= len(str(MAX_USER_ID)) and int(text) <= MAX_USER_ID
        found = User.objects.filter(pk=int(text)).first() if in_range else None
    else:
        found = User.objects.filter(email__iexact=text).first()
    if found is None:
        raise Refused(404, f"no such user: {text}", "user_not_found", "user")
    return found


def _wallet_of(user: User):
    return wallet_get_or_create(user=user)


def _reserve_spend(
    principal: Principal, *, wallet, idempotency_key: str, amount: int, run: limits.RunAsk
) -> limits.Reservation:
    """Count a charge against its API key's daily and monthly spend caps, and its run's spend
    limit, *before* it is posted, with the proxy's atomic counters, so concurrent charges cannot
    together pass a cap. The run is the charged user's (``wallet``'s), as their model calls' are.

    A full cap refuses a new charge (``LimitExceeded``, the 429), but not a replay: it posts
    nothing and must still answer its first result. Whether the key was already posted on is
    read only when the cap refuses; an entry, once there, stays (the ledger is append-only).
    """
    try:
        return limits.reserve_spend(
            api_key=principal.api_key,
            run=run.run,
            user_id=wallet.user_id,
            amount=amount,
            now=timezone.now(),
            run_max_spend=run.max_spend,
        )
    except limits.LimitExceeded:
        if Entry.objects.filter(wallet=wallet, idempotency_key=idempotency_key).exists():
            return limits.Reservation()  # wallet_charge answers the replay (or the 409)
        raise


# --- Schemas ------------------------------------------------------------------------------------

AMOUNT_HELP = 'USD as a decimal string, e.g. "0.010000000" (at most 9 places); JSON numbers are refused'
USER_HELP = "the user's email address or numeric id"
METADATA_HELP = f"a flat object (strings, numbers, booleans, null) of at most {MAX_METADATA_BYTES} bytes of JSON"


class BalanceOut(Schema):
    balance: str
    held: str
    available: str
    currency: str


class ChargeIn(Schema):
    # Typed loosely only so that a JSON number reaches the view and gets a clear refusal.
    amount: str | int | float = Field(description=AMOUNT_HELP)
    description: str = Field(max_length=500)
    metadata: dict[str, Any] | None = Field(default=None, description=METADATA_HELP)
    user: str | int | None = Field(default=None, description=USER_HELP + "; needs the billing scope")


class ChargeOut(Schema):
    success: bool
    charged: str
    balance: str
    entry_id: int


class ChargeRefusedOut(Schema):
    success: bool
    message: str
    topup_url: str


class DepositIn(Schema):
    user: str | int = Field(description=USER_HELP)
    amount: str | int | float = Field(description=AMOUNT_HELP)
    kind: Literal["trial", "bonus", "grant"]
    metadata: dict[str, Any] | None = Field(default=None, description=METADATA_HELP)


class DepositOut(Schema):
    entry_id: int
    balance: str


class OpenAIErrorOut(Schema):
    error: dict[str, Any]


_ERRORS = {code: OpenAIErrorOut for code in (400, 401, 403, 404, 409, 429)}


# --- Endpoints ----------------------------------------------------------------------------------


@router.get("/user/balance", response=BalanceOut, summary="The caller's wallet")
def user_balance(request):
    summary = wallet_summary(user=request.auth.user)
    return {
        "balance": format_usd(summary.balance),
        "held": format_usd(summary.held),
        "available": format_usd(summary.available),
        "currency": summary.currency,
    }


@router.post(
    "/user/charge",
    response={200: ChargeOut, 402: ChargeRefusedOut, **_ERRORS},
    summary="Charge a tool use now, if the available balance covers it",
)
@_openai_errors
def user_charge(request, body: ChargeIn, idempotency_key: str | None = Header(None, alias="Idempotency-Key")):
    principal: Principal = request.auth
    key = _key(idempotency_key)
    amount = _amount(body.amount)
    run = _run_ask(request)
    metadata = _charge_metadata(principal, body.metadata, run.run)
    target = principal.user
    if body.user is not None:
        _require_billing(principal, "charging another user")
        target = _user(body.user)
    wallet = _wallet_of(target)
    reservation = _reserve_spend(principal, wallet=wallet, idempotency_key=f"charge:{key}", amount=amount, run=run)
    posted = 0  # nanodollars this call debited: all that the spend counters keep
    try:
        entry = wallet_charge(
            wallet=wallet,
            amount=amount,
            idempotency_key=f"charge:{key}",
            reference=key,
            description=body.description,
            metadata=metadata,
        )
        posted = 0 if entry.replayed else amount
    except InsufficientFunds as short:
        return Status(
            402,
            {
                "success": False,
                "message": f"Insufficient funds: this charge needs {format_usd(amount)} USD and "
                f"{format_usd(max(short.available, 0))} USD is available. Top up to continue.",
                "topup_url": f"{settings.APP_URL}/topup",
            },
        )
    except IdempotencyConflict:
        raise  # a WalletError too, but answered 409 by _openai_errors
    except WalletError as exc:
        raise Refused(400, str(exc), "invalid_request") from None
    finally:
        # Nothing posted (402, 409, a replay of a charge already counted, an error): the
        # reservation goes back, so a cap never counts a charge twice or one that never happened.
        limits.adjust(reservation, posted)
    # The body comes from the entry, not the wallet, so a replay answers exactly what the first
    # call did even after later changes.
    return Status(
        200,
        {
            "success": True,
            "charged": format_usd(-entry.amount),
            "balance": format_usd(entry.balance_after),
            "entry_id": entry.pk,
        },
    )


@router.post(
    "/user/balance/deposit",
    response={201: DepositOut, **_ERRORS},
    summary="Credit a trial, bonus or grant to a user (billing scope)",
)
@_openai_errors
def user_deposit(request, body: DepositIn, idempotency_key: str | None = Header(None, alias="Idempotency-Key")):
    principal: Principal = request.auth
    _require_billing(principal, "depositing")
    key = _key(idempotency_key)
    amount = _amount(body.amount)
    metadata = _metadata(body.metadata)
    target = _user(body.user)
    kind = EntryKind(body.kind)
    try:
        entry = wallet_credit(
            wallet=_wallet_of(target),
            amount=amount,
            kind=kind,
            idempotency_key=f"deposit:{key}",
            reference=key,
            description=f"{kind.label} (API deposit)",
            metadata=metadata,
        )
    except IdempotencyConflict:
        raise  # a WalletError too, but answered 409 by _openai_errors
    except WalletError as exc:
        raise Refused(400, str(exc), "invalid_request") from None
    return Status(201, {"entry_id": entry.pk, "balance": format_usd(entry.balance_after)})
