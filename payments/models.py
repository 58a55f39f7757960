"""Money in: credit packs, checkouts, provider payments and the webhook log.

* A ``CreditPack`` is what we sell: a price (what the buyer pays, USD) and a credit (what lands in
  the wallet, bonus included), mapped to a Lemon Squeezy variant and/or a Stripe price.
* A ``Checkout`` is created server-side before the buyer is sent to the provider; its public id
  rides in the provider's custom data / ``client_reference_id`` and comes back in webhooks.
* A ``Payment`` records one paid provider object (LS order or subscription invoice, Stripe
  checkout session or invoice): gross, processor fee, net, refunds and how much credit it bought
  and how much of that was clawed back. A payment whose amount does not match its pack is stored
  ``flagged`` and credits nothing.
* ``WebhookEvent`` stores every verified delivery once: ``(provider, event_id)`` is UNIQUE, so a
  duplicate delivery — even N of them at once — can only ever find the first row.
* All amounts are integer nanodollars (1 USD = 10**9).
"""

import secrets

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Provider(models.TextChoices):
    LEMONSQUEEZY = "lemonsqueezy", "Lemon Squeezy"
    STRIPE = "stripe", "Stripe"


class CreditPack(models.Model):
    slug = models.SlugField(max_length=40, unique=True, help_text="Public id used by /api/packs and /api/checkout")
    name = models.CharField(max_length=100)
    price = models.BigIntegerField(help_text="What the buyer pays, nanodollars")
    currency = models.CharField(max_length=3, default="USD")
    credit = models.BigIntegerField(help_text="What lands in the wallet (bonus included), nanodollars")
    recurring = models.BooleanField(
        default=False, help_text="A subscription plan: the credit is granted on every paid invoice"
    )
    lemonsqueezy_variant_id = models.CharField(max_length=40, blank=True)
    stripe_price_id = models.CharField(max_length=100, blank=True)
    active = models.BooleanField(default=True)
    sort_order = models.IntegerField(default=0)

    class Meta:
        ordering = ["sort_order", "price", "id"]
        constraints = [
            models.CheckConstraint(condition=Q(price__gt=0), name="creditpack_price_positive"),
            models.CheckConstraint(condition=Q(credit__gt=0), name="creditpack_credit_positive"),
        ]

    def __str__(self):
        return self.name

    @property
    def bonus(self) -> int:
        return self.credit - self.price


def new_checkout_id() -> str:
    return f"ck_{secrets.token_hex(12)}"


class CheckoutStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    COMPLETED = "completed", "Completed"
    EXPIRED = "expired", "Expired"
    FAILED = "failed", "Failed"


class Checkout(models.Model):
    public_id = models.CharField(max_length=40, unique=True, default=new_checkout_id)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="checkouts")
    pack = models.ForeignKey(CreditPack, on_delete=models.PROTECT, related_name="checkouts")
    # Buying for an organization's wallet (``user`` is the owner or admin who bought); None: the
    # user's own wallet.
    organization = models.ForeignKey(
        "orgs.Organization", null=True, blank=True, on_delete=models.PROTECT, related_name="checkouts"
    )
    provider = models.CharField(max_length=20, choices=Provider.choices)
    provider_checkout_id = models.CharField(max_length=200, blank=True, db_index=True)
    url = models.URLField(max_length=2000, blank=True)
    status = models.CharField(max_length=10, choices=CheckoutStatus.choices, default=CheckoutStatus.PENDING)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]

    def __str__(self):
        return self.public_id


class PaymentStatus(models.TextChoices):
    PAID = "paid", "Paid"
    PARTIALLY_REFUNDED = "partially_refunded", "Partially refunded"
    REFUNDED = "refunded", "Refunded"
    FLAGGED = "flagged", "Flagged for staff"


