"""Fixtures for the payments tests: webhook secrets, packs with provider ids, fake APIs."""

import pytest

from tests.fake_payment_apis import LS_SECRET, STRIPE_SECRET, FakeLemonSqueezy, FakeStripe

NANOS = 10**9


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """The personas' sign-up hashes a password; these tests are about money, not passwords."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def payment_settings(settings):
    settings.LEMONSQUEEZY_WEBHOOK_SECRET = LS_SECRET
    settings.STRIPE_WEBHOOK_SECRET = STRIPE_SECRET
    settings.LEMONSQUEEZY_API_KEY = ""
    settings.LEMONSQUEEZY_STORE_ID = ""
    settings.STRIPE_API_KEY = ""
    settings.STRIPE_API_BASE = ""
    settings.PAYMENTS_TEST_MODE = False
    settings.STAFF_ALERT_EMAILS = ["ops@example.com"]
    return settings


@pytest.fixture
def packs(db, payment_settings):
    """Starter ($10 → $10) and Pro ($25 → $26) as seeded, with provider ids, plus a monthly plan.

    Seeded here rather than trusted from the data migration: transactional tests flush the
    tables, migration-seeded rows included."""
    from payments.models import CreditPack
    from payments.seed import seed_packs

    seed_packs(CreditPack)
    CreditPack.objects.filter(slug="starter").update(lemonsqueezy_variant_id="412233", stripe_price_id="price_starter")
    CreditPack.objects.filter(slug="pro").update(lemonsqueezy_variant_id="412244", stripe_price_id="price_pro")
    CreditPack.objects.update_or_create(
        slug="monthly",
        defaults={
            "name": "Monthly",
            "price": 20 * NANOS,
            "credit": 22 * NANOS,
            "recurring": True,
            "lemonsqueezy_variant_id": "555001",
            "stripe_price_id": "price_monthly",
            "sort_order": 30,
        },
    )
    return {pack.slug: pack for pack in CreditPack.objects.all()}


@pytest.fixture
def fake_ls(payment_settings):
    with FakeLemonSqueezy() as fake:
        payment_settings.LEMONSQUEEZY_API_URL = fake.url
        payment_settings.LEMONSQUEEZY_API_KEY = "ls_test_key"
        payment_settings.LEMONSQUEEZY_STORE_ID = "70011"
        yield fake


@pytest.fixture
def fake_stripe(payment_settings):
    with FakeStripe() as fake:
        payment_settings.STRIPE_API_BASE = fake.url
        payment_settings.STRIPE_API_KEY = "sk_test_fake"
        yield fake


def balance_of(user) -> int:
    user.wallet.refresh_from_db()
    return user.wallet.balance
