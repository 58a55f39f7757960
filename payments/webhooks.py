"""Webhook endpoints: verify the signature over the raw body, hand the event to the service,
map the result to a status code. Lemon Squeezy wants exactly 200; both retry on anything else."""

import json

import stripe
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from core.money import loads_decimal

from .models import Provider
from .providers import lemonsqueezy, stripe_provider
from .services import WebhookResult, webhook_receive


def _answer(result: WebhookResult) -> JsonResponse:
    if not result.ok:
        return JsonResponse({"detail": "processing failed; it will be retried"}, status=500)
    return JsonResponse({"status": result.event.status, "duplicate": result.duplicate}, status=200)


@csrf_exempt
@require_POST
def lemonsqueezy_webhook(request):
    raw = request.body
    if not lemonsqueezy.signature_valid(raw, request.headers.get("X-Signature")):
        return JsonResponse({"detail": "invalid signature"}, status=400)
    try:
        payload = loads_decimal(raw)
        event_id = lemonsqueezy.event_id(payload)
        event_type = str(payload["meta"]["event_name"])
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"detail": "not a Lemon Squeezy event"}, status=400)
    result = webhook_receive(
        provider=Provider.LEMONSQUEEZY,
        event_id=event_id,
        event_type=event_type,
        body=raw.decode(),
        test_mode=lemonsqueezy.is_test_mode(payload),
    )
    return _answer(result)


@csrf_exempt
@require_POST
def stripe_webhook(request):
    raw = request.body
    try:
        event = stripe_provider.event_from_request(raw, request.headers.get("Stripe-Signature"))
    except stripe.SignatureVerificationError:
        return JsonResponse({"detail": "invalid signature"}, status=400)
    except (ValueError, json.JSONDecodeError):
        return JsonResponse({"detail": "not a Stripe event"}, status=400)
    result = webhook_receive(
        provider=Provider.STRIPE,
        event_id=str(event["id"]),
        event_type=str(event["type"]),
        body=raw.decode(),
        test_mode=event.get("livemode") is False,
    )
    return _answer(result)
