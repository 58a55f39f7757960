"""State changes for payments: checkouts out, verified webhook events in.

Webhook policy (read before changing anything here):

* The view verifies the signature over the raw body, then ``webhook_receive`` stores the event in
  its own short transaction. ``(provider, event_id)`` is UNIQUE: a duplicate delivery — also N
  parallel ones — hits the constraint and finds the first row; there is no ``exists()`` check to
  race past.
* ``webhook_event_process`` then locks that row (``select_for_update``; SQLite's IMMEDIATE
  transactions serialise the same way) and handles it in ONE durable transaction together with
  the wallet change, so "processed" and "credited" commit or roll back together. A row that is
  already processed/ignored/pending is answered as a duplicate.
* A handler error rolls everything back, marks the row ``failed`` with the error and the view
  answers 500 so the provider retries; a retry or a staff replay processes it again.
* What is credited comes from what was paid: the pack is found from the paid variant / our own
  checkout row, and the paid amount and currency must equal the pack's price. Anything else is
  stored as a ``flagged`` payment with a staff alert and credits nothing (answered 200: a retry
  cannot fix it).
* A refund (or subscription invoice) that arrives before the payment (subscription) it belongs to
  is parked as ``pending`` with ``waiting_for``. After any event commits, parked events waiting for
  what it created are processed; a freshly parked event re-checks once after its own commit, so
  whichever of the two commits last sees the other — nothing is lost in between.
* Every wallet change goes through ``wallet.services`` with a provider-derived idempotency key,
  the second line of defence behind the event constraint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from core.money import NANOS_PER_USD, format_cents, loads_decimal, mul_round, usd_to_nanos
from wallet.models import EntryKind
from wallet.services import wallet_credit, wallet_get_or_create, wallet_refund

from .models import (
    Checkout,
    CheckoutStatus,
    CreditPack,
    EventStatus,
    Payment,
    PaymentStatus,
    Provider,
    StaffAlert,
    Subscription,
    SubscriptionStatus,
    WebhookEvent,
)
from .providers import lemonsqueezy, stripe_provider
from .providers.errors import ProviderError

log = logging.getLogger(__name__)

NANOS_PER_CENT = NANOS_PER_USD // 100


class PaymentsError(Exception):
    pass


class UnknownPack(PaymentsError):
    pass


class ProviderNotConfigured(PaymentsError):
    pass


__all__ = ["ProviderError", "ProviderNotConfigured", "UnknownPack"]


# --- Checkout ------------------------------------------------------------------------------------


def _provider_ready(provider: str, pack: CreditPack) -> bool:
    if provider == Provider.LEMONSQUEEZY:
        return lemonsqueezy.is_configured() and bool(pack.lemonsqueezy_variant_id)
    return stripe_provider.is_configured() and bool(pack.stripe_price_id)


def checkout_create(*, user, pack_slug: str, provider: str | None = None) -> Checkout:
    """Create our checkout row, then the provider's hosted checkout for it.

    The provider call happens outside any transaction (no row lock is held across the network);
    the row exists first so its id can ride in the provider's custom data.
    """
    pack = CreditPack.objects.filter(slug=pack_slug, active=True).first()
    if pack is None:
        raise UnknownPack(f"There is no credit pack {pack_slug!r}.")
    if provider is None:
        provider = Provider.LEMONSQUEEZY if _provider_ready(Provider.LEMONSQUEEZY, pack) else Provider.STRIPE
    if not _provider_ready(provider, pack):
        label = Provider(provider).label
        raise ProviderNotConfigured(f"Payments through {label} are not configured for the {pack.name} pack.")

    checkout = Checkout.objects.create(user=user, pack=pack, provider=provider)
    done_url = f"{settings.APP_URL}/topup/done?checkout={checkout.public_id}"
    try:
        if provider == Provider.LEMONSQUEEZY:
            created = lemonsqueezy.checkout_create(
                variant_id=pack.lemonsqueezy_variant_id,
                checkout_id=checkout.public_id,
                user_id=user.pk,
                redirect_url=done_url,
            )
        else:
            created = stripe_provider.checkout_create(
                price_id=pack.stripe_price_id,
                checkout_id=checkout.public_id,
                user_id=user.pk,
                pack_slug=pack.slug,
                recurring=pack.recurring,
                success_url=done_url,
                cancel_url=f"{settings.APP_URL}/topup",
            )
    except ProviderError as exc:
        Checkout.objects.filter(pk=checkout.pk).update(status=CheckoutStatus.FAILED, error=str(exc))
        raise
    checkout.provider_checkout_id = created.provider_checkout_id
    checkout.url = created.url
    checkout.save(update_fields=["provider_checkout_id", "url"])
    return checkout


# --- Webhook pipeline ----------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str
    note: str = ""
    waiting_for: str = ""
    unparks: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class WebhookResult:
    event: WebhookEvent
    ok: bool  # False → answer 500 so the provider retries
    duplicate: bool = False


FINAL = {EventStatus.PROCESSED, EventStatus.IGNORED}


def webhook_receive(*, provider: str, event_id: str, event_type: str, body: str, test_mode: bool) -> WebhookResult:
    """Store a verified delivery once and process it. Duplicates find the first row."""
    try:
        with transaction.atomic():
            event = WebhookEvent.objects.create(
                provider=provider,
                event_id=event_id,
                event_type=event_type,
                body=body,
                signature_valid=True,
                test_mode=test_mode,
            )
    except IntegrityError:
        # The constraint, not a prior exists() check, decides who was first.
        event = WebhookEvent.objects.get(provider=provider, event_id=event_id)
    return webhook_event_process(event=event)


def webhook_event_replay(*, event: WebhookEvent) -> WebhookResult:
    """Staff replay of a failed (or still parked) event: the same path a provider retry takes."""
    return webhook_event_process(event=event, force=True)


def webhook_event_process(*, event: WebhookEvent, force: bool = False, recheck: bool = True) -> WebhookResult:
    """Handle one stored event in one transaction. ``force`` also retries a parked event."""
    try:
        with transaction.atomic(durable=True):
            locked = WebhookEvent.objects.select_for_update().get(pk=event.pk)
            if locked.status in FINAL or (locked.status == EventStatus.PENDING and not force):
                return WebhookResult(event=locked, ok=True, duplicate=True)
            locked.attempts += 1
            outcome = _dispatch(locked)
            locked.status = outcome.status
            locked.waiting_for = outcome.waiting_for
            locked.error = outcome.note
            locked.processed_at = timezone.now()
            locked.save(update_fields=["status", "waiting_for", "error", "processed_at", "attempts"])
    except Exception as exc:
        log.exception("webhook event %s (%s %s) failed", event.pk, event.provider, event.event_type)
        WebhookEvent.objects.filter(pk=event.pk).update(
            status=EventStatus.FAILED,
            error=f"{type(exc).__name__}: {exc}"[:2000],
            attempts=F("attempts") + 1,
            processed_at=timezone.now(),
        )
        event.refresh_from_db()
        return WebhookResult(event=event, ok=False)

    # Both after commit, so a parked event and the payment it waits for always meet (see module doc).
    for key in outcome.unparks:
        for parked in WebhookEvent.objects.filter(status=EventStatus.PENDING, waiting_for=key).order_by("id"):
            webhook_event_process(event=parked, force=True, recheck=False)
    if outcome.status == EventStatus.PENDING and recheck:
        return webhook_event_process(event=locked, force=True, recheck=False)
    return WebhookResult(event=locked, ok=True)


def _dispatch(event: WebhookEvent) -> Outcome:
    payload = loads_decimal(event.body)
    if event.test_mode and not settings.PAYMENTS_TEST_MODE:
        return Outcome(EventStatus.IGNORED, note="test-mode event ignored: PAYMENTS_TEST_MODE is off")
    handlers = LEMONSQUEEZY_HANDLERS if event.provider == Provider.LEMONSQUEEZY else STRIPE_HANDLERS
    handler = handlers.get(event.event_type)
    if handler is None:
        return Outcome(EventStatus.IGNORED, note="event type not handled")
    return handler(event, payload)


# --- Shared helpers ------------------------------------------------------------------------------


def _cents(value) -> int:
    """A provider amount in cents: an integer, never a fraction or a float."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{value!r} is not an amount in cents")
    if int(value) != value:
        raise ValueError(f"{value!r} is not a whole number of cents")
    return int(value)


