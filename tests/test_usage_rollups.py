"""Usage rollups (``proxy.rollups``): the hourly sums every period total is read from are exactly
the sums of the raw records — whoever writes them, at any since/until, while requests settle
concurrently with a rebuild and a reconciliation (PostgreSQL) — and ``verify_ledger`` says so."""

# ruff: noqa: F811  (pytest fixtures imported from tests.fake_upstream are redefined as arguments)

from __future__ import annotations

import asyncio
import io
import os
import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import Q
from django.db.models.functions import TruncDate

from accounts.services import api_key_create
from orgs.models import Membership, Role
from orgs.services import org_key_create, organization_create
from proxy import rollups
from proxy.models import CostSource, ModelPrice, UsageRecord, UsageRollup, UsageStatus
from proxy.reconcile import estimate_reconcile
from proxy.services import Outcome, RequestMeta, arequest_begin, arequest_settle, ausage_refused
from tests.conftest import make_user
from tests.fake_upstream import (  # noqa: F401  (fixtures)
    MODEL,
    Reply,
    completion,
    fake_upstream,
    fake_upstream_server,
    price,
    run_async,
    usage,
)
from tests.test_proxy_live import server  # noqa: F401  (the live server fixture)
from wallet.models import EntryKind
from wallet.services import wallet_credit

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
STATUSES = [UsageStatus.OK] * 5 + [UsageStatus.CANCELLED, UsageStatus.UPSTREAM_ERROR, UsageStatus.REFUSED]
STATUSES += [UsageStatus.PENDING]
MEASURES = ["requests", "refused", "prompt_tokens", "completion_tokens", "upstream_cost", "charge", "held"]
MEASURES += ["operator_loss", "loss_requests", "reasoning_tokens", "cached_tokens", "cache_write_tokens", "pending"]


ZERO = {m: Decimal(0) if m == "upstream_cost" else 0 for m in MEASURES}


def expected(records, keys, since, until) -> dict[tuple, dict]:
    """What aggregating the raw records gives, computed in Python."""
    out: dict[tuple, dict] = {}
    for r in records:
        if (since is not None and r.created_at < since) or (until is not None and r.created_at >= until):
            continue
        group = tuple(key(r) for key in keys.values())
        row = out.setdefault(group, dict(ZERO))
        pending = r.status == UsageStatus.PENDING
        row["requests"] += 1
        row["refused"] += r.status == UsageStatus.REFUSED
        row["pending"] += pending
        row["held"] += r.hold_amount if pending else 0
        row["loss_requests"] += r.operator_loss > 0
        row["upstream_cost"] += r.upstream_cost or 0
        for name in ("prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens"):
            row[name] += getattr(r, name)
        for name in ("cache_write_tokens", "charge", "operator_loss"):
            row[name] += getattr(r, name)
    return out


def rollup_rows() -> list[tuple]:
    return sorted(
        UsageRollup.objects.values_list(*[f.attname for f in UsageRollup._meta.concrete_fields[1:]]), key=repr
    )


