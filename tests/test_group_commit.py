"""Group commit on PostgreSQL (``infra.adb.fetchone_batched``): requests that wait for a hold or
a settlement at the same time share one transaction and one commit, and keep every guarantee —
no overspend on a hot wallet, each request its own outcome, a failing statement failing only its
own request, a statement that must not run twice never run twice."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

import asyncio
import os
from decimal import Decimal

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.db.models import Sum

from accounts.services import api_key_create
from infra import adb
from proxy.models import ModelPrice, UsageRecord, UsageStatus
from tests.conftest import make_user
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    Reply,
    _proxy_call,
    close_loop_resources,
    completion,
    fake_upstream,
    fake_upstream_server,
    usage,
)
from wallet.models import Entry, EntryKind, Hold, HoldStatus, Wallet
from wallet.services import InsufficientFunds, ahold_create, ahold_settle

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

CROWD = 64


def in_one_loop(*coroutines):
    """The coroutines at once on one event loop (one process's batcher), each one's result or
    exception; the loop's pool closed afterwards."""

    async def run():
        try:
            return await asyncio.gather(*coroutines, return_exceptions=True)
        finally:
            await close_loop_resources()

    return async_to_sync(run)()


def test_64_concurrent_requests_on_one_hot_wallet_batch_and_never_overspend(fake_upstream):
    from config.asgi import application

    funded_for = 24
    # 256 output tokens at $390.625/M with no markup is exactly $0.10 — hold and charge alike.
    ModelPrice.objects.create(model="conc/model", completion=Decimal("390.625"), markup=Decimal("0"))
    user = make_user("crowd@example.com", balance=str(Decimal("0.1") * funded_for))
    token = api_key_create(user=user, name="k")[1]
    reply = completion("ok", u=usage(3, 256), model="conc/model")
    fake_upstream.script("chat", *[Reply(body=reply) for _ in range(CROWD)])
    body = b'{"model": "conc/model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 256}'
    before = adb.stats.batches, adb.stats.batched

    call = (application, "/v1/chat/completions", body, [body], token, None, None, 30, "POST")
    responses = in_one_loop(*[_proxy_call(*call) for _ in range(CROWD)])

    assert sorted(r.status for r in responses) == [200] * funded_for + [402] * (CROWD - funded_for)
    charged = [r for r in responses if r.status == 200]
    assert all(r.headers["x-tokentill-charge"] == "0.100000000" for r in charged)  # each its own outcome
    # Each successful request saw the balance its own settlement left: all different.
    assert len({r.headers["x-tokentill-balance"] for r in charged}) == funded_for
    batches, batched = adb.stats.batches - before[0], adb.stats.batched - before[1]
    assert batches >= 1 and batched > batches, "no two statements ever shared a commit"
    wallet = Wallet.objects.get(user=user)
    assert (wallet.balance, wallet.held) == (0, 0)
    assert Entry.objects.filter(wallet=wallet, kind=EntryKind.USAGE).count() == funded_for
    assert Entry.objects.filter(wallet=wallet).aggregate(total=Sum("amount"))["total"] == 0
    assert not Hold.objects.filter(status=HoldStatus.ACTIVE).exists()
    assert UsageRecord.objects.filter(status=UsageStatus.OK).count() == funded_for
    assert UsageRecord.objects.filter(status=UsageStatus.REFUSED).count() == CROWD - funded_for
    call_command("verify_ledger", stdout=open(os.devnull, "w"))  # raises CommandError on any discrepancy


def holds(wallet, request_ids, amount=1_000_000):
    return [ahold_create(wallet=wallet, amount=amount, request_id=rid) for rid in request_ids]


def test_a_failing_statement_in_a_batch_fails_only_its_own_request():
    user = make_user("batch@example.com", balance="1.00")
    wallet = user.wallet
    async_to_sync(_take_one)(wallet, "taken")  # its request id, taken again below, cannot be
    before = adb.stats.batches, adb.stats.rerun

    # The first runs alone (nothing in flight), the other five queue behind it: one batch, whose
    # duplicate request id breaks the unique constraint — and so the batch's transaction.
    ids = ["a", "b", "taken", "c", "d", "e"]
    results = in_one_loop(*holds(wallet, ids))

    assert adb.stats.batches - before[0] >= 1 and adb.stats.rerun - before[1] >= 1
    failed = [rid for rid, result in zip(ids, results, strict=True) if isinstance(result, BaseException)]
    assert failed == ["taken"] and isinstance(results[2], psycopg.errors.UniqueViolation)
    assert sorted(Hold.objects.values_list("request_id", flat=True)) == ["a", "b", "c", "d", "e", "taken"]
    assert Wallet.objects.get(pk=wallet.pk).held == 6 * 1_000_000  # each hold taken once


async def _take_one(wallet, request_id):
    try:
        return await ahold_create(wallet=wallet, amount=1_000_000, request_id=request_id)
    finally:
        await close_loop_resources()


def test_a_batch_whose_connection_dies_never_runs_twice_what_may_not():
    user = make_user("dies@example.com", balance="1.00")
    wallet = user.wallet
    before = adb.stats.batches
    # The last statement of the batch (sorted by ``order``) kills its own connection, before the
    # commit's answer: the client cannot know whether the batch committed (here it did not).
    kill = "SELECT pg_terminate_backend(pg_backend_pid())"

    async def crowd():
        lone = ahold_create(wallet=wallet, amount=1_000_000, request_id="alone")
        hold = ahold_create(wallet=wallet, amount=1_000_000, request_id="once")  # retry=False
        read = adb.fetchone_batched("SELECT 42", retry=True)
        killer = adb.fetchone_batched(kill, retry=False, order=2**62)
        return await asyncio.gather(lone, hold, read, killer, return_exceptions=True)

    async def run():
        try:
            return await crowd()
        finally:
            await close_loop_resources()

    lone, hold, read, killer = async_to_sync(run)()

    assert adb.stats.batches - before >= 1
    assert isinstance(lone, Hold)  # ran alone, before the batch
    assert isinstance(hold, psycopg.OperationalError) and isinstance(killer, psycopg.OperationalError)
    assert read == (42,)  # may run twice: ran again on a fresh connection
    assert not Hold.objects.filter(request_id="once").exists()  # rolled back, and not re-run
    assert Wallet.objects.get(pk=wallet.pk).held == 1_000_000


def test_settlements_and_holds_in_one_batch_each_get_their_own_answer():
    user = make_user("mixed@example.com", balance="0.003")
    wallet = user.wallet

    async def run():
        try:
            taken = await asyncio.gather(*holds(wallet, ["s1", "s2", "s3"]))  # all $0.003 held
            # Three settlements and two holds of $0.002, all waiting at once: the first settlement
            # runs alone, the rest queue in this order and go as one batch — the settlements free
            # room for one more hold, not two.
            settles = [ahold_settle(hold=hold, amount=400 * (i + 1)) for i, hold in enumerate(taken)]
            return await asyncio.gather(*settles, *holds(wallet, ["r1", "r2"], 2_000_000), return_exceptions=True)
        finally:
            await close_loop_resources()

    before = adb.stats.batches
    results = async_to_sync(run)()

    assert adb.stats.batches - before >= 1
    assert [r.charged for r in results[:3]] == [400, 800, 1200]
    assert isinstance(results[3], Hold) and isinstance(results[4], InsufficientFunds)
    assert results[4].available == 3_000_000 - 2400 - 2_000_000
    row = Wallet.objects.get(pk=wallet.pk)
    assert (row.balance, row.held) == (3_000_000 - 2400, 2_000_000)
    assert Entry.objects.filter(wallet=row, kind=EntryKind.USAGE).aggregate(total=Sum("amount"))["total"] == -2400
    call_command("verify_ledger", stdout=open(os.devnull, "w"))