def _fee(provider: str, gross: int) -> int:
    """The processor's fee on ``gross`` nanodollars, from its published schedule (settings)."""
    if gross <= 0:
        return 0
    if provider == Provider.LEMONSQUEEZY:
        percent, fixed = settings.LEMONSQUEEZY_FEE_PERCENT, settings.LEMONSQUEEZY_FEE_FIXED
    else:
        percent, fixed = settings.STRIPE_FEE_PERCENT, settings.STRIPE_FEE_FIXED
    return mul_round(gross, percent / 100) + usd_to_nanos(fixed)


def _user(raw_id):
    text = str(raw_id or "").strip()
    if not text.isdigit():
        return None
    return get_user_model().objects.filter(pk=int(text), is_active=True).first()


def _price_problem(pack: CreditPack, *, paid_cents: int, currency: str) -> str | None:
    if currency.upper() != pack.currency.upper():
        return f"paid in {currency.upper()}, but the {pack.name} pack is priced in {pack.currency}"
    if paid_cents * NANOS_PER_CENT != pack.price:
        return (
            f"paid {format_cents(paid_cents * NANOS_PER_CENT)} for the {pack.name} pack, "
            f"which costs {format_cents(pack.price)}"
        )
    return None


def _alert(*, kind: str, message: str, event: WebhookEvent | None = None, payment: Payment | None = None):
    alert = StaffAlert.objects.create(kind=kind, message=message, event=event, payment=payment)
    recipients = list(settings.STAFF_ALERT_EMAILS)
    if recipients:
        subject = f"[{settings.APP_TITLE}] payments: {kind.replace('_', ' ')}"
        # robust: a mail server outage must not turn a committed webhook into a 500.
        transaction.on_commit(lambda: send_mail(subject, message, settings.DEFAULT_FROM_EMAIL, recipients), robust=True)
    return alert