class Payment(models.Model):
    provider = models.CharField(max_length=20, choices=Provider.choices)
    # LS order id (subscription invoices: "invoice:<id>"), Stripe checkout session id or invoice id.
    provider_payment_id = models.CharField(max_length=200)
    # Stripe only: the join key from a Charge (refunds) back to this payment.
    payment_intent = models.CharField(max_length=200, blank=True, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="payments"
    )
    pack = models.ForeignKey(CreditPack, null=True, blank=True, on_delete=models.PROTECT, related_name="payments")
    checkout = models.ForeignKey(Checkout, null=True, blank=True, on_delete=models.SET_NULL, related_name="payments")
    # The wallet the payment credited: what a refund claws back from (a user's or an
    # organization's). None on payments credited before this was kept: the user's wallet.
    wallet = models.ForeignKey(
        "wallet.Wallet", null=True, blank=True, on_delete=models.PROTECT, related_name="payments"
    )
    subscription = models.ForeignKey(
        "Subscription", null=True, blank=True, on_delete=models.SET_NULL, related_name="payments"
    )
    gross = models.BigIntegerField(default=0)  # nanodollars the buyer paid
    fee = models.BigIntegerField(default=0)  # nanodollars kept by the processor
    net = models.BigIntegerField(default=0)  # nanodollars, gross − fee
    currency = models.CharField(max_length=3, default="USD")
    refunded_amount = models.BigIntegerField(default=0)  # nanodollars refunded to the buyer, cumulative
    credit = models.BigIntegerField(default=0)  # nanodollars credited to the wallet for this payment
    clawed_back = models.BigIntegerField(default=0)  # nanodollars of that credit taken back by refunds
    status = models.CharField(max_length=20, choices=PaymentStatus.choices, default=PaymentStatus.PAID)
    flag_reason = models.TextField(blank=True)
    test_mode = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["provider", "provider_payment_id"], name="payment_provider_id_unique"),
            models.CheckConstraint(condition=Q(clawed_back__lte=models.F("credit")), name="payment_clawback_le_credit"),
        ]

    def __str__(self):
        return f"{self.provider} {self.provider_payment_id}"


class SubscriptionStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    CANCELLED = "cancelled", "Cancelled"
    EXPIRED = "expired", "Expired"


class Subscription(models.Model):
    provider = models.CharField(max_length=20, choices=Provider.choices)
    provider_subscription_id = models.CharField(max_length=200)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="subscriptions")
    pack = models.ForeignKey(CreditPack, on_delete=models.PROTECT, related_name="subscriptions")
    credit = models.BigIntegerField()  # nanodollars granted per paid invoice (the pack's credit when it started)
    status = models.CharField(max_length=10, choices=SubscriptionStatus.choices, default=SubscriptionStatus.ACTIVE)
    # The provider's timestamp of the state we hold, so an older update delivered late cannot
    # undo a cancellation.
    state_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "provider_subscription_id"], name="subscription_provider_id_unique"
            ),
        ]

    def __str__(self):
        return f"{self.provider} {self.provider_subscription_id}"


class EventStatus(models.TextChoices):
    RECEIVED = "received", "Received"
    PROCESSED = "processed", "Processed"
    PENDING = "pending", "Waiting for a related event"
    FAILED = "failed", "Failed"
    IGNORED = "ignored", "Ignored"
    # Signed, but a body we can never process (not JSON, wrong shape or types): answered 400.
    REJECTED = "rejected", "Rejected (unreadable body)"


class WebhookEvent(models.Model):
    provider = models.CharField(max_length=20, choices=Provider.choices)
    # Stripe's event id; for Lemon Squeezy one derived from the payload (it has no reliable id).
    event_id = models.CharField(max_length=200)
    event_type = models.CharField(max_length=100)
    body = models.TextField()  # the raw body exactly as verified
    signature_valid = models.BooleanField(default=False)
    test_mode = models.BooleanField(default=False)
    status = models.CharField(max_length=10, choices=EventStatus.choices, default=EventStatus.RECEIVED)
    # For a parked event: what it waits for, e.g. "lemonsqueezy:order:3310457".
    waiting_for = models.CharField(max_length=200, blank=True, db_index=True)
    error = models.TextField(blank=True)
    attempts = models.IntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["provider", "event_id"], name="webhookevent_provider_event_unique"),
        ]
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self):
        return f"{self.provider} {self.event_type} {self.event_id}"


class StaffAlert(models.Model):
    kind = models.CharField(max_length=40)
    message = models.TextField()
    event = models.ForeignKey(WebhookEvent, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts")
    payment = models.ForeignKey(Payment, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts")
    created_at = models.DateTimeField(default=timezone.now)
    resolved = models.BooleanField(default=False)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["resolved", "-id"]

    def __str__(self):
        return f"{self.kind}: {self.message[:60]}"