@pytest.mark.django_db
@pytest.mark.parametrize("seed", [1, 2])
def test_totals_from_rollups_are_the_raw_aggregates_whoever_wrote_the_records(seed):
    rng = random.Random(seed)
    alice, bob = make_user("alice@example.com"), make_user("bob@example.com")
    org = organization_create(user=alice, name="Acme")
    keys = [None, api_key_create(user=alice, name="a")[0], api_key_create(user=bob, name="b")[0]]
    records = []
    for n in range(80):
        status = rng.choice(STATUSES)
        settled = status not in (UsageStatus.PENDING, UsageStatus.REFUSED)
        charge = rng.randrange(0, 5_000_000) if settled else 0
        records.append(
            UsageRecord.objects.create(
                request_id=f"r{seed}-{n}",
                user=rng.choice([alice, bob]),
                organization=rng.choice([None, None, org]),
                api_key=rng.choice(keys),
                model=rng.choice(["m/a", "m/b", "m/c"]),
                agent=rng.choice(["", "", "planner"]),
                status=status,
                prompt_tokens=rng.randrange(0, 5000),
                completion_tokens=rng.randrange(0, 900),
                reasoning_tokens=rng.randrange(0, 50),
                cached_tokens=rng.randrange(0, 50),
                cache_write_tokens=rng.randrange(0, 50),
                upstream_cost=Decimal(rng.randrange(0, 10**6)) / 10**9 if settled else None,
                charge=charge,
                operator_loss=rng.choice([0, 0, 0, rng.randrange(1, 10**6)]) if settled else 0,
                hold_amount=rng.randrange(1, 10**7),
                created_at=NOW - timedelta(minutes=rng.randrange(0, 3 * 24 * 60), microseconds=rng.randrange(10**6)),
            )
        )
    # Other writers: pending requests settle (an UPDATE), settled ones are corrected (a save),
    # and a bulk UPDATE moves figures of several at once.
    for record in rng.sample(records, 20):
        if record.status == UsageStatus.PENDING:
            record.status, record.charge, record.upstream_cost = UsageStatus.OK, 1234, Decimal("0.000001")
            UsageRecord.objects.filter(pk=record.pk).update(status=record.status, charge=1234, upstream_cost="0.000001")
        elif record.status != UsageStatus.REFUSED:
            record.charge, record.prompt_tokens = record.charge + 77, record.prompt_tokens + 3
            record.save()
    records = list(UsageRecord.objects.all())

    assert rollups.discrepancies() == []
    groupings = {
        "day": ({"day": TruncDate}, lambda r: r.created_at.date()),
        "model": ({"model": "model"}, lambda r: r.model),
        "user": ({"email": "user__email"}, lambda r: r.user.email),
        "organization": ({"org": "organization__slug"}, lambda r: r.organization.slug if r.organization else None),
        "agent": ({"agent": "agent"}, lambda r: r.agent),
        "key": ({"key": "api_key_id"}, lambda r: r.api_key_id),
    }
    for _ in range(12):
        since = rng.choice([None, NOW - timedelta(minutes=rng.randrange(0, 4 * 24 * 60), seconds=rng.randrange(60))])
        until = rng.choice([None, NOW - timedelta(minutes=rng.randrange(0, 2 * 24 * 60), seconds=rng.randrange(60))])
        name = rng.choice(list(groupings))
        keys, key_of = groupings[name]
        found = rollups.totals(measures=MEASURES, keys=keys, since=since, until=until)
        want = expected(records, {name: key_of}, since, until)
        got = {tuple(row[k] for k in keys): {m: row[m] for m in MEASURES} for row in found}
        assert got == want, (name, since, until)
    # Filtered, and the one-row total of nothing.
    where = Q(user=alice, organization__isnull=True, model="m/a")
    mine = [r for r in records if r.user_id == alice.pk and r.organization_id is None and r.model == "m/a"]
    since = NOW - timedelta(hours=30, minutes=7)
    (total,) = rollups.totals(measures=MEASURES, where=where, since=since)
    assert total == expected(mine, {}, since, None).get((), ZERO)
    (nothing,) = rollups.totals(measures=["requests", "upstream_cost"], since=NOW + timedelta(days=1))
    assert nothing == {"requests": 0, "upstream_cost": Decimal(0)}

    # A rebuild from the raw rows writes exactly what the triggers kept.
    kept = rollup_rows()
    UsageRollup.objects.all().delete()
    rollups.rebuild()
    assert rollup_rows() == kept
    # Pruning raw rows keeps their sums.
    UsageRecord.objects.filter(created_at__lt=NOW - timedelta(days=1)).delete()
    assert rollup_rows() == kept