def _flag(event: WebhookEvent, *, reason: str, **payment_fields) -> Outcome:
    """Store what was paid, credit nothing, tell staff. Not retryable, so the event is processed."""
    payment, created = Payment.objects.get_or_create(
        provider=payment_fields.pop("provider"),
        provider_payment_id=payment_fields.pop("provider_payment_id"),
        defaults={**payment_fields, "status": PaymentStatus.FLAGGED, "flag_reason": reason},
    )
    if created:
        _alert(
            kind="payment_flagged", message=f"{payment}: {reason}. Nothing was credited.", event=event, payment=payment
        )
    return Outcome(EventStatus.PROCESSED, note=f"flagged: {reason}")


def _credit_payment(
    event: WebhookEvent,
    *,
    kind: str,
    idempotency_key: str,
    description: str,
    pack: CreditPack,
    credit: int,
    user,
    **payment_fields,
) -> Payment:
    payment, created = Payment.objects.get_or_create(
        provider=payment_fields.pop("provider"),
        provider_payment_id=payment_fields.pop("provider_payment_id"),
        defaults={**payment_fields, "user": user, "pack": pack, "credit": credit},
    )
    if created:
        wallet_credit(
            wallet=wallet_get_or_create(user=user),
            amount=credit,
            kind=kind,
            idempotency_key=idempotency_key,
            reference=payment.provider_payment_id,
            description=description,
            metadata={"provider": payment.provider, "payment": payment.provider_payment_id, "event": event.event_id},
        )
    return payment


def _amounts(provider: str, gross_cents: int) -> dict:
    gross = gross_cents * NANOS_PER_CENT
    fee = _fee(provider, gross)
    return {"gross": gross, "fee": fee, "net": gross - fee}


def _proportion(credit: int, part: int, whole: int) -> int:
    """``credit × part / whole`` rounded half-up to a nanodollar, in exact integer arithmetic."""
    if whole <= 0:
        return credit
    quotient, remainder = divmod(credit * part, whole)
    return quotient + (1 if 2 * remainder >= whole else 0)


