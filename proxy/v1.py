"""The machine-facing ``/v1`` JSON endpoints (Django Ninja), in the OpenAI error shape.

* ``GET /v1/models`` — the models on sale, with prices (markup included).
* ``GET /v1/user/balance`` — the caller's own wallet.
* ``POST /v1/user/charge`` — debit a tool charge now (``proxy.charges``). ``user`` (an email
  address or a numeric user id) charges someone else and needs an API key with the ``billing``
  scope.
* ``POST /v1/user/balance/deposit`` — credit a trial, bonus or grant; ``billing`` scope only.

``/v1/chat/completions`` and ``/v1/embeddings`` are not here: they stream (``proxy.endpoints``).
Every endpoint authenticates with ``BearerAuth``, which also counts the key's rpm.

Both writes require an ``Idempotency-Key`` header, stored namespaced on the target wallet
(``charge:<key>``, ``deposit:<key>``) on the entry they post. Once an entry is posted, a retry
with the same key answers that entry's result and changes nothing; the same key with a different
amount is a 409. A charge refused for funds (402) posts nothing, so its key is still unused: the
same request retried after a top-up is charged then — what an agent retrying after the user tops
up needs — and only from that 200 on does the key answer the same body. Amounts are decimal
strings: a JSON number is refused rather than read through a float.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from django.conf import settings
from ninja import Header, Router, Schema, Status
from pydantic import Field, StrictInt, StrictStr

from accounts.auth import Principal
from accounts.models import Scope, User
from core.money import MoneyError, format_usd, parse_usd, usd_to_nanos
from core.numbers import parse_id
from core.openai_errors import OpenAIError
from wallet.models import EntryKind
from wallet.selectors import wallet_summary, wallet_summary_of
from wallet.services import IdempotencyConflict, InsufficientFunds, WalletError, wallet_credit, wallet_get_or_create

from . import limits, org_billing
from .charges import tool_charge
from .ninja_auth import BearerAuth
from .prices import price_public_rates, prices_current_enabled
from .selectors import choice_of, tiers_current

router = Router(auth=BearerAuth())

MAX_IDEMPOTENCY_KEY = 128  # stored as "charge:<key>" in a 200-character column
# One charge or deposit moves at most this much. Far above any tool charge or grant, far below
# what the ledger's bigint nanodollars hold (about 9.2 billion USD), so no single amount, nor a
# balance built from a few thousand of them, can overflow a column.
MAX_AMOUNT_USD = Decimal(1_000_000)
MAX_METADATA_BYTES = 4096  # the metadata object as compact UTF-8 JSON; it is copied into the ledger


def _refused(message: str, code: str, param: str | None = None, status: int = 400) -> OpenAIError:
    return OpenAIError(status, message, code=code, param=param)


IDEMPOTENCY_CONFLICT = OpenAIError(
    409,
    "this Idempotency-Key was already used for a different request",
    code="idempotency_conflict",
    param="Idempotency-Key",
)


def _amount(value: object) -> int:
    if not isinstance(value, str):
        raise _refused(
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
        raise _refused(message, "invalid_amount", "amount")
    try:
        amount = parse_usd(value)
    except MoneyError as exc:
        raise _refused(f"amount: {exc}", "invalid_amount", "amount") from None
    if amount <= 0:
        raise _refused("amount must be positive", "invalid_amount", "amount")
    return amount


def _metadata(value: dict[str, Any] | None) -> dict[str, Any]:
    """A small flat object: it is stored on the ledger entry and shown in every listing of it."""
    if not value:
        return {}
    if any(isinstance(item, dict | list) for item in value.values()):
        message = "metadata must be a flat object of strings, numbers, booleans or null"
        raise _refused(message, "invalid_request", "metadata")
    for name, item in value.items():
        _no_nul(name, "metadata")
        if isinstance(item, str):
            _no_nul(item, "metadata")
    try:
        # allow_nan=False: Python's JSON reader accepts NaN, which neither database's JSON does.
        size = len(json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode())
    except ValueError:
        raise _refused("metadata: NaN and Infinity are not JSON numbers", "invalid_request", "metadata") from None
    if size > MAX_METADATA_BYTES:
        message = f"metadata is {size} bytes of JSON; at most {MAX_METADATA_BYTES} are stored"
        raise _refused(message, "invalid_request", "metadata")
    return value


def _charge_metadata(principal: Principal, value: dict[str, Any] | None, run: str) -> dict[str, Any]:
    """The caller's metadata plus the API key that made the charge and the run it was made in:
    what the key's and the run's spend counters are rebuilt from when the cache loses them. A
    caller cannot set either itself (or someone else's key or run could be made to look spent)."""
    metadata = _metadata(value)
    for name in (limits.CHARGE_API_KEY_FIELD, limits.CHARGE_RUN_FIELD):
        if name in metadata:
            raise _refused(
                f"metadata.{name} is recorded by Tokentill, not set by the caller", "invalid_request", "metadata"
            )
    if principal.api_key is not None:
        metadata = {**metadata, limits.CHARGE_API_KEY_FIELD: principal.api_key.pk}
    if run:
        metadata = {**metadata, limits.CHARGE_RUN_FIELD: run}
    return metadata


def _run_ask(request) -> limits.RunAsk:
    try:
        return limits.run_ask_parse(request.headers)
    except limits.InvalidRunHeader as exc:
        raise _refused(exc.message, "invalid_request", exc.header) from None


def _key(value: str | None) -> str:
    key = (value or "").strip()
    if not key:
        raise _refused("the Idempotency-Key header is required", "idempotency_key_required", "Idempotency-Key")
    if len(key) > MAX_IDEMPOTENCY_KEY:
        message = f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters"
        raise _refused(message, "invalid_request", "Idempotency-Key")
    return key


def _require_billing(principal: Principal, what: str) -> None:
    if not principal.has_scope(Scope.BILLING):
        raise _refused(f"{what} needs an API key with the billing scope", "insufficient_scope", status=403)


def _user(ref: str | int) -> User:
    """A user by email address (case-insensitive) or by id: a JSON integer or ASCII digits.

    "2.0", "٢" and "+2" are none of these, so they name no user (the schema already refuses a JSON
    2.0 rather than let pydantic read it as 2)."""
    text = ref if isinstance(ref, str) else str(ref)
    _no_nul(text, "user")
    if isinstance(ref, int) or text.isdigit():
        try:
            user_id = parse_id(ref)
        except ValueError:
            user_id = None
        found = User.objects.filter(pk=user_id).first() if user_id is not None else None
    else:
        found = User.objects.filter(email__iexact=text.strip()).first()
    if found is None:
        raise _refused(f"no such user: {text}", "user_not_found", "user", status=404)
    return found


def _no_nul(text: str, param: str) -> None:
    # Neither PostgreSQL's text nor its jsonb can hold U+0000: refused here, with the field's name,
    # rather than as a database error.
    if "\x00" in text:
        raise _refused(f"{param} must not contain NUL (U+0000) characters", "invalid_request", param)


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
    user: StrictStr | StrictInt | None = Field(default=None, description=USER_HELP + "; needs the billing scope")


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
    user: StrictStr | StrictInt = Field(description=USER_HELP)
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


class ModelPricing(Schema):
    prompt: str  # USD per prompt token, markup included
    completion: str  # USD per completion token, markup included
    request: str  # USD per request, markup included


class ModelOut(Schema):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    pricing: ModelPricing
    alias_of: str | None = None  # an alias's model, whose price it is sold at
    fallback: str | None = None  # the model a wallet running low may be served by instead


class ModelList(Schema):
    object: str = "list"
    data: list[ModelOut]


def _owner(price) -> str:
    if price.is_demo:
        return "tokentill"
    owner, slash, _ = price.model.partition("/")
    return owner if slash else "tokentill"


@router.get("/models", response=ModelList, tags=["models"], summary="Models on sale, with prices")
def list_models(request):
    # The demo model stands in for an upstream; once a real upstream key is set it is not sold.
    prices = prices_current_enabled(include_demo=not settings.UPSTREAM_API_KEY)
    tiers = tiers_current()
    by_model = {price.model: price for price in prices}

    def entry(name: str, price, alias_of: str | None) -> dict:
        fallback = choice_of(tiers, model=name).fallback
        return {
            "id": name,
            "object": "model",
            "created": int(price.first_seen.timestamp()),
            "owned_by": "tokentill" if alias_of else _owner(price),
            "pricing": price_public_rates(price),
            "alias_of": alias_of,
            "fallback": fallback if fallback in by_model else None,
        }

    listed = [entry(price.model, price, None) for price in prices]
    # An alias is sold at the price of the model behind it now, and listed while that one is.
    listed += [entry(name, by_model[model], model) for name, (model, _) in tiers.aliases.items() if model in by_model]
    listed.sort(key=lambda item: item["id"])
    key = request.auth.api_key
    allowed = (key.limits or {}).get("allowed_models") if key is not None else None
    if allowed is not None:  # a restricted key sees only what it may call (the proxy's 403 rule)
        listed = [item for item in listed if item["id"] in allowed]
    return {"object": "list", "data": listed}


@router.get("/user/balance", response=BalanceOut, tags=["wallet"], summary="The caller's wallet")
def user_balance(request):
    # An organization's key, or X-Tokentill-Org: the organization's wallet (403 for a non-member).
    org = org_billing.org_billing(request.auth, (request.headers.get("X-Tokentill-Org") or "").strip())
    if org is not None:
        org.wallet.refresh_from_db()
        summary = wallet_summary_of(org.wallet)
    else:
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
    tags=["wallet"],
    summary="Charge a tool use now, if the available balance covers it",
)
def user_charge(request, body: ChargeIn, idempotency_key: str | None = Header(None, alias="Idempotency-Key")):
    principal: Principal = request.auth
    key = _key(idempotency_key)
    amount = _amount(body.amount)
    run = _run_ask(request)
    _no_nul(body.description, "description")
    metadata = _charge_metadata(principal, body.metadata, run.run)
    target = principal.user
    # An organization's key, or X-Tokentill-Org: the organization's wallet pays (403 when the
    # caller is not one of its members).
    org = org_billing.org_billing(principal, (request.headers.get("X-Tokentill-Org") or "").strip())
    if body.user is not None:
        if org is not None:
            raise _refused("`user` charges another user's own wallet: send no organization with it.", "invalid_request")
        _require_billing(principal, "charging another user")
        target = _user(body.user)
    try:
        charged = tool_charge(
            org=org,
            principal=principal,
            target=target,
            amount=amount,
            idempotency_key=key,
            description=body.description,
            metadata=metadata,
            run=run,
        )
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
        raise IDEMPOTENCY_CONFLICT from None
    except WalletError as exc:
        raise _refused(str(exc), "invalid_request") from None
    # The body comes from the entry, not the wallet, so a replay answers exactly what the first
    # call did even after later changes.
    entry = charged.entry
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
    tags=["wallet"],
    summary="Credit a trial, bonus or grant to a user (billing scope)",
)
def user_deposit(request, body: DepositIn, idempotency_key: str | None = Header(None, alias="Idempotency-Key")):
    principal: Principal = request.auth
    _require_billing(principal, "depositing")
    key = _key(idempotency_key)
    amount = _amount(body.amount)
    metadata = _metadata(body.metadata)
    target = _user(body.user)
    kind = EntryKind(body.kind)
    try:
        posted = wallet_credit(
            wallet=wallet_get_or_create(user=target),
            amount=amount,
            kind=kind,
            idempotency_key=f"deposit:{key}",
            reference=key,
            description=f"{kind.label} (API deposit)",
            metadata=metadata,
        )
    except IdempotencyConflict:
        raise IDEMPOTENCY_CONFLICT from None
    except WalletError as exc:
        raise _refused(str(exc), "invalid_request") from None
    entry = posted.entry
    return Status(201, {"entry_id": entry.pk, "balance": format_usd(entry.balance_after)})
