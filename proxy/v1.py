"""The proxy's Ninja endpoints under ``/v1``: the model list with its prices.

``/v1/chat/completions`` is a Channels consumer, not here (it streams).
"""

from django.conf import settings
from ninja import Router, Schema

from accounts.ninja_auth import BearerAuth

from .prices import price_public_rates, prices_current_enabled

router = Router(tags=["models"])


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


class ModelList(Schema):
    object: str = "list"
    data: list[ModelOut]


def _owner(price) -> str:
    if price.is_demo:
        return "tokentill"
    owner, slash, _ = price.model.partition("/")
    return owner if slash else "tokentill"


@router.get("/models", response=ModelList, auth=BearerAuth(), summary="Models on sale, with prices")
def list_models(request):
    # The demo model stands in for an upstream; once a real upstream key is set it is not sold.
    prices = prices_current_enabled(include_demo=not settings.UPSTREAM_API_KEY)
    key = request.auth.api_key
    allowed = (key.limits or {}).get("allowed_models") if key is not None else None
    if allowed is not None:  # a restricted key sees only what it may call (the proxy's 403 rule)
        prices = [price for price in prices if price.model in allowed]
    return {
        "object": "list",
        "data": [
            {
                "id": price.model,
                "object": "model",
                "created": int(price.first_seen.timestamp()),
                "owned_by": _owner(price),
                "pricing": price_public_rates(price),
            }
            for price in prices
        ],
    }
