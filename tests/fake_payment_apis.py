"""Loopback fakes of the Lemon Squeezy and Stripe APIs, plus signed webhook payloads.

Payloads follow the shared references (``reference/lemonsqueezy.md`` §3.4–3.5, ``stripe.md``
§6); ids are invented. Tests sign them exactly as the providers do: Lemon Squeezy a hex
HMAC-SHA256 of the raw body, Stripe ``t=<unix>,v1=<hex HMAC of "t.body">``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

LS_SECRET = "ls-webhook-secret-for-tests"
STRIPE_SECRET = "whsec_test_secret_for_tests"


# --- Fake APIs -----------------------------------------------------------------------------------


class _FakeApi:
    """A tiny threaded HTTP server on 127.0.0.1:0 that records requests and answers from
    ``respond(path, headers, body) -> (status, json)``."""

    def __init__(self):
        self.requests: list[dict] = []
        self.fail_with: int | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.do_POST()

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, document = fake.respond(self.path, self.headers, body)
                if fake.fail_with:
                    status, document = fake.fail_with, {"error": {"message": "fake provider failure"}}
                raw = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # shutdown() waits for serve_forever's next poll: 0.5 s by default, on every test's way out
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def respond(self, path, headers, body):
        raise NotImplementedError


class FakeLemonSqueezy(_FakeApi):
    def respond(self, path, headers, body):
        if path != "/v1/checkouts" or headers.get("Authorization") != "Bearer ls_test_key":
            return 401, {"errors": [{"detail": "Unauthenticated."}]}
        checkout_uuid = f"9b0c6a52-3c1e-4f6e-9d41-{len(self.requests):012d}"
        request = json.loads(body)
        return 201, {
            "jsonapi": {"version": "1.0"},
            "data": {
                "type": "checkouts",
                "id": checkout_uuid,
                "attributes": {
                    "store_id": int(request["data"]["relationships"]["store"]["data"]["id"]),
                    "variant_id": int(request["data"]["relationships"]["variant"]["data"]["id"]),
                    "checkout_data": request["data"]["attributes"]["checkout_data"],
                    "test_mode": request["data"]["attributes"]["test_mode"],
                    "url": f"https://tokentill.lemonsqueezy.com/checkout/custom/{checkout_uuid}?signature=abc",
                },
            },
        }


class FakeStripe(_FakeApi):
    """Creates Checkout Sessions, and lists the line items of the sessions in ``line_items``
    (``GET /v1/checkout/sessions/{id}/line_items``; any other session is a 404, as at Stripe)."""

    def __init__(self):
        super().__init__()
        self.line_items: dict[str, list[dict]] = {}

    def respond(self, path, headers, body):
        if headers.get("Authorization") != "Bearer sk_test_fake":
            return 401, {"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}}
        route, _, query = path.partition("?")
        if route.startswith("/v1/checkout/sessions/") and route.endswith("/line_items"):
            session_id = route.split("/")[4]
            if session_id not in self.line_items:
                return 404, {
                    "error": {"type": "invalid_request_error", "message": f"No such checkout.session: '{session_id}'"}
                }
            limit = int(parse_qs(query).get("limit", ["10"])[0])
            items = self.line_items[session_id]
            return 200, {
                "object": "list",
                "url": route,
                "has_more": len(items) > limit,
                "data": items[:limit],
            }
        if route != "/v1/checkout/sessions":
            return 404, {"error": {"type": "invalid_request_error", "message": "Unrecognized request URL"}}
        form = {key: values[0] for key, values in parse_qs(body.decode()).items()}
        session_id = f"cs_test_{len(self.requests):06d}"
        return 200, {
            "id": session_id,
            "object": "checkout.session",
            "mode": form.get("mode"),
            "status": "open",
            "payment_status": "unpaid",
            "client_reference_id": form.get("client_reference_id"),
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
        }

    def last_form(self) -> dict:
        return {key: values[0] for key, values in parse_qs(self.requests[-1]["body"].decode()).items()}


# --- Signing -------------------------------------------------------------------------------------


def ls_signature(body: bytes, secret: str = LS_SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def stripe_signature(body: bytes, secret: str = STRIPE_SECRET, timestamp: int | None = None) -> str:
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def post_ls(client, payload: dict, *, signature: str | None = None):
    body = json.dumps(payload).encode()
    headers = {"HTTP_X_EVENT_NAME": payload["meta"]["event_name"]}
    headers["HTTP_X_SIGNATURE"] = ls_signature(body) if signature is None else signature
    return client.post("/webhooks/lemonsqueezy", data=body, content_type="application/json", **headers)


def post_stripe(client, event: dict, *, signature: str | None = None, timestamp: int | None = None):
    body = json.dumps(event).encode()
    header = stripe_signature(body, timestamp=timestamp) if signature is None else signature
    return client.post("/webhooks/stripe", data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=header)


# --- Lemon Squeezy payloads ----------------------------------------------------------------------


def ls_order(
    *,
    order_id: int = 3310457,
    user_id,
    checkout_id: str = "",
    variant_id: int = 412233,
    total_cents: int = 1000,
    currency: str = "USD",
    status: str = "paid",
    refunded_cents: int = 0,
    event_name: str = "order_created",
    test_mode: bool = False,
) -> dict:
    refunded = refunded_cents > 0
    return {
        "meta": {
            "event_name": event_name,
            "test_mode": test_mode,
            "webhook_id": "0d6f3c2a-7e21-4b1c-9a55-3f0e8d7c6b10",
            "custom_data": {"user_id": str(user_id), "checkout_id": checkout_id},
        },
        "data": {
            "type": "orders",
            "id": str(order_id),
            "attributes": {
                "store_id": 70011,
                "customer_id": 5120098,
                "identifier": "6a2b9d1e-4c70-4f0e-8b52-91d4e3a7c0f5",
                "order_number": 1207,
                "user_name": "Ana Example",
                "user_email": "ana@example.com",
                "currency": currency,
                "currency_rate": "1.0000",
                "subtotal": total_cents,
                "discount_total": 0,
                "tax": 0,
                "total": total_cents,
                "subtotal_usd": total_cents,
                "tax_usd": 0,
                "total_usd": total_cents,
                "tax_name": None,
                "tax_rate": "0.00",
                "tax_inclusive": False,
                "status": "refunded" if refunded_cents >= total_cents else status,
                "status_formatted": "Paid",
                "refunded": refunded,
                "refunded_at": "2026-08-26T10:00:00.000000Z" if refunded else None,
                "refunded_amount": refunded_cents,
                "refunded_amount_usd": refunded_cents,
                "total_formatted": f"${total_cents / 100:.2f}",
                "first_order_item": {
                    "id": 3290112,
                    "order_id": order_id,
                    "product_id": 301122,
                    "variant_id": variant_id,
                    "product_name": "Tokentill credits",
                    "variant_name": "pack",
                    "price": total_cents,
                    "quantity": 1,
                    "test_mode": test_mode,
                },
                "urls": {"receipt": "https://app.lemonsqueezy.com/my-orders/6a2b9d1e?signature=x"},
                "created_at": "2026-08-25T09:31:40.000000Z",
                "updated_at": "2026-08-25T09:31:41.000000Z",
                "test_mode": test_mode,
            },
        },
    }


def ls_refund(*, order_id: int = 3310457, user_id, refunded_cents: int, total_cents: int = 1000, **kwargs) -> dict:
    return ls_order(
        order_id=order_id,
        user_id=user_id,
        total_cents=total_cents,
        refunded_cents=refunded_cents,
        event_name="order_refunded",
        **kwargs,
    )


def ls_subscription(
    *,
    subscription_id: int = 880011,
    user_id,
    variant_id: int = 555001,
    event_name: str = "subscription_created",
    status: str = "active",
    updated_at: str = "2026-08-25T09:31:41.000000Z",
) -> dict:
    return {
        "meta": {"event_name": event_name, "test_mode": False, "custom_data": {"user_id": str(user_id)}},
        "data": {
            "type": "subscriptions",
            "id": str(subscription_id),
            "attributes": {
                "store_id": 70011,
                "customer_id": 5120098,
                "order_id": 3310999,
                "product_id": 301123,
                "variant_id": variant_id,
                "status": status,
                "cancelled": status == "cancelled",
                "renews_at": "2026-09-25T09:31:41.000000Z",
                "ends_at": None,
                "created_at": "2026-08-25T09:31:40.000000Z",
                "updated_at": updated_at,
                "test_mode": False,
            },
        },
    }


def ls_invoice(*, invoice_id: int = 770001, subscription_id: int = 880011, total_cents: int = 2000) -> dict:
    return {
        "meta": {"event_name": "subscription_payment_success", "test_mode": False, "custom_data": {}},
        "data": {
            "type": "subscription-invoices",
            "id": str(invoice_id),
            "attributes": {
                "store_id": 70011,
                "subscription_id": subscription_id,
                "customer_id": 5120098,
                "billing_reason": "renewal",
                "currency": "USD",
                "currency_rate": "1.0000",
                "status": "paid",
                "refunded": False,
                "subtotal": total_cents,
                "discount_total": 0,
                "tax": 0,
                "tax_inclusive": False,
                "total": total_cents,
                "refunded_amount": 0,
                "subtotal_usd": total_cents,
                "tax_usd": 0,
                "total_usd": total_cents,
                "created_at": "2026-09-25T09:31:40.000000Z",
                "updated_at": "2026-09-25T09:31:41.000000Z",
                "test_mode": False,
            },
        },
    }


# --- Stripe payloads -----------------------------------------------------------------------------


def stripe_event(event_type: str, obj: dict, *, event_id: str = "evt_1Qx7Tokentill0001", livemode: bool = True):
    return {
        "id": event_id,
        "object": "event",
        "api_version": "2025-08-27.basil",
        "created": int(time.time()),
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
        "data": {"object": obj},
    }


def stripe_session(
    *,
    session_id: str = "cs_test_a1B2c3D4e5",
    checkout_id: str,
    user_id,
    amount_cents: int = 1000,
    currency: str = "usd",
    payment_status: str = "paid",
    payment_intent: str = "pi_3Qx7Tokentill0001",
    mode: str = "payment",
    subscription: str | None = None,
) -> dict:
    return {
        "id": session_id,
        "object": "checkout.session",
        "mode": mode,
        "status": "complete",
        "payment_status": payment_status,
        "amount_subtotal": amount_cents,
        "amount_total": amount_cents,
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "currency": currency,
        "client_reference_id": checkout_id,
        "metadata": {"user_id": str(user_id), "checkout_id": checkout_id},
        "customer": None,
        "customer_details": {"email": "ana@example.com"},
        "payment_intent": payment_intent if mode == "payment" else None,
        "invoice": None,
        "subscription": subscription,
        "url": None,
    }


def stripe_line_item(*, price_id: str, quantity: int = 1, unit_cents: int = 1000, currency: str = "usd") -> dict:
    """One entry of ``GET /v1/checkout/sessions/{id}/line_items`` (the Price abridged)."""
    return {
        "id": f"li_{price_id}",
        "object": "item",
        "amount_discount": 0,
        "amount_subtotal": unit_cents * quantity,
        "amount_tax": 0,
        "amount_total": unit_cents * quantity,
        "currency": currency,
        "description": "Tokentill credits",
        "price": {
            "id": price_id,
            "object": "price",
            "currency": currency,
            "unit_amount": unit_cents,
            "type": "one_time",
        },
        "quantity": quantity,
    }


def stripe_payment_link_session(
    *, session_id: str = "cs_live_link0001", user_id, amount_cents: int = 1000, tax_cents: int = 0
) -> dict:
    """A session a Payment Link opened with ``?client_reference_id=<user id>``: no checkout of ours
    in it, the Payment Link's own (here empty) metadata, and no line items — the event never has them."""
    session = stripe_session(
        session_id=session_id, checkout_id="", user_id=user_id, amount_cents=amount_cents, payment_intent="pi_link0001"
    )
    session.update(
        client_reference_id=str(user_id),
        metadata={},
        payment_link="plink_1QxTokentill01",
        total_details={"amount_discount": 0, "amount_shipping": 0, "amount_tax": tax_cents},
    )
    return session


