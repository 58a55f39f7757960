"""N parallel deliveries of one event credit once (PostgreSQL: real concurrent connections)."""

import pytest
from django.test import Client

from payments.models import EventStatus, Payment, WebhookEvent
from tests import payments_fixtures as fx
from tests.conftest import race
from tests.fake_payment_apis import ls_order, ls_refund, post_ls, post_stripe, stripe_event, stripe_session
from tests.payments_fixtures import NANOS, balance_of
from wallet.models import Entry

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
packs, payment_settings = fx.packs, fx.payment_settings
fast_password_hashing = fx.fast_password_hashing

DELIVERIES = 8


def deliver_in_parallel(post) -> list[int]:
    """Run ``post(client)`` in DELIVERIES threads released together; return the status codes."""
    outcomes = race(lambda _: post(Client()).status_code, DELIVERIES)
    assert all(isinstance(outcome, int) for outcome in outcomes), outcomes  # a thread's failure fails the test
    return outcomes


def test_parallel_replays_of_one_lemon_squeezy_order_credit_exactly_once(alice, packs):
    payload = ls_order(user_id=alice.pk, variant_id=412244, total_cents=2500)

    statuses = deliver_in_parallel(lambda client: post_ls(client, payload))

    assert statuses == [200] * DELIVERIES
    assert balance_of(alice) == 36 * NANOS
    assert Entry.objects.filter(idempotency_key="lemonsqueezy:order:3310457").count() == 1
    assert Payment.objects.count() == 1
    event = WebhookEvent.objects.get()
    assert (event.status, event.attempts) == (EventStatus.PROCESSED, 1)


def test_parallel_replays_of_one_stripe_event_credit_exactly_once(alice, packs):
    from payments.models import Checkout

    checkout = Checkout.objects.create(user=alice, pack=packs["starter"], provider="stripe")
    event = stripe_event("checkout.session.completed", stripe_session(checkout_id=checkout.public_id, user_id=alice.pk))

    statuses = deliver_in_parallel(lambda client: post_stripe(client, event))

    assert statuses == [200] * DELIVERIES
    assert balance_of(alice) == 20 * NANOS
    assert WebhookEvent.objects.get().attempts == 1


def test_a_refund_racing_its_order_is_never_lost(alice, packs):
    order = ls_order(user_id=alice.pk)
    refund = ls_refund(user_id=alice.pk, refunded_cents=1000)
    payloads = (order, refund)

    outcomes = race(lambda index: post_ls(Client(), payloads[index]).status_code, 2)

    assert all(isinstance(outcome, int) for outcome in outcomes), outcomes
    # Whichever committed first, the refund is applied: credited $10, clawed back $10.
    assert balance_of(alice) == 10 * NANOS
    assert set(WebhookEvent.objects.values_list("status", flat=True)) == {EventStatus.PROCESSED}