def _apply_refund(
    payment: Payment, *, refunded_cents: int, total_cents: int, idempotency_key: str, description: str
) -> str:
    """Claw back credit for the increase in the cumulative refunded amount.

    The target is recomputed from the cumulative figure each time, so two partial refunds never
    drift by rounding, and a stale (smaller) cumulative figure delivered late claws back nothing.
    ``payment`` must be locked by the caller.
    """
    refunded_cents = min(refunded_cents, total_cents) if total_cents > 0 else refunded_cents
    target = min(payment.credit, _proportion(payment.credit, refunded_cents, total_cents))
    delta = target - payment.clawed_back
    if delta > 0:
        wallet_refund(
            wallet=wallet_get_or_create(user=payment.user),
            amount=delta,
            idempotency_key=idempotency_key,
            reference=payment.provider_payment_id,
            description=description,
            metadata={"provider": payment.provider, "payment": payment.provider_payment_id},
        )
        payment.clawed_back = target
    payment.refunded_amount = max(payment.refunded_amount, refunded_cents * NANOS_PER_CENT)
    if payment.status != PaymentStatus.FLAGGED:
        fully = payment.refunded_amount >= payment.gross
        payment.status = PaymentStatus.REFUNDED if fully else PaymentStatus.PARTIALLY_REFUNDED
    payment.save(update_fields=["clawed_back", "refunded_amount", "status"])
    return f"clawed back {max(delta, 0)} nanodollars" if delta > 0 else "no further credit to claw back"


def _payment_key(provider: str, provider_payment_id: str) -> str:
    return f"{provider}:payment:{provider_payment_id}"


def _subscription_key(provider: str, subscription_id: str) -> str:
    return f"{provider}:subscription:{subscription_id}"


def _locked_payment(provider: str, provider_payment_id: str) -> Payment | None:
    return (
        Payment.objects.select_for_update(of=("self",))
        .filter(provider=provider, provider_payment_id=provider_payment_id)
        .select_related("user")
        .first()
    )


def _locked_subscription(provider: str, subscription_id: str) -> Subscription | None:
    return (
        Subscription.objects.select_for_update(of=("self",))
        .filter(provider=provider, provider_subscription_id=subscription_id)
        .select_related("pack", "user")
        .first()
    )


# --- Lemon Squeezy -------------------------------------------------------------------------------

LS = Provider.LEMONSQUEEZY


def _ls_paid_for_pack(attributes: dict) -> int:
    """USD cents paid for the product: the total, less tax when tax was added on top."""
    total = _cents(attributes["total_usd"])
    if attributes.get("tax_inclusive"):
        return total
    return total - _cents(attributes.get("tax_usd") or 0)


def _ls_order_created(event: WebhookEvent, payload: dict) -> Outcome:
    data, meta = payload["data"], payload.get("meta") or {}
    attributes = data["attributes"]
    order_id = str(data["id"])
    if attributes.get("status") != "paid":
        return Outcome(EventStatus.IGNORED, note=f"order status is {attributes.get('status')!r}, not paid")
    variant_id = str((attributes.get("first_order_item") or {}).get("variant_id", ""))
    pack = CreditPack.objects.filter(lemonsqueezy_variant_id=variant_id).first() if variant_id else None
    if pack is not None and pack.recurring:
        return Outcome(EventStatus.IGNORED, note="first order of a subscription: its invoice grants the credit")
    custom = meta.get("custom_data") or {}
    user = _user(custom.get("user_id"))
    checkout = Checkout.objects.filter(public_id=str(custom.get("checkout_id", "")), user=user).first()
    common = {
        "provider": LS,
        "provider_payment_id": order_id,
        "currency": str(attributes.get("currency", "USD")).upper(),
        "test_mode": event.test_mode,
        "checkout": checkout,
        **_amounts(LS, _cents(attributes["total_usd"])),
    }
    if pack is None:
        return _flag(event, reason=f"variant {variant_id or '(none)'} is not a credit pack", user=user, **common)
    if user is None:
        return _flag(
            event, reason=f"custom_data.user_id {custom.get('user_id')!r} is not a known user", pack=pack, **common
        )
    problem = _price_problem(pack, paid_cents=_ls_paid_for_pack(attributes), currency=str(attributes["currency"]))
    if problem:
        return _flag(event, reason=problem, user=user, pack=pack, **common)
    _credit_payment(
        event,
        kind=EntryKind.TOP_UP,
        idempotency_key=f"lemonsqueezy:order:{order_id}",
        description=f"{pack.name} credit pack (Lemon Squeezy order {attributes.get('order_number', order_id)})",
        pack=pack,
        credit=pack.credit,
        user=user,
        **common,
    )
    if checkout is not None:
        Checkout.objects.filter(pk=checkout.pk).update(status=CheckoutStatus.COMPLETED)
    return Outcome(EventStatus.PROCESSED, unparks=(_payment_key(LS, order_id),))


