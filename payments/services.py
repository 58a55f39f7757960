"""State changes for payments: checkouts out, verified webhook events in.

Webhook policy (read before changing anything here):

* The view verifies the signature over the raw body, then ``webhook_receive`` reads it into the
  provider's normalised event (``payments/providers/<name>.py``: every field typed, or a
  ``MalformedEvent``) and stores it in its own short transaction. ``(provider, event_id)`` is
  UNIQUE: a duplicate delivery — also N parallel ones — hits the constraint and finds the first
  row; there is no ``exists()`` check to race past.
* A signed body we can never process (not JSON, nested too deep, a field missing or of the wrong
  type) is stored ``rejected`` with the reason and answered 400: retrying the same bytes cannot
  succeed, and a 500 would have the provider retry it for days.
* ``webhook_event_process`` then locks that row (``select_for_update``; SQLite's IMMEDIATE
  transactions serialise the same way) and handles it in ONE durable transaction together with
  the wallet change, so "processed" and "credited" commit or roll back together. A row that is
  already processed/ignored/rejected/pending is answered as a duplicate. A provider API read a
  handler needs (a Stripe Payment Link's line items) happens before that transaction.
* A transient error (database, provider API) rolls everything back, marks the row ``failed`` with
  the error and the view answers 500 so the provider retries; a retry or a staff replay processes
  it again.
* What is credited comes from what was paid: the pack is found from the paid variant / Stripe
  price / our own checkout row, and the paid amount and currency must equal the pack's price; a
  total of zero or less, or a negative tax, never buys anything. Anything else is stored as a
  ``flagged`` payment with a staff alert and credits nothing (answered 200: a retry cannot fix it)
  until staff resolve it (``payment_flagged_credit``).
* A refund (or subscription invoice) that arrives before the payment (subscription) it belongs to
  is parked as ``pending`` with ``waiting_for``. After any event commits, parked events waiting for
  what it created are processed; a freshly parked event re-checks once after its own commit, so
  whichever of the two commits last sees the other — nothing is lost in between.
* Every wallet change goes through ``wallet.services`` with a provider-derived idempotency key,
  the second line of defence behind the event constraint.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from core.money import NANOS_PER_USD, format_money, mul_round, usd_to_nanos
from core.numbers import parse_id
from notify.services import staff_email_on_commit
from orgs.selectors import membership_for, org_wallet
from wallet.models import EntryKind
from wallet.services import wallet_credit, wallet_get_or_create, wallet_refund

from . import outbox
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
from .providers.errors import MalformedEvent, ProviderError

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


class UnknownOrganization(PaymentsError):
    """The checkout names an organization the buyer is not a member of (or none at all)."""


class NotAllowedToBuy(PaymentsError):
    """Only an organization's owners and admins may top up its wallet."""


def checkout_create(*, user, pack_slug: str, provider: str | None = None, organization: str | None = None) -> Checkout:
    """Create our checkout row, then the provider's hosted checkout for it.

    ``organization`` (its id or slug): the credit goes to that organization's wallet, which only
    its owners and admins may top up; else to the buyer's own.

    The provider call happens outside any transaction (no row lock is held across the network);
    the row exists first so its id can ride in the provider's custom data.
    """
    org = None
    if organization is not None:
        membership = membership_for(user=user, org=organization)
        if membership is None:
            raise UnknownOrganization("no such organization")
        if not membership.manages:
            raise NotAllowedToBuy("only the organization's owners and admins may top up its wallet")
        org = membership.organization
    pack = CreditPack.objects.filter(slug=pack_slug, active=True).first()
    if pack is None:
        raise UnknownPack(f"There is no credit pack {pack_slug!r}.")
    if provider is None:
        provider = Provider.LEMONSQUEEZY if _provider_ready(Provider.LEMONSQUEEZY, pack) else Provider.STRIPE
    if not _provider_ready(provider, pack):
        label = Provider(provider).label
        raise ProviderNotConfigured(f"Payments through {label} are not configured for the {pack.name} pack.")

    checkout = Checkout.objects.create(user=user, pack=pack, provider=provider, organization=org)
    created: lemonsqueezy.CreatedCheckout | stripe_provider.CreatedSession
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

    @property
    def rejected(self) -> bool:
        """A body we can never process: answered 400, kept for staff, never retried into success."""
        return self.event.status == EventStatus.REJECTED