def stripe_charge(
    *,
    charge_id: str = "ch_3Qx7Tokentill0001",
    payment_intent: str = "pi_3Qx7Tokentill0001",
    amount: int = 1000,
    amount_refunded: int,
) -> dict:
    return {
        "id": charge_id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "refunded": amount_refunded >= amount,
        "currency": "usd",
        "payment_intent": payment_intent,
        "metadata": {},
        "status": "succeeded",
    }


def stripe_invoice(
    *,
    invoice_id: str = "in_1QxTokentill01",
    subscription: str = "sub_1QxTokentill01",
    amount: int = 2000,
    checkout_id: str = "",
    legacy: bool = False,
) -> dict:
    invoice = {
        "id": invoice_id,
        "object": "invoice",
        "customer": "cus_Tokentill01",
        "currency": "usd",
        "status": "paid",
        "amount_due": amount,
        "amount_paid": amount,
        "amount_remaining": 0,
        "total": amount,
        "total_excluding_tax": amount,
        "billing_reason": "subscription_cycle",
        "attempt_count": 1,
        "next_payment_attempt": None,
        "metadata": {},
    }
    if legacy:
        invoice["subscription"] = subscription
        invoice["subscription_details"] = {"metadata": {"checkout_id": checkout_id} if checkout_id else {}}
    else:
        invoice["parent"] = {
            "type": "subscription_details",
            "subscription_details": {
                "subscription": subscription,
                "metadata": {"checkout_id": checkout_id} if checkout_id else {},
            },
        }
    return invoice