def _ls_refund(event: WebhookEvent, payload: dict, *, payment_id: str) -> Outcome:
    attributes = payload["data"]["attributes"]
    payment = _locked_payment(LS, payment_id)
    if payment is None:
        key = _payment_key(LS, payment_id)
        return Outcome(EventStatus.PENDING, note="refund before its payment: parked", waiting_for=key)
    refunded = _cents(attributes.get("refunded_amount") or 0)
    note = _apply_refund(
        payment,
        refunded_cents=refunded,
        total_cents=_cents(attributes["total"]),
        idempotency_key=f"lemonsqueezy:refund:{payment_id}:{refunded}",
        description=f"Refund of Lemon Squeezy {payment_id}",
    )
    return Outcome(EventStatus.PROCESSED, note=note)


def _ls_order_refunded(event: WebhookEvent, payload: dict) -> Outcome:
    return _ls_refund(event, payload, payment_id=str(payload["data"]["id"]))


def _ls_invoice_refunded(event: WebhookEvent, payload: dict) -> Outcome:
    return _ls_refund(event, payload, payment_id=f"invoice:{payload['data']['id']}")


_LS_SUBSCRIPTION_STATUS = {"cancelled": SubscriptionStatus.CANCELLED, "expired": SubscriptionStatus.EXPIRED}


def _ls_subscription_sync(event: WebhookEvent, payload: dict) -> Outcome:
    """Any subscription state event: create the row on first sight, else move its status —
    unless this state is older than the one we hold (deliveries are not ordered)."""
    data, meta = payload["data"], payload.get("meta") or {}
    attributes = data["attributes"]
    subscription_id = str(data["id"])
    status = _LS_SUBSCRIPTION_STATUS.get(attributes.get("status"), SubscriptionStatus.ACTIVE)
    if event.event_type == "subscription_cancelled":
        status = SubscriptionStatus.CANCELLED
    elif event.event_type == "subscription_expired":
        status = SubscriptionStatus.EXPIRED
    state_at = parse_datetime(str(attributes.get("updated_at") or "")) or timezone.now()
    unparks = (_subscription_key(LS, subscription_id),)
    subscription = _locked_subscription(LS, subscription_id)
    if subscription is not None:
        if subscription.state_at and state_at < subscription.state_at:
            return Outcome(EventStatus.IGNORED, note="older than the subscription state already recorded")
        subscription.status, subscription.state_at = status, state_at
        subscription.save(update_fields=["status", "state_at"])
        return Outcome(EventStatus.PROCESSED, unparks=unparks)
    user = _user((meta.get("custom_data") or {}).get("user_id"))
    pack = CreditPack.objects.filter(lemonsqueezy_variant_id=str(attributes.get("variant_id", ""))).first()
    if user is None or pack is None:
        _alert(
            kind="subscription_unmatched",
            message=f"Lemon Squeezy subscription {subscription_id}: unknown user or variant; nothing will be granted.",
            event=event,
        )
        return Outcome(EventStatus.IGNORED, note="subscription without a known user or credit pack")
    Subscription.objects.create(
        provider=LS,
        provider_subscription_id=subscription_id,
        user=user,
        pack=pack,
        credit=pack.credit,
        status=status,
        state_at=state_at,
    )
    return Outcome(EventStatus.PROCESSED, unparks=unparks)