FINAL = {EventStatus.PROCESSED, EventStatus.IGNORED, EventStatus.REJECTED}

ProviderEvent = lemonsqueezy.Event | stripe_provider.Event
E = TypeVar("E", lemonsqueezy.Event, stripe_provider.Event)  # one provider's event, and its handlers
S = TypeVar("S")  # the class of an event's object (an Order, a Session, …)


def _parse(provider: str, body: str) -> ProviderEvent:
    if provider == Provider.LEMONSQUEEZY:
        return lemonsqueezy.parse_event(body)
    return stripe_provider.parse_event(body)


def webhook_receive(*, provider: str, body: bytes, event_type_hint: str = "") -> WebhookResult:
    """Store a verified delivery once and process it. Duplicates find the first row.

    A body that is not an event we can read (not UTF-8 or JSON, a field missing or of the wrong
    type) is stored ``rejected`` with the reason instead; ``event_type_hint`` (Lemon Squeezy's
    ``X-Event-Name``) labels it for staff when the body cannot.
    """
    try:
        text = body.decode("utf-8")
        parsed = _parse(provider, text)
    except UnicodeDecodeError:
        return _reject(provider=provider, body=body, reason="the body is not UTF-8", event_type=event_type_hint)
    except MalformedEvent as exc:
        return _reject(
            provider=provider,
            body=body,
            reason=str(exc),
            event_id=exc.event_id,
            event_type=exc.event_type or event_type_hint,
        )
    try:
        with transaction.atomic():
            event = WebhookEvent.objects.create(
                provider=provider,
                event_id=parsed.event_id,
                event_type=parsed.event_type,
                body=text,
                signature_valid=True,
                test_mode=parsed.test_mode,
            )
    except IntegrityError:
        # The constraint, not a prior exists() check, decides who was first. The first row's own
        # body is what gets processed (Lemon Squeezy ids are derived, so bodies may differ).
        event = WebhookEvent.objects.get(provider=provider, event_id=parsed.event_id)
        return webhook_event_process(event=event)
    return webhook_event_process(event=event, parsed=parsed)


def _reject(*, provider: str, body: bytes, reason: str, event_id: str = "", event_type: str = "") -> WebhookResult:
    """Store an unreadable signed body as ``rejected``, under the provider's event id when its
    envelope could be read, else under the hash of its bytes: either way the provider's retries
    find the first row."""
    log.warning("rejected a signed %s webhook delivery: %s", provider, reason)
    event_id = event_id or f"rejected:{hashlib.sha256(body).hexdigest()}"
    try:
        with transaction.atomic():
            event = WebhookEvent.objects.create(
                provider=provider,
                event_id=event_id,
                event_type=event_type[:100] or "(unreadable)",
                # As text for the admin; PostgreSQL cannot store NUL in text.
                body=body.decode("utf-8", errors="replace").replace("\x00", "\ufffd"),
                signature_valid=True,
                status=EventStatus.REJECTED,
                error=reason[:2000],
                attempts=1,
                processed_at=timezone.now(),
            )
    except IntegrityError:
        first = WebhookEvent.objects.get(provider=provider, event_id=event_id)
        return WebhookResult(event=first, ok=True, duplicate=True)
    return WebhookResult(event=event, ok=True)


def webhook_event_replay(*, event: WebhookEvent) -> WebhookResult:
    """Staff replay of a failed (or still parked) event: the same path a provider retry takes."""
    return webhook_event_process(event=event, force=True)


def webhook_event_process(
    *, event: WebhookEvent, force: bool = False, recheck: bool = True, parsed: ProviderEvent | None = None
) -> WebhookResult:
    """Handle one stored event in one transaction. ``force`` also retries a parked event.

    The body is read, and anything a handler needs from the provider's API is fetched, before the
    transaction opens: no row lock (on SQLite, no database write lock) is held across the network.
    """
    try:
        read = None if event.status in FINAL else _read(event, parsed)  # a final row never changes
    except ProviderError as exc:  # the provider's API is down: transient, so 500 and a retry
        return _failed(event, exc)
    try:
        with transaction.atomic(durable=True):
            locked = WebhookEvent.objects.select_for_update().get(pk=event.pk)
            # (``read`` is None only for a row that was final when read, and a final row never changes.)
            if locked.status in FINAL or read is None or (locked.status == EventStatus.PENDING and not force):
                return WebhookResult(event=locked, ok=True, duplicate=True)
            locked.attempts += 1
            outcome = _dispatch(locked, read)
            locked.status = outcome.status
            locked.waiting_for = outcome.waiting_for
            locked.error = outcome.note
            locked.processed_at = timezone.now()
            locked.save(update_fields=["status", "waiting_for", "error", "processed_at", "attempts"])
    except Exception as exc:
        return _failed(event, exc)

    # Both after commit, so a parked event and the payment it waits for always meet (see module doc).
    for key in outcome.unparks:
        for parked in WebhookEvent.objects.filter(status=EventStatus.PENDING, waiting_for=key).order_by("id"):
            webhook_event_process(event=parked, force=True, recheck=False)
    if outcome.status == EventStatus.PENDING and recheck:
        return webhook_event_process(event=locked, force=True, recheck=False)
    return WebhookResult(event=locked, ok=True)