@pytest.mark.django_db(transaction=True)
def test_requests_through_the_services_settle_refuse_release_and_reconcile_into_the_rollups(fake_upstream, price):
    alice = make_user("alice@example.com", balance="10.00")
    org = organization_create(user=alice, name="Acme")
    wallet_credit(wallet=org.wallet, amount=10**9, kind=EntryKind.TOP_UP, idempotency_key="acme:opening")

    def meta(request_id, **extra):
        return RequestMeta(
            request_id=request_id, user=alice, api_key=None, endpoint="chat.completions", model=MODEL, **extra
        )

    def request(request_id, outcome, **extra):
        begun = run_async(arequest_begin, meta=meta(request_id, **extra), prompt_chars=4000, requested_output=100)
        return run_async(arequest_settle, begun=begun, outcome=outcome)

    request("ok", Outcome(usage=usage_of(400, 30, "0.00002")))
    request("org", Outcome(usage=usage_of(100, 10, "0.00001")), organization=org, wallet=org.wallet, agent="planner")
    request("failed", Outcome(status=UsageStatus.UPSTREAM_ERROR, billable=False, http_status=502))
    cut = request(
        "cut",
        Outcome(status=UsageStatus.CANCELLED, generation_id="gen-cut", output_chars=400, trust_upstream_cost=True),
    )
    run_async(ausage_refused, meta=meta("refused"), http_status=429, error="slow down")
    begun = run_async(arequest_begin, meta=meta("flying"), prompt_chars=4000, requested_output=100)
    assert rollups.discrepancies() == []
    generation = {"total_cost": Decimal("0.002"), "native_tokens_prompt": 1000, "native_tokens_completion": 20}
    assert "replaced by" in estimate_reconcile(record=cut, generation=generation)
    assert UsageRecord.objects.get(request_id="cut").cost_source == CostSource.RECONCILED

    assert rollups.discrepancies() == []
    (total,) = rollups.totals(measures=MEASURES)
    records = list(UsageRecord.objects.all())
    assert total == expected(records, {}, None, None)[()]
    assert (total["requests"], total["pending"], total["refused"]) == (6, 1, 1)
    assert total["held"] == begun.hold.amount
    call_command("verify_ledger", stdout=io.StringIO())


def usage_of(prompt: int, completion: int, cost: str):
    from core.usage import Usage

    return Usage(prompt_tokens=prompt, completion_tokens=completion, cost=Decimal(cost))


@pytest.mark.django_db
def test_verify_ledger_names_a_rollup_that_is_not_its_records_sum_and_the_command_rebuilds_it():
    alice = make_user("alice@example.com")
    for n, minutes in enumerate((5, 65, 24 * 60 + 5)):
        UsageRecord.objects.create(
            request_id=f"r{n}",
            user=alice,
            model="m/a",
            status=UsageStatus.REFUSED,
            created_at=NOW - timedelta(minutes=minutes),
        )
    hour = rollups.floor_hour(NOW - timedelta(minutes=65))
    UsageRollup.objects.filter(hour=hour).update(requests=5)
    out = io.StringIO()
    # The hour against its records; then the levels read from the hours (the day, the model's
    # hour and day) against that hour, which they no longer add up to. (The user days and months
    # are checked against the day level, which they still match.) NOW is weeks ago: the levels
    # of every month, not only the last week's.
    with pytest.raises(CommandError, match="4 problem"):
        call_command("verify_ledger", "--all-levels", stdout=out, stderr=out)
    assert f"rollup {hour:%Y-%m-%d %H}:00 user {alice.pk} 'm/a' '': requests +4" in out.getvalue()
    assert "model hour rollup" in out.getvalue() and "requests -4" in out.getvalue()
    out = io.StringIO()
    call_command(
        "rebuild_usage_rollups", "--since", f"{hour:%Y-%m-%dT%H}:30:00Z", "--until", NOW.isoformat(), stdout=out
    )
    assert "Rebuilt usage rollups: 2 rows written, 2 replaced." in out.getvalue()
    call_command("verify_ledger", stdout=io.StringIO())
    assert UsageRollup.objects.get(hour=hour).requests == 1


