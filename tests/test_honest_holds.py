"""Holds that bound the real cost: non-text parts held at a per-part allowance, and an overrun
cap past which a request's cost is the operator's loss, not the wallet's debt.

Through /v1/chat/completions, /v1/responses and /v1/messages against the fake upstream, the
reconcile command, and — on PostgreSQL — a burst of image requests against a live server."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import asyncio
import os
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db.models import Sum
from django.utils import timezone

from accounts.services import api_key_create
from backoffice.reports import ledger_discrepancies
from proxy.models import ModelPrice, UsageRecord
from tests.conftest import make_user
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    Reply,
    call,
    completion,
    fake_upstream,
    fake_upstream_server,
    message_object,
    messages_usage,
    response_object,
    responses_usage,
    usage,
)
from tests.live import live_server
from wallet.models import Entry, Hold, HoldStatus, Wallet
from wallet.services import hold_create

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"
VISION = "vision/model"
CENT = 10_000_000  # nanodollars
SHORT_URL = "https://example.com/cat.png"


@pytest.fixture
def vision(db):
    """$1 per million prompt tokens, output free, no markup: a hold is its prompt tokens in
    micro-dollars. Images 10,000 tokens (detail low: 500), audio 3,000, files 7,000."""
    return ModelPrice.objects.create(
        model=VISION,
        prompt=Decimal("1"),
        completion=Decimal("0"),
        markup=Decimal("0"),
        default_max_output=100,
        image_tokens=10_000,
        image_low_tokens=500,
        audio_tokens=3_000,
        file_tokens=7_000,
        overrun_cap=CENT,
    )


@pytest.fixture
def vision_key(alice, vision):
    return api_key_create(user=alice, name="vision")[1]


def chat_with(*parts) -> dict:
    return {"model": VISION, "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, *parts]}]}


def held() -> int:
    return UsageRecord.objects.get().hold_amount


def image(url=SHORT_URL, detail=None) -> dict:
    inner = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": inner}


# --- the allowance -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "tokens"),
    [
        ((image(),), 10_000),
        ((image(detail="high"),), 10_000),
        ((image(detail="auto"),), 10_000),
        ((image(detail="low"),), 500),
        ((image(), image(detail="low")), 10_500),
        (({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},), 3_000),
        (({"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"}},), 7_000),
    ],
)
def test_a_chat_request_holds_each_non_text_part_at_its_allowance(fake_upstream, vision_key, parts, tokens):
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 1))))
    assert call(CHAT, chat_with(*parts), token=vision_key).status == 200
    # The text around the parts is a few dozen tokens more, nothing like another part.
    assert tokens * 1000 < held() < (tokens + 100) * 1000


def test_a_part_is_never_held_below_what_its_bytes_give(fake_upstream, vision_key, vision):
    vision.image_tokens = 1
    vision.save()
    data_url = "data:image/png;base64," + "A" * 400_000  # 100,000 tokens by size
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 1))))
    assert call(CHAT, chat_with(image(data_url)), token=vision_key).status == 200
    assert held() >= 100_000 * 1000


def test_a_text_request_is_held_as_before(fake_upstream, vision_key):
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 1))))
    call(CHAT, chat_with(), token=vision_key)
    assert held() < 200 * 1000


def test_the_global_settings_apply_where_the_model_sets_no_allowance(fake_upstream, vision_key, vision, settings):
    vision.image_tokens = None
    vision.save()
    settings.HOLD_IMAGE_TOKENS = 4_000
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 1))))
    call(CHAT, chat_with(image()), token=vision_key)
    assert 4_000 * 1000 < held() < 4_100 * 1000


def test_responses_and_messages_hold_their_images_too(fake_upstream, vision_key):
    fake_upstream.script("responses", Reply(body=response_object(u=responses_usage(10, 1))))
    body = {
        "model": VISION,
        "input": [
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "what?"}, {"type": "input_image", "image_url": SHORT_URL}],
            }
        ],
    }
    call("/v1/responses", body, token=vision_key)
    fake_upstream.script("messages", Reply(body=message_object(u=messages_usage(10, 1))))
    source = {"type": "url", "url": SHORT_URL}
    body = {
        "model": VISION,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": [{"type": "image", "source": source}, {"type": "text", "text": "?"}]}],
    }
    call("/v1/messages", body, token=vision_key)
    holds = list(UsageRecord.objects.order_by("created_at").values_list("endpoint", "hold_amount"))
    assert [endpoint for endpoint, _ in holds] == ["responses", "messages"]
    assert all(10_000 * 1000 < amount < 10_100 * 1000 for _, amount in holds)


# --- the overrun cap -----------------------------------------------------------------------------


def test_a_request_billed_far_above_its_hold_pays_the_hold_plus_the_cap_and_the_rest_is_operator_loss(
    fake_upstream, alice, vision_key
):
    fake_upstream.script("chat", Reply(body=completion(u=usage(900_000, 1, cost="0.9"))))
    response = call(CHAT, chat_with(image()), token=vision_key)
    assert response.status == 200
    rec = UsageRecord.objects.get()
    assert rec.charge == rec.hold_amount + CENT
    assert rec.operator_loss == 900_000_000 - rec.charge  # OpenRouter's $0.90, no markup
    assert response.headers["x-tokentill-charge"] == f"{Decimal(rec.charge) / 10**9:.9f}"
    assert Entry.objects.get(kind="usage").amount == -rec.charge
    assert Wallet.objects.get(user=alice).balance == 10 * 10**9 - rec.charge
    assert ledger_discrepancies() == []


def test_a_request_within_the_cap_is_charged_in_full(fake_upstream, vision_key):
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 1, cost="0.015"))))
    call(CHAT, chat_with(image()), token=vision_key)
    rec = UsageRecord.objects.get()
    assert (rec.charge, rec.operator_loss) == (15_000_000, 0)


def test_the_global_cap_applies_where_the_model_sets_none(fake_upstream, vision_key, vision, settings):
    vision.overrun_cap = None
    vision.save()
    settings.HOLD_OVERRUN_CAP = Decimal("0.002")
    fake_upstream.script("chat", Reply(body=completion(u=usage(10, 1, cost="0.9"))))
    call(CHAT, chat_with(image()), token=vision_key)
    rec = UsageRecord.objects.get()
    assert rec.charge == rec.hold_amount + 2_000_000
    assert Hold.objects.get().overrun_cap == 2_000_000


def test_an_abandoned_hold_reconciled_later_keeps_to_its_cap(alice):
    """``reconcile_holds`` settles a crashed process's hold from the upstream's generation
    lookup under the same cap."""
    from proxy.reconcile import hold_reconcile

    hold = hold_create(wallet=Wallet.objects.get(user=alice), amount=CENT, request_id="req_crashed", overrun_cap=CENT)
    record = UsageRecord.objects.create(
        request_id="req_crashed", user=alice, model=VISION, hold_amount=CENT, prices={"markup": "0"}
    )
    Hold.objects.filter(pk=hold.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    outcome = hold_reconcile(
        hold=hold, generation={"total_cost": Decimal("0.5"), "tokens_prompt": 5, "tokens_completion": 1}
    )
    record.refresh_from_db()
    assert "generation lookup" in outcome
    assert (record.charge, record.operator_loss) == (2 * CENT, 500_000_000 - 2 * CENT)
    assert Entry.objects.get(kind="usage").amount == -2 * CENT
    assert ledger_discrepancies() == []


# --- the burst (PostgreSQL, a live server) -------------------------------------------------------


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker, fake_upstream_server):
    with live_server(
        SECRET_KEY=django_settings.SECRET_KEY,
        UPSTREAM_BASE_URL=fake_upstream_server.url,
        UPSTREAM_API_KEY="sk-or-v1-server-secret",
        UPSTREAM_KIND="openrouter",
        PROXY_PRICE_CACHE_SECONDS="0",
        LOG_LEVEL="WARNING",
    ) as url:
        yield url


@pytest.mark.postgres
def test_a_burst_of_image_requests_never_takes_a_trial_wallet_below_minus_the_cap(server, fake_upstream):
    """The measured bug: 100 concurrent image requests, each billed far above its hold, took a
    $1.00 trial to −$1.30. Now the wallet ends no lower than −cap, and the ledger is exact."""
    cap = 2 * CENT
    ModelPrice.objects.create(
        model="burst/vision",
        prompt=Decimal("0.15"),
        completion=Decimal("0.60"),
        markup=Decimal("0"),
        default_max_output=50,
        image_tokens=2_000,
        overrun_cap=cap,
    )
    user = make_user("trial@example.com", balance="1.00")
    token = api_key_create(user=user, name="k")[1]
    n = 100
    billed = completion("A cat.", u=usage(150_000, 5, cost="0.023"), model="burst/vision")
    fake_upstream.script("chat", *[Reply(body=billed, delay=0.05) for _ in range(n)])
    body = {
        "model": "burst/vision",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, image()]}],
    }

    async def crowd():
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
            headers = {"Authorization": f"Bearer {token}"}
            return await asyncio.gather(*[client.post(CHAT, json=body, headers=headers) for _ in range(n)])

    responses = asyncio.run(crowd())
    assert {r.status_code for r in responses} <= {200, 402}
    served = [r for r in responses if r.status_code == 200]
    assert served
    wallet = Wallet.objects.get(user=user)
    assert wallet.held == 0 and wallet.balance >= -cap
    entries = Entry.objects.filter(wallet=wallet)
    # The balance only ever moves by an entry: none of them left it below −cap.
    assert min(entries.values_list("balance_after", flat=True)) >= -cap
    assert sum(entries.values_list("amount", flat=True)) == wallet.balance
    records = UsageRecord.objects.filter(user=user, status="ok")
    assert records.count() == len(served) == len(fake_upstream.calls("chat"))
    totals = records.aggregate(charged=Sum("charge"), lost=Sum("operator_loss"))
    assert 10**9 - totals["charged"] == wallet.balance
    assert totals["charged"] + totals["lost"] == len(served) * 23_000_000  # every cent accounted for
    assert not Hold.objects.filter(wallet=wallet, status=HoldStatus.ACTIVE).exists()
    call_command("verify_ledger", stdout=open(os.devnull, "w"))  # raises CommandError on any discrepancy