def _failed(event: WebhookEvent, exc: Exception) -> WebhookResult:
    """A transient failure (database, provider API): rolled back, stored ``failed``, answered 500."""
    log.exception("webhook event %s (%s %s) failed", event.pk, event.provider, event.event_type)
    WebhookEvent.objects.filter(pk=event.pk).update(
        status=EventStatus.FAILED,
        error=f"{type(exc).__name__}: {exc}"[:2000],
        attempts=F("attempts") + 1,
        processed_at=timezone.now(),
    )
    event.refresh_from_db()
    return WebhookResult(event=event, ok=False)


def _read(event: WebhookEvent, parsed: ProviderEvent | None) -> ProviderEvent | MalformedEvent:
    """The stored body as a normalised event (or why it cannot be one), plus, for a Stripe Payment
    Link session, its line items from Stripe's API. Raises ``ProviderError``."""
    if parsed is None:
        try:
            parsed = _parse(event.provider, event.body)
        except MalformedEvent as exc:  # stored before this check existed; a replay answers it
            return exc
    if isinstance(parsed, stripe_provider.Event) and _stripe_needs_line_items(event, parsed):
        session = stripe_provider.session_with_line_items(_subject(parsed, stripe_provider.Session))
        parsed = replace(parsed, subject=session)
    return parsed


def _dispatch(event: WebhookEvent, parsed: ProviderEvent | MalformedEvent) -> Outcome:
    if isinstance(parsed, MalformedEvent):
        return Outcome(EventStatus.REJECTED, note=str(parsed))
    if event.test_mode and not settings.PAYMENTS_TEST_MODE:
        return Outcome(EventStatus.IGNORED, note="test-mode event ignored: PAYMENTS_TEST_MODE is off")
    # The body was parsed by its row's provider, so the event's class says which handlers apply.
    if isinstance(parsed, lemonsqueezy.Event):
        return _handle(LEMONSQUEEZY_HANDLERS, event, parsed)
    return _handle(STRIPE_HANDLERS, event, parsed)


def _handle(handlers: dict[str, Callable[[WebhookEvent, E], Outcome]], event: WebhookEvent, parsed: E) -> Outcome:
    handler = handlers.get(parsed.event_type)
    if handler is None or parsed.subject is None:
        return Outcome(EventStatus.IGNORED, note="event type not handled")
    return handler(event, parsed)


def _subject(parsed: ProviderEvent, kind: type[S]) -> S:
    """The event's object, as the class its event type always carries: ``parse_event`` picks the
    class by event type, and each handler is registered for event types of one class."""
    subject = parsed.subject
    if not isinstance(subject, kind):
        raise TypeError(f"a {parsed.event_type} event carries {type(subject).__name__}, not {kind.__name__}")
    return subject


# --- Shared helpers ------------------------------------------------------------------------------


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
    """The user a provider's ``client_reference_id``/``user_id`` names: ASCII digits or an integer
    only ("2.0", "٢" and 2**64 name nobody)."""
    try:
        user_id = parse_id(raw_id.strip() if isinstance(raw_id, str) else raw_id)
    except ValueError:
        return None
    return get_user_model().objects.filter(pk=user_id, is_active=True).first()