def _grant_invoice(
    event: WebhookEvent,
    subscription: Subscription,
    *,
    provider: str,
    payment_id: str,
    idempotency_key: str,
    gross_cents: int,
    paid_cents: int,
    currency: str,
    payment_intent: str = "",
) -> Outcome:
    if subscription.status != SubscriptionStatus.ACTIVE:
        return Outcome(EventStatus.IGNORED, note=f"subscription is {subscription.status}: no further grants")
    pack = subscription.pack
    common = {
        "provider": provider,
        "provider_payment_id": payment_id,
        "currency": currency.upper(),
        "test_mode": event.test_mode,
        "subscription": subscription,
        "payment_intent": payment_intent,
        **_amounts(provider, gross_cents),
    }
    problem = _price_problem(pack, paid_cents=paid_cents, currency=currency)
    if problem:
        return _flag(event, reason=problem, user=subscription.user, pack=pack, **common)
    _credit_payment(
        event,
        kind=EntryKind.GRANT,
        idempotency_key=idempotency_key,
        description=f"{pack.name} subscription credit",
        pack=pack,
        credit=subscription.credit,
        user=subscription.user,
        **common,
    )
    return Outcome(EventStatus.PROCESSED, unparks=(_payment_key(provider, payment_id),))


def _ls_subscription_payment_success(event: WebhookEvent, payload: dict) -> Outcome:
    data = payload["data"]
    attributes = data["attributes"]
    invoice_id = str(data["id"])
    if attributes.get("status") != "paid":
        return Outcome(EventStatus.IGNORED, note=f"invoice status is {attributes.get('status')!r}, not paid")
    subscription_id = str(attributes.get("subscription_id", ""))
    subscription = _locked_subscription(LS, subscription_id)
    if subscription is None:
        key = _subscription_key(LS, subscription_id)
        return Outcome(EventStatus.PENDING, note="invoice before its subscription: parked", waiting_for=key)
    return _grant_invoice(
        event,
        subscription,
        provider=LS,
        payment_id=f"invoice:{invoice_id}",
        idempotency_key=f"lemonsqueezy:invoice:{invoice_id}",
        gross_cents=_cents(attributes["total_usd"]),
        paid_cents=_ls_paid_for_pack(attributes),
        currency=str(attributes.get("currency", "")),
    )


LEMONSQUEEZY_HANDLERS = {
    "order_created": _ls_order_created,
    "order_refunded": _ls_order_refunded,
    "subscription_created": _ls_subscription_sync,
    "subscription_updated": _ls_subscription_sync,
    "subscription_cancelled": _ls_subscription_sync,
    "subscription_resumed": _ls_subscription_sync,
    "subscription_expired": _ls_subscription_sync,
    "subscription_payment_success": _ls_subscription_payment_success,
    "subscription_payment_refunded": _ls_invoice_refunded,
}


# --- Stripe --------------------------------------------------------------------------------------

ST = Provider.STRIPE


def _stripe_checkout(session: dict) -> Checkout | None:
    """Our checkout row: ``client_reference_id`` is set server-side when the session is created."""
    public_id = session.get("client_reference_id") or (session.get("metadata") or {}).get("checkout_id")
    if not public_id:
        return None
    return Checkout.objects.filter(public_id=str(public_id), provider=ST).select_related("pack", "user").first()


