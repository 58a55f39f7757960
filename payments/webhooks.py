"""Webhook endpoints: verify the signature over the raw body, hand the delivery to the service,
map the result to a status code. Lemon Squeezy wants exactly 200; both retry on anything else,
which is right for a transient failure (500) — a body we can never process is a 400, stored as
``rejected`` for staff."""

import stripe
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from .models import Provider
from .providers import lemonsqueezy, stripe_provider
from .services import WebhookResult, webhook_receive


def _answer(result: WebhookResult) -> JsonResponse:
    if result.rejected:
        return JsonResponse({"detail": f"unreadable event: {result.event.error}"}, status=400)
    if not result.ok:
        return JsonResponse({"detail": "processing failed; it will be retried"}, status=500)
    return JsonResponse({"status": result.event.status, "duplicate": result.duplicate}, status=200)


@csrf_exempt
@require_POST
def lemonsqueezy_webhook(request):
    raw = request.body
    if not lemonsqueezy.signature_valid(raw, request.headers.get("X-Signature")):
        return JsonResponse({"detail": "invalid signature"}, status=400)
    hint = request.headers.get("X-Event-Name", "")
    return _answer(webhook_receive(provider=Provider.LEMONSQUEEZY, body=raw, event_type_hint=hint))


@csrf_exempt
@require_POST
def stripe_webhook(request):
    raw = request.body
    try:
        stripe_provider.verify_signature(raw, request.headers.get("Stripe-Signature"))
    except stripe.SignatureVerificationError:
        return JsonResponse({"detail": "invalid signature"}, status=400)
    except ValueError:  # not UTF-8: no signature can be checked over it
        return JsonResponse({"detail": "not a Stripe event"}, status=400)
    return _answer(webhook_receive(provider=Provider.STRIPE, body=raw))