def _price_problem(
    pack: CreditPack, *, total_cents: int, tax_cents: int, currency: str, tax_included: bool = False
) -> str | None:
    """Why this payment does not buy ``pack`` (None if it does). What was paid for the product is
    the total, less tax when tax was added on top.

    A total of zero or less is never a purchase, and a tax is never negative: without these two
    checks a $0 order reporting −$10 tax "paid" $10 for the product.
    """
    if total_cents <= 0:
        return f"the total paid is {format_money(total_cents * NANOS_PER_CENT)}"
    if tax_cents < 0:
        return f"the tax is negative ({format_money(tax_cents * NANOS_PER_CENT)})"
    if currency.upper() != pack.currency.upper():
        return f"paid in {currency.upper()}, but the {pack.name} pack is priced in {pack.currency}"
    paid_cents = total_cents if tax_included else total_cents - tax_cents
    if paid_cents * NANOS_PER_CENT != pack.price:
        return (
            f"paid {format_money(paid_cents * NANOS_PER_CENT)} for the {pack.name} pack, "
            f"which costs {format_money(pack.price)}"
        )
    return None


def _alert(*, kind: str, message: str, event: WebhookEvent | None = None, payment: Payment | None = None):
    alert = StaffAlert.objects.create(kind=kind, message=message, event=event, payment=payment)
    # After commit, and robust: a mail server outage must not turn a committed webhook into a 500.
    staff_email_on_commit(area="payments", kind=kind, message=message)
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
        outbox.payment_flagged(payment, reason=reason)
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
    checkout = payment_fields.get("checkout")
    # A checkout started for an organization credits the organization's wallet; the payment
    # keeps which wallet it credited, which is what a refund claws back from.
    if checkout is not None and checkout.organization_id is not None:
        wallet = org_wallet(organization=checkout.organization)
    else:
        wallet = wallet_get_or_create(user=user)
    payment, created = Payment.objects.get_or_create(
        provider=payment_fields.pop("provider"),
        provider_payment_id=payment_fields.pop("provider_payment_id"),
        defaults={**payment_fields, "user": user, "pack": pack, "credit": credit, "wallet": wallet},
    )
    if created:
        wallet_credit(
            wallet=wallet,
            amount=credit,
            kind=kind,
            idempotency_key=idempotency_key,
            reference=payment.provider_payment_id,
            description=description,
            metadata={"provider": payment.provider, "payment": payment.provider_payment_id, "event": event.event_id},
        )
        outbox.payment_succeeded(payment)
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
    refunded_before = payment.refunded_amount
    target = min(payment.credit, _proportion(payment.credit, refunded_cents, total_cents))
    delta = target - payment.clawed_back
    if delta > 0:
        wallet_refund(
            # The wallet the payment credited (an organization's, or the user's).
            wallet=payment.wallet if payment.wallet is not None else wallet_get_or_create(user=payment.user),
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
    if payment.refunded_amount > refunded_before:
        outbox.payment_refunded(
            payment, refunded_now=payment.refunded_amount - refunded_before, clawed_back_now=max(delta, 0)
        )
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


def _ls_order_created(event: WebhookEvent, parsed: lemonsqueezy.Event) -> Outcome:
    order = _subject(parsed, lemonsqueezy.Order)
    if order.status != "paid":
        return Outcome(EventStatus.IGNORED, note=f"order status is {order.status!r}, not paid")
    pack = CreditPack.objects.filter(lemonsqueezy_variant_id=order.variant_id).first() if order.variant_id else None
    if pack is not None and pack.recurring:
        return Outcome(EventStatus.IGNORED, note="first order of a subscription: its invoice grants the credit")
    user = _user(parsed.custom.get("user_id"))
    checkout = Checkout.objects.filter(public_id=parsed.custom.get("checkout_id", ""), user=user).first()
    common = {
        "provider": LS,
        "provider_payment_id": order.id,
        "currency": order.currency.upper(),
        "test_mode": event.test_mode,
        "checkout": checkout,
        **_amounts(LS, order.total_usd),
    }
    if pack is None:
        return _flag(event, reason=f"variant {order.variant_id or '(none)'} is not a credit pack", user=user, **common)
    if user is None:
        reason = f"custom_data.user_id {parsed.custom.get('user_id')!r} is not a known user"
        return _flag(event, reason=reason, pack=pack, **common)
    problem = _price_problem(
        pack,
        total_cents=order.total_usd,
        tax_cents=order.tax_usd,
        tax_included=order.tax_inclusive,
        currency=order.currency,
    )
    if problem:
        return _flag(event, reason=problem, user=user, pack=pack, **common)
    _credit_payment(
        event,
        kind=EntryKind.TOP_UP,
        idempotency_key=f"lemonsqueezy:order:{order.id}",
        description=f"{pack.name} credit pack (Lemon Squeezy order {order.number})",
        pack=pack,
        credit=pack.credit,
        user=user,
        **common,
    )
    if checkout is not None:
        Checkout.objects.filter(pk=checkout.pk).update(status=CheckoutStatus.COMPLETED)
    return Outcome(EventStatus.PROCESSED, unparks=(_payment_key(LS, order.id),))


def _ls_refund(event: WebhookEvent, refunded: lemonsqueezy.Paid, *, payment_id: str) -> Outcome:
    payment = _locked_payment(LS, payment_id)
    if payment is None:
        key = _payment_key(LS, payment_id)
        return Outcome(EventStatus.PENDING, note="refund before its payment: parked", waiting_for=key)
    note = _apply_refund(
        payment,
        refunded_cents=refunded.refunded_amount,
        total_cents=refunded.total,
        idempotency_key=f"lemonsqueezy:refund:{payment_id}:{refunded.refunded_amount}",
        description=f"Refund of Lemon Squeezy {payment_id}",
    )
    return Outcome(EventStatus.PROCESSED, note=note)


def _ls_order_refunded(event: WebhookEvent, parsed: lemonsqueezy.Event) -> Outcome:
    order = _subject(parsed, lemonsqueezy.Order)
    return _ls_refund(event, order, payment_id=order.id)


def _ls_invoice_refunded(event: WebhookEvent, parsed: lemonsqueezy.Event) -> Outcome:
    invoice = _subject(parsed, lemonsqueezy.Invoice)
    return _ls_refund(event, invoice, payment_id=f"invoice:{invoice.id}")


_LS_SUBSCRIPTION_STATUS = {"cancelled": SubscriptionStatus.CANCELLED, "expired": SubscriptionStatus.EXPIRED}


def _ls_subscription_sync(event: WebhookEvent, parsed: lemonsqueezy.Event) -> Outcome:
    """Any subscription state event: create the row on first sight, else move its status —
    unless this state is older than the one we hold (deliveries are not ordered)."""
    found = _subject(parsed, lemonsqueezy.Subscription)
    status = _LS_SUBSCRIPTION_STATUS.get(found.status, SubscriptionStatus.ACTIVE)
    if event.event_type == "subscription_cancelled":
        status = SubscriptionStatus.CANCELLED
    elif event.event_type == "subscription_expired":
        status = SubscriptionStatus.EXPIRED
    state_at = found.updated_at or timezone.now()
    unparks = (_subscription_key(LS, found.id),)
    subscription = _locked_subscription(LS, found.id)
    if subscription is not None:
        if subscription.state_at and state_at < subscription.state_at:
            return Outcome(EventStatus.IGNORED, note="older than the subscription state already recorded")
        cancelled_now = status == SubscriptionStatus.CANCELLED != subscription.status
        subscription.status, subscription.state_at = status, state_at
        subscription.save(update_fields=["status", "state_at"])
        if cancelled_now:
            outbox.subscription_cancelled(subscription)
        return Outcome(EventStatus.PROCESSED, unparks=unparks)
    user = _user(parsed.custom.get("user_id"))
    pack = CreditPack.objects.filter(lemonsqueezy_variant_id=found.variant_id).first() if found.variant_id else None
    if user is None or pack is None:
        _alert(
            kind="subscription_unmatched",
            message=f"Lemon Squeezy subscription {found.id}: unknown user or variant; nothing will be granted.",
            event=event,
        )
        return Outcome(EventStatus.IGNORED, note="subscription without a known user or credit pack")
    Subscription.objects.create(
        provider=LS,
        provider_subscription_id=found.id,
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
    total_cents: int,
    tax_cents: int,
    tax_included: bool,
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
        **_amounts(provider, total_cents),
    }
    problem = _price_problem(
        pack, total_cents=total_cents, tax_cents=tax_cents, tax_included=tax_included, currency=currency
    )
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


def _ls_subscription_payment_success(event: WebhookEvent, parsed: lemonsqueezy.Event) -> Outcome:
    invoice = _subject(parsed, lemonsqueezy.Invoice)
    if invoice.status != "paid":
        return Outcome(EventStatus.IGNORED, note=f"invoice status is {invoice.status!r}, not paid")
    subscription = _locked_subscription(LS, invoice.subscription_id)
    if subscription is None:
        key = _subscription_key(LS, invoice.subscription_id)
        return Outcome(EventStatus.PENDING, note="invoice before its subscription: parked", waiting_for=key)
    return _grant_invoice(
        event,
        subscription,
        provider=LS,
        payment_id=f"invoice:{invoice.id}",
        idempotency_key=f"lemonsqueezy:invoice:{invoice.id}",
        total_cents=invoice.total_usd,
        tax_cents=invoice.tax_usd,
        tax_included=invoice.tax_inclusive,
        currency=invoice.currency,
    )


LEMONSQUEEZY_HANDLERS: dict[str, Callable[[WebhookEvent, lemonsqueezy.Event], Outcome]] = {
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
STRIPE_PAID_EVENTS = {"checkout.session.completed", "checkout.session.async_payment_succeeded"}


def _stripe_checkout(session: stripe_provider.Session) -> Checkout | None:
    """Our checkout row: its id rides in every session we create (metadata and client_reference_id)."""
    if not session.checkout_reference:
        return None
    return (
        Checkout.objects.filter(public_id=session.checkout_reference, provider=ST)
        .select_related("pack", "user")
        .first()
    )


def _stripe_needs_line_items(event: WebhookEvent, parsed: stripe_provider.Event) -> bool:
    """A paid one-off session that is not one of our checkouts but names a user (a Payment Link):
    what was bought is only known from Stripe's API. Decided before the transaction (reads only)."""
    session = parsed.subject
    return (
        parsed.event_type in STRIPE_PAID_EVENTS
        and isinstance(session, stripe_provider.Session)
        and session.payment_status == "paid"
        and session.mode == "payment"
        and (settings.PAYMENTS_TEST_MODE or not event.test_mode)
        and stripe_provider.is_configured()
        and _stripe_checkout(session) is None
        and _user(session.client_reference_id) is not None
    )


def _stripe_link_pack(session: stripe_provider.Session) -> tuple[CreditPack | None, str]:
    """The pack a session without a checkout of ours bought: its one line item's price, once."""
    if session.line_items is None:
        return None, "not one of our checkouts, and its line items cannot be read (STRIPE_API_KEY is not set)"
    if len(session.line_items) != 1 or session.line_items[0].quantity != 1:
        return None, "a session without a checkout of ours must buy exactly one credit pack, once"
    price_id = session.line_items[0].price_id
    packs = CreditPack.objects.filter(stripe_price_id=price_id, active=True, recurring=False)
    pack = packs.first() if price_id else None
    if pack is None:
        return None, f"price {price_id or '(none)'} is not an active credit pack"
    return pack, ""


def _stripe_session_paid(event: WebhookEvent, parsed: stripe_provider.Event) -> Outcome:
    session = _subject(parsed, stripe_provider.Session)
    if session.payment_status != "paid":
        note = f"payment_status is {session.payment_status!r}: waiting for async_payment_succeeded"
        return Outcome(EventStatus.IGNORED, note=note)
    checkout = _stripe_checkout(session)
    if session.mode == "subscription":
        return _stripe_subscription_started(event, session, checkout)
    common = {
        "provider": ST,
        "provider_payment_id": session.id,
        "payment_intent": session.payment_intent,
        "currency": session.currency.upper(),
        "test_mode": event.test_mode,
        "checkout": checkout,
        **_amounts(ST, session.amount_total),
    }
    pack: CreditPack | None
    if checkout is not None:
        pack, user = checkout.pack, checkout.user
    else:
        # Not a checkout we created: a Payment Link, whose client_reference_id is a user id. The
        # line item's price decides the pack, and the amount paid must still match it.
        user = _user(session.client_reference_id)
        if user is None:
            reason = f"client_reference_id {session.client_reference_id!r} is not one of our checkouts, nor a user"
            return _flag(event, reason=reason, **common)
        pack, unbought = _stripe_link_pack(session)
        if pack is None:
            return _flag(event, reason=unbought, user=user, **common)
    problem = _price_problem(
        pack, total_cents=session.amount_total, tax_cents=session.amount_tax, currency=session.currency
    )
    if problem:
        return _flag(event, reason=problem, user=user, pack=pack, **common)
    _credit_payment(
        event,
        kind=EntryKind.TOP_UP,
        idempotency_key=f"stripe:checkout:{session.id}",
        description=f"{pack.name} credit pack (Stripe)",
        pack=pack,
        credit=pack.credit,
        user=user,
        **common,
    )
    if checkout is not None:
        Checkout.objects.filter(pk=checkout.pk).update(status=CheckoutStatus.COMPLETED)
    unparks = [_payment_key(ST, session.id)]
    if session.payment_intent:
        unparks.append(f"stripe:payment_intent:{session.payment_intent}")
    return Outcome(EventStatus.PROCESSED, unparks=tuple(unparks))


def _stripe_subscription_from_checkout(subscription_id: str, checkout: Checkout) -> Subscription:
    subscription, _ = Subscription.objects.get_or_create(
        provider=ST,
        provider_subscription_id=subscription_id,
        defaults={"user": checkout.user, "pack": checkout.pack, "credit": checkout.pack.credit},
    )
    Checkout.objects.filter(pk=checkout.pk).update(status=CheckoutStatus.COMPLETED)
    return subscription


def _stripe_subscription_started(
    event: WebhookEvent, session: stripe_provider.Session, checkout: Checkout | None
) -> Outcome:
    if checkout is None or not session.subscription:
        _alert(
            kind="subscription_unmatched",
            message=f"Stripe session {session.id}: subscription without one of our checkouts.",
            event=event,
        )
        return Outcome(EventStatus.IGNORED, note="subscription session without one of our checkouts")
    _stripe_subscription_from_checkout(session.subscription, checkout)
    return Outcome(EventStatus.PROCESSED, unparks=(_subscription_key(ST, session.subscription),))


def _stripe_session_closed(event: WebhookEvent, parsed: stripe_provider.Event) -> Outcome:
    session = _subject(parsed, stripe_provider.Session)
    checkout = _stripe_checkout(session)
    if checkout is None:
        return Outcome(EventStatus.IGNORED, note="not one of our checkouts")
    status = CheckoutStatus.EXPIRED if event.event_type == "checkout.session.expired" else CheckoutStatus.FAILED
    closed = Checkout.objects.filter(pk=checkout.pk, status=CheckoutStatus.PENDING).update(status=status)
    if closed and status == CheckoutStatus.FAILED:
        outbox.payment_failed(
            user_id=checkout.user_id,
            provider=ST,
            reference=session.id,
            amount=session.amount_total * NANOS_PER_CENT,
            currency=session.currency,
            reason="the bank payment did not go through",
        )
    return Outcome(EventStatus.PROCESSED)


def _stripe_charge_refunded(event: WebhookEvent, parsed: stripe_provider.Event) -> Outcome:
    charge = _subject(parsed, stripe_provider.Charge)
    if not charge.payment_intent:
        return Outcome(EventStatus.IGNORED, note="charge without a payment_intent")
    payment = (
        Payment.objects.select_for_update(of=("self",))
        .filter(provider=ST, payment_intent=charge.payment_intent)
        .select_related("user")
        .first()
    )
    if payment is None:
        key = f"stripe:payment_intent:{charge.payment_intent}"
        return Outcome(EventStatus.PENDING, note="refund before its payment: parked", waiting_for=key)
    note = _apply_refund(
        payment,
        refunded_cents=charge.amount_refunded,
        total_cents=charge.amount,
        idempotency_key=f"stripe:refund:{charge.id}:{charge.amount_refunded}",
        description=f"Refund of Stripe charge {charge.id}",
    )
    return Outcome(EventStatus.PROCESSED, note=note)


def _stripe_invoice_paid(event: WebhookEvent, parsed: stripe_provider.Event) -> Outcome:
    invoice = _subject(parsed, stripe_provider.Invoice)
    if not invoice.subscription_id:
        return Outcome(EventStatus.IGNORED, note="invoice is not for a subscription")
    subscription = _locked_subscription(ST, invoice.subscription_id)
    if subscription is None:
        checkout_id = invoice.subscription_metadata.get("checkout_id", "")
        checkout = Checkout.objects.filter(public_id=checkout_id, provider=ST).first()
        if checkout is None:
            key = _subscription_key(ST, invoice.subscription_id)
            return Outcome(EventStatus.PENDING, note="invoice before its subscription: parked", waiting_for=key)
        subscription = _stripe_subscription_from_checkout(invoice.subscription_id, checkout)
    return _grant_invoice(
        event,
        subscription,
        provider=ST,
        payment_id=invoice.id,
        idempotency_key=f"stripe:invoice:{invoice.id}",
        total_cents=invoice.amount_paid,
        tax_cents=invoice.tax,
        tax_included=False,
        currency=invoice.currency,
        payment_intent=invoice.payment_intent,
    )


def _stripe_invoice_failed(event: WebhookEvent, parsed: stripe_provider.Event) -> Outcome:
    invoice = _subject(parsed, stripe_provider.Invoice)
    amount = format_money(invoice.amount_due * NANOS_PER_CENT)
    next_try = "Stripe will retry." if invoice.retries else "Stripe will not retry."
    _alert(
        kind="invoice_payment_failed",
        message=(
            f"Stripe invoice {invoice.id} ({amount}, subscription {invoice.subscription_id or 'none'}, "
            f"customer {invoice.customer or None}) failed, attempt {invoice.attempt_count}. {next_try}"
        ),
        event=event,
    )
    subscription = Subscription.objects.filter(provider=ST, provider_subscription_id=invoice.subscription_id).first()
    outbox.payment_failed(
        user_id=subscription.user_id if subscription is not None else None,
        provider=ST,
        reference=invoice.id,
        amount=invoice.amount_due * NANOS_PER_CENT,
        currency=invoice.currency,
        reason=f"the subscription payment was declined (attempt {invoice.attempt_count}); {next_try.lower()}",
    )
    return Outcome(EventStatus.PROCESSED)


def _stripe_subscription_deleted(event: WebhookEvent, parsed: stripe_provider.Event) -> Outcome:
    subscription = _locked_subscription(ST, _subject(parsed, stripe_provider.Subscription).id)
    if subscription is None:
        return Outcome(EventStatus.IGNORED, note="not one of our subscriptions")
    cancelled_now = subscription.status != SubscriptionStatus.CANCELLED
    subscription.status = SubscriptionStatus.CANCELLED
    subscription.state_at = timezone.now()
    subscription.save(update_fields=["status", "state_at"])
    if cancelled_now:
        outbox.subscription_cancelled(subscription)
    return Outcome(EventStatus.PROCESSED)


STRIPE_HANDLERS: dict[str, Callable[[WebhookEvent, stripe_provider.Event], Outcome]] = {
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


def payment_flagged_credit(*, payment: Payment, staff_user) -> Payment:
    """Resolve a flagged payment by crediting its pack after all — staff checked the money and
    decided it buys the pack (a coupon they issued, a price changed mid-checkout). Once, to the
    payment's user, as a top-up; the payment then counts as revenue and its alerts are resolved.

    A flagged payment without a known user and pack, or already partly refunded, cannot be
    credited this way: refund it at the provider, or correct the wallet by hand.
    """
    if staff_user is None or not staff_user.is_staff:
        raise PaymentsError("only staff can credit a flagged payment")
    with transaction.atomic(durable=True):
        locked = Payment.objects.select_for_update(of=("self",)).select_related("pack", "user").get(pk=payment.pk)
        if locked.status != PaymentStatus.FLAGGED:
            raise PaymentsError(f"{locked} is not flagged")
        if locked.user is None or locked.pack is None:
            raise PaymentsError(f"{locked} has no known user or pack: refund it, or correct a wallet by hand")
        if locked.refunded_amount:
            raise PaymentsError(f"{locked} was partly refunded: correct the wallet by hand")
        checkout = locked.checkout
        wallet = (
            org_wallet(organization=checkout.organization)
            if checkout is not None and checkout.organization is not None
            else wallet_get_or_create(user=locked.user)
        )
        wallet_credit(
            wallet=wallet,
            amount=locked.pack.credit,
            kind=EntryKind.TOP_UP,
            idempotency_key=f"staff:payment:{locked.pk}",
            reference=locked.provider_payment_id,
            description=f"{locked.pack.name} credit pack (flagged payment credited by staff)",
            metadata={"provider": locked.provider, "payment": locked.provider_payment_id, "staff": staff_user.email},
        )
        locked.status, locked.credit, locked.wallet = PaymentStatus.PAID, locked.pack.credit, wallet
        locked.save(update_fields=["status", "credit", "wallet"])
        outbox.payment_succeeded(locked)
        StaffAlert.objects.filter(payment=locked, resolved=False).update(resolved=True, resolved_at=timezone.now())
    return locked


def staff_alert_resolve(*, alert: StaffAlert) -> StaffAlert:
    StaffAlert.objects.filter(pk=alert.pk, resolved=False).update(resolved=True, resolved_at=timezone.now())
    alert.refresh_from_db()
    return alert