def _stripe_session_paid(event: WebhookEvent, payload: dict) -> Outcome:
    session = payload["data"]["object"]
    session_id = str(session["id"])
    if session.get("payment_status") != "paid":
        note = f"payment_status is {session.get('payment_status')!r}: waiting for async_payment_succeeded"
        return Outcome(EventStatus.IGNORED, note=note)
    checkout = _stripe_checkout(session)
    if session.get("mode") == "subscription":
        return _stripe_subscription_started(event, session, checkout)
    total = _cents(session.get("amount_total") or 0)
    tax = _cents((session.get("total_details") or {}).get("amount_tax") or 0)
    currency = str(session.get("currency") or "").upper()
    common = {
        "provider": ST,
        "provider_payment_id": session_id,
        "payment_intent": str(session.get("payment_intent") or ""),
        "currency": currency,
        "test_mode": event.test_mode,
        "checkout": checkout,
        **_amounts(ST, total),
    }
    if checkout is None:
        reference = session.get("client_reference_id")
        return _flag(event, reason=f"client_reference_id {reference!r} is not one of our checkouts", **common)
    pack, user = checkout.pack, checkout.user
    problem = _price_problem(pack, paid_cents=total - tax, currency=currency)
    if problem:
        return _flag(event, reason=problem, user=user, pack=pack, **common)
    _credit_payment(
        event,
        kind=EntryKind.TOP_UP,
        idempotency_key=f"stripe:checkout:{session_id}",
        description=f"{pack.name} credit pack (Stripe)",
        pack=pack,
        credit=pack.credit,
        user=user,
        **common,
    )
    Checkout.objects.filter(pk=checkout.pk).update(status=CheckoutStatus.COMPLETED)
    unparks = [_payment_key(ST, session_id)]
    if common["payment_intent"]:
        unparks.append(f"stripe:payment_intent:{common['payment_intent']}")
    return Outcome(EventStatus.PROCESSED, unparks=tuple(unparks))


def _stripe_subscription_from_checkout(subscription_id: str, checkout: Checkout) -> Subscription:
    subscription, _ = Subscription.objects.get_or_create(
        provider=ST,
        provider_subscription_id=subscription_id,
        defaults={"user": checkout.user, "pack": checkout.pack, "credit": checkout.pack.credit},
    )
    Checkout.objects.filter(pk=checkout.pk).update(status=CheckoutStatus.COMPLETED)
    return subscription


def _stripe_subscription_started(event: WebhookEvent, session: dict, checkout: Checkout | None) -> Outcome:
    subscription_id = str(session.get("subscription") or "")
    if checkout is None or not subscription_id:
        _alert(
            kind="subscription_unmatched",
            message=f"Stripe session {session.get('id')}: subscription without one of our checkouts.",
            event=event,
        )
        return Outcome(EventStatus.IGNORED, note="subscription session without one of our checkouts")
    _stripe_subscription_from_checkout(subscription_id, checkout)
    return Outcome(EventStatus.PROCESSED, unparks=(_subscription_key(ST, subscription_id),))


def _stripe_session_closed(event: WebhookEvent, payload: dict) -> Outcome:
    checkout = _stripe_checkout(payload["data"]["object"])
    if checkout is None:
        return Outcome(EventStatus.IGNORED, note="not one of our checkouts")
    status = CheckoutStatus.EXPIRED if event.event_type == "checkout.session.expired" else CheckoutStatus.FAILED
    Checkout.objects.filter(pk=checkout.pk, status=CheckoutStatus.PENDING).update(status=status)
    return Outcome(EventStatus.PROCESSED)


def _stripe_charge_refunded(event: WebhookEvent, payload: dict) -> Outcome:
    charge = payload["data"]["object"]
    payment_intent = str(charge.get("payment_intent") or "")
    if not payment_intent:
        return Outcome(EventStatus.IGNORED, note="charge without a payment_intent")
    payment = (
        Payment.objects.select_for_update(of=("self",))
        .filter(provider=ST, payment_intent=payment_intent)
        .select_related("user")
        .first()
    )
    if payment is None:
        key = f"stripe:payment_intent:{payment_intent}"
        return Outcome(EventStatus.PENDING, note="refund before its payment: parked", waiting_for=key)
    refunded = _cents(charge.get("amount_refunded") or 0)
    note = _apply_refund(
        payment,
        refunded_cents=refunded,
        total_cents=_cents(charge["amount"]),
        idempotency_key=f"stripe:refund:{charge['id']}:{refunded}",
        description=f"Refund of Stripe charge {charge['id']}",
    )
    return Outcome(EventStatus.PROCESSED, note=note)