# --- PostgreSQL: the race ----------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_settlements_a_rebuild_and_a_reconciliation_leave_the_rollups_exact(server, fake_upstream, price):
    if connection.vendor != "postgresql":
        pytest.skip("the race is PostgreSQL's")
    ModelPrice.objects.create(model="other/model", prompt=Decimal("0.15"), completion=Decimal("0.60"))
    alice = make_user("crowd-a@example.com", balance="5.00")
    bob = make_user("crowd-b@example.com", balance="5.00")
    broke = make_user("crowd-c@example.com", balance="0")
    org = organization_create(user=bob, name="Crowd")
    Membership.objects.create(organization=org, user=alice, role=Role.MEMBER)
    wallet_credit(wallet=org.wallet, amount=5 * 10**9, kind=EntryKind.TOP_UP, idempotency_key="crowd:opening")
    alice_keys = [api_key_create(user=alice, name=f"k{n}")[1] for n in range(2)]
    org_key = org_key_create(actor=Membership.objects.get(user=bob), name="prod")[1]
    broke_key = api_key_create(user=broke, name="k")[1]
    # An estimate to correct while the crowd runs (its hold closed, its charge in the ledger).
    estimated = settle_an_estimate(alice)

    ok = Reply(body=completion("ok", u=usage(40, 7, cost="0.0000597")), delay=0.05)
    failing = Reply(500, {"error": {"message": "boom"}}, delay=0.05)
    calls = []
    for n in range(48):
        token = [*alice_keys, org_key, broke_key][n % 4]
        model = MODEL if n % 3 else "other/model"
        headers = {"Authorization": f"Bearer {token}", "X-Tokentill-Agent": "planner" if n % 5 == 0 else ""}
        calls.append((headers, {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}))
    fake_upstream.script("chat", *[failing if n % 7 == 0 else ok for n in range(48)])

    stop = threading.Event()
    rebuilt = []

    def rebuild_meanwhile():
        # (Each rebuild recomputes the coarser levels of its days too; each fold moves the
        # journal into the operator's.)
        while not stop.is_set():
            rebuilt.append(rollups.rebuild(since=rollups.floor_hour(datetime.now(UTC)) - timedelta(hours=1)))
            rollups.fold()
        connection.close()

    def reconcile_meanwhile():
        estimate_reconcile(record=estimated, generation={"total_cost": Decimal("0.003"), "native_tokens_prompt": 900})
        connection.close()

    async def crowd():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*[client.post("/v1/chat/completions", json=b, headers=h) for h, b in calls])

    helpers = [threading.Thread(target=rebuild_meanwhile), threading.Thread(target=reconcile_meanwhile)]
    for helper in helpers:
        helper.start()
    try:
        statuses = [r.status_code for r in asyncio.run(crowd())]
    finally:
        stop.set()
        for helper in helpers:
            helper.join()
    assert {200, 402} < set(statuses) and rebuilt  # and the upstream's failures
    assert UsageRecord.objects.get(pk=estimated.pk).cost_source == CostSource.RECONCILED
    assert not UsageRecord.objects.filter(status=UsageStatus.PENDING).exists()

    assert rollups.discrepancies() == []
    records = list(UsageRecord.objects.all())
    by_model = {
        (row["model"],): {m: row[m] for m in MEASURES}
        for row in rollups.totals(measures=MEASURES, keys={"model": "model"})
    }
    assert by_model == expected(records, {"model": lambda r: r.model}, None, None)
    by_user = {
        (row["email"],): {m: row[m] for m in MEASURES}
        for row in rollups.totals(measures=MEASURES, keys={"email": "user__email"})
    }
    assert by_user == expected(records, {"email": lambda r: r.user.email}, None, None)
    call_command("verify_ledger", stdout=open(os.devnull, "w"))


def settle_an_estimate(user) -> UsageRecord:
    meta = RequestMeta(request_id="cut", user=user, api_key=None, endpoint="chat.completions", model=MODEL)
    begun = run_async(arequest_begin, meta=meta, prompt_chars=4000, requested_output=100)
    outcome = Outcome(status=UsageStatus.CANCELLED, generation_id="gen-cut", output_chars=400, trust_upstream_cost=True)
    return run_async(arequest_settle, begun=begun, outcome=outcome)