def _stripe_invoice_subscription(invoice: dict) -> tuple[str, dict]:
    """(subscription id, subscription metadata): ``parent.subscription_details`` since API
    2025-03-31.basil, top-level ``subscription`` / ``subscription_details`` before."""
    details = ((invoice.get("parent") or {}).get("subscription_details")) or {}
    legacy = invoice.get("subscription_details") or {}
    subscription = details.get("subscription") or invoice.get("subscription") or ""
    if isinstance(subscription, dict):  # expanded
        subscription = subscription.get("id", "")
    return str(subscription), (details.get("metadata") or legacy.get("metadata") or {})


def _stripe_invoice_paid(event: WebhookEvent, payload: dict) -> Outcome:
    invoice = payload["data"]["object"]
    subscription_id, metadata = _stripe_invoice_subscription(invoice)
    if not subscription_id:
        return Outcome(EventStatus.IGNORED, note="invoice is not for a subscription")
    subscription = _locked_subscription(ST, subscription_id)
    if subscription is None:
        checkout = Checkout.objects.filter(public_id=str(metadata.get("checkout_id", "")), provider=ST).first()
        if checkout is None:
            key = _subscription_key(ST, subscription_id)
            return Outcome(EventStatus.PENDING, note="invoice before its subscription: parked", waiting_for=key)
        subscription = _stripe_subscription_from_checkout(subscription_id, checkout)
    paid = _cents(invoice.get("amount_paid") or 0)
    total, untaxed = invoice.get("total"), invoice.get("total_excluding_tax")
    tax = _cents(total) - _cents(untaxed) if total is not None and untaxed is not None else 0
    return _grant_invoice(
        event,
        subscription,
        provider=ST,
        payment_id=str(invoice["id"]),
        idempotency_key=f"stripe:invoice:{invoice['id']}",
        gross_cents=paid,
        paid_cents=paid - tax,
        currency=str(invoice.get("currency") or ""),
        payment_intent=str(invoice.get("payment_intent") or ""),
    )


def _stripe_invoice_failed(event: WebhookEvent, payload: dict) -> Outcome:
    invoice = payload["data"]["object"]
    subscription_id, _ = _stripe_invoice_subscription(invoice)
    amount = format_cents(_cents(invoice.get("amount_due") or 0) * NANOS_PER_CENT)
    next_try = "Stripe will retry." if invoice.get("next_payment_attempt") else "Stripe will not retry."
    _alert(
        kind="invoice_payment_failed",
        message=(
            f"Stripe invoice {invoice.get('id')} ({amount}, subscription {subscription_id or 'none'}, "
            f"customer {invoice.get('customer')}) failed, attempt {invoice.get('attempt_count')}. {next_try}"
        ),
        event=event,
    )
    return Outcome(EventStatus.PROCESSED)


def _stripe_subscription_deleted(event: WebhookEvent, payload: dict) -> Outcome:
    subscription = _locked_subscription(ST, str(payload["data"]["object"]["id"]))
    if subscription is None:
        return Outcome(EventStatus.IGNORED, note="not one of our subscriptions")
    subscription.status = SubscriptionStatus.CANCELLED
    subscription.state_at = timezone.now()
    subscription.save(update_fields=["status", "state_at"])
    return Outcome(EventStatus.PROCESSED)


STRIPE_HANDLERS = {
    "checkout.session.completed": _stripe_session_paid,
    "checkout.session.async_payment_succeeded": _stripe_session_paid,
    "checkout.session.async_payment_failed": _stripe_session_closed,
    "checkout.session.expired": _stripe_session_closed,
    "charge.refunded": _stripe_charge_refunded,
    "invoice.payment_succeeded": _stripe_invoice_paid,
    "invoice.payment_failed": _stripe_invoice_failed,
    "customer.subscription.deleted": _stripe_subscription_deleted,
}


# --- Staff ---------------------------------------------------------------------------------------


def staff_alert_resolve(*, alert: StaffAlert) -> StaffAlert:
    StaffAlert.objects.filter(pk=alert.pk, resolved=False).update(resolved=True, resolved_at=timezone.now())
    alert.refresh_from_db()
    return alert
