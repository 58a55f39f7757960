"""The coarser usage rollup levels (``proxy.rollups``): days, months, the operator's hours and days
(a journal folded in) and the spenders' months. Every total read through them is exactly the raw
records' aggregate at any since/until across hour, day and month edges, folded or not; a rebuild
writes what the triggers kept; pruning keeps them; the top spenders' threshold search finds exactly
what summing everyone would; and on PostgreSQL, folds racing real parallel settlements never
count a delta twice or miss one — in any snapshot."""

from __future__ import annotations

import io
import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDate, TruncHour, TruncMonth, TruncWeek
from django.utils import timezone

from accounts.services import api_key_create
from backoffice import business
from orgs.services import organization_create
from proxy import rollups
from proxy.models import (
    ModelDayRollup,
    ModelHourRollup,
    ModelRollupJournal,
    SpenderMonthRollup,
    UsageDayRollup,
    UsageRecord,
    UsageStatus,
    UserDayRollup,
    UserMonthRollup,
)
from proxy.retention import usage_prune
from tests.conftest import make_user
from wallet.models import Entry, EntryKind
from wallet.services import wallet_charge, wallet_credit, wallet_get_or_create

# Records over ~70 days ending here: three calendar months, their edges inside the range.
END = datetime(2026, 11, 10, 15, 30, tzinfo=UTC)
SPAN_MINUTES = 70 * 24 * 60
STATUSES = [UsageStatus.OK] * 5 + [UsageStatus.CANCELLED, UsageStatus.REFUSED, UsageStatus.PENDING]
MEASURES = ["requests", "refused", "prompt_tokens", "upstream_cost", "charge", "held", "pending", "loss_requests"]
ZERO = {m: Decimal(0) if m == "upstream_cost" else 0 for m in MEASURES}
LEVELS = (UsageDayRollup, UserDayRollup, UserMonthRollup, ModelHourRollup, ModelDayRollup, SpenderMonthRollup)


def expected(records, key_of, since, until, where=lambda r: True) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for r in records:
        if (since is not None and r.created_at < since) or (until is not None and r.created_at >= until):
            continue
        if not where(r):
            continue
        row = out.setdefault(tuple(key(r) for key in key_of), dict(ZERO))
        pending = r.status == UsageStatus.PENDING
        row["requests"] += 1
        row["refused"] += r.status == UsageStatus.REFUSED
        row["pending"] += pending
        row["held"] += r.hold_amount if pending else 0
        row["loss_requests"] += r.operator_loss > 0
        row["upstream_cost"] += r.upstream_cost or 0
        row["prompt_tokens"] += r.prompt_tokens
        row["charge"] += r.charge
    return out


def record(rng, n, *, users, orgs, keys, at, prefix="r"):
    status = rng.choice(STATUSES)
    settled = status not in (UsageStatus.PENDING, UsageStatus.REFUSED)
    return UsageRecord(
        request_id=f"{prefix}{n}",
        user=rng.choice(users),
        organization=rng.choice([None, None, *orgs]),
        api_key=rng.choice(keys),
        model=rng.choice(["m/a", "m/b", "m/c"]),
        agent=rng.choice(["", "", "planner"]),
        status=status,
        prompt_tokens=rng.randrange(0, 5000),
        upstream_cost=Decimal(rng.randrange(0, 10**6)) / 10**9 if settled else None,
        charge=rng.randrange(0, 5_000_000) if settled else 0,
        operator_loss=rng.choice([0, 0, 0, rng.randrange(1, 10**6)]) if settled else 0,
        hold_amount=rng.randrange(1, 10**7),
        created_at=at,
    )


def random_moment(rng) -> datetime:
    """Anywhere in the span, or exactly on an hour, day or month edge (the levels' seams)."""
    moment = END - timedelta(minutes=rng.randrange(0, SPAN_MINUTES + 3 * 24 * 60), seconds=rng.randrange(60))
    edge = rng.choice(["none", "hour", "day", "month"])
    if edge == "hour":
        return rollups.floor_hour(moment)
    if edge == "day":
        return rollups.floor_day(moment)
    if edge == "month":
        return rollups.floor_month(moment)
    return moment


def level_rows() -> dict[str, list]:
    """Every level's rows but those that sum to nothing (a correction that moved a record's
    group leaves its old row at zero; a rebuild from the raw rows writes none)."""

    def rows(model):
        fields = [f.attname for f in model._meta.concrete_fields if f.attname != "id"]
        empty = Q(charge=0) if model is SpenderMonthRollup else Q(requests=0)
        return sorted(model.objects.exclude(empty).values_list(*fields), key=repr)

    return {model.__name__: rows(model) for model in LEVELS}


@pytest.mark.django_db
@pytest.mark.parametrize("seed", [3, 4])
def test_every_level_reads_the_raw_aggregates_across_hour_day_and_month_edges_folded_or_not(seed):
    rng = random.Random(seed)
    alice, bob = make_user("alice@example.com"), make_user("bob@example.com")
    org = organization_create(user=alice, name="Acme")
    keys = [None, api_key_create(user=alice, name="a")[0], api_key_create(user=bob, name="b")[0]]
    people = {"users": [alice, bob], "orgs": [org], "keys": keys}
    moments = sorted(END - timedelta(minutes=rng.randrange(0, SPAN_MINUTES)) for _ in range(160))
    # Inserted by the triggers (bulk: one statement, a row at a time to them), half folded.
    UsageRecord.objects.bulk_create([record(rng, n, at=at, **people) for n, at in enumerate(moments[:80])])
    # (In batches smaller than the journal: each its own transaction.)
    assert rollups.fold(batch=7) > 0 and not ModelRollupJournal.objects.exists()
    UsageRecord.objects.bulk_create([record(rng, n + 80, at=at, **people) for n, at in enumerate(moments[80:])])
    # Other writers: pending requests settle, settled ones are corrected (subtract, add).
    for found in rng.sample(list(UsageRecord.objects.all()), 40):
        if found.status == UsageStatus.PENDING:
            UsageRecord.objects.filter(pk=found.pk).update(status=UsageStatus.OK, charge=1234, upstream_cost="0.000001")
        elif found.status != UsageStatus.REFUSED:
            found.charge, found.model = found.charge + 77, rng.choice(["m/a", "m/d"])
            found.save()
    assert ModelRollupJournal.objects.exists()  # some of it unfolded: readers add the journal
    records = list(UsageRecord.objects.select_related("user", "organization"))
    assert rollups.discrepancies() == []

    groupings = {
        # Operator-wide: the model's days and hours, and the journal.
        "day": ({"day": TruncDate}, lambda r: r.created_at.date(), None),
        "month": ({"month": TruncMonth}, lambda r: rollups.floor_month(r.created_at), None),
        "week": (
            {"week": TruncWeek},
            lambda r: rollups.floor_day(r.created_at - timedelta(days=r.created_at.weekday())),
            None,
        ),
        "hour": ({"hour": TruncHour}, lambda r: rollups.floor_hour(r.created_at), None),
        "model": ({"model": "model"}, lambda r: r.model, None),
        # Per user: months (by model), user days, days × model, hours (key, agent).
        "mine by model": ({"model": "model"}, lambda r: r.model, Q(user=alice, organization__isnull=True)),
        "mine by day": ({"day": TruncDate}, lambda r: r.created_at.date(), Q(user=alice, organization__isnull=True)),
        "org members": ({"member": "user_id"}, lambda r: r.user_id, Q(organization=org)),
        "org by month": ({"month": TruncMonth}, lambda r: rollups.floor_month(r.created_at), Q(organization=org)),
        "one model by day": ({"day": TruncDate}, lambda r: r.created_at.date(), Q(user=bob, model="m/a")),
        "key": ({"key": "api_key_id"}, lambda r: r.api_key_id, None),
        "agent": ({"agent": "agent"}, lambda r: r.agent, None),
        "email": ({"email": "user__email"}, lambda r: r.user.email, None),
        "a key's days": ({"day": TruncDate}, lambda r: r.created_at.date(), Q(api_key_id=keys[1].pk)),
    }
    filters = {
        None: lambda r: True,
        "mine": lambda r: r.user_id == alice.pk and r.organization_id is None,
        "org": lambda r: r.organization_id == org.pk,
        "bob m/a": lambda r: r.user_id == bob.pk and r.model == "m/a",
        "key": lambda r: r.api_key_id == keys[1].pk,
    }
    filter_of = {
        None: None,
        "mine by model": "mine",
        "mine by day": "mine",
        "org members": "org",
        "org by month": "org",
        "one model by day": "bob m/a",
        "a key's days": "key",
    }
    for name, (key_map, key_of, where) in groupings.items():
        for _ in range(6):
            since = rng.choice([None, random_moment(rng), random_moment(rng)])
            until = rng.choice([None, random_moment(rng), random_moment(rng)])
            found = rollups.totals(measures=MEASURES, keys=key_map, where=where, since=since, until=until)
            want = expected(records, [key_of], since, until, filters[filter_of.get(name)])
            got = {tuple(row[k] for k in key_map): {m: row[m] for m in MEASURES} for row in found}
            assert got == want, (name, since, until)

    # A rebuild of the levels writes what the triggers (and the fold) kept.
    rollups.fold()
    kept = level_rows()
    for model in LEVELS:
        model.objects.all().delete()
    rollups.rebuild_levels()
    assert level_rows() == kept
    # And a rebuild from the raw rows too (hours, then the levels of their days and months).
    rollups.rebuild()
    assert level_rows() == kept and rollups.discrepancies() == []

    # Pruning the raw rows of the oldest month leaves every level — and every total over whole
    # hours — as it was.
    cutoff = rollups.floor_month(END)
    windows = [(None, None), (None, cutoff), (cutoff - timedelta(days=40, hours=5), END)]
    # (Pending records are never pruned: settle them so the window's raw rows can all go.)
    UsageRecord.objects.filter(status=UsageStatus.PENDING, created_at__lt=cutoff).update(status=UsageStatus.OK)
    before = [rollups.totals(measures=MEASURES, keys={"model": "model"}, since=s, until=u) for s, u in windows]
    mine = [rollups.totals(measures=MEASURES, where=Q(organization=org), since=s, until=u) for s, u in windows]
    assert usage_prune(before=cutoff, batch_size=7).deleted > 0
    rollups.fold()
    by = {"model": "model"}
    after = [rollups.totals(measures=MEASURES, keys=by, since=s, until=u) for s, u in windows]
    assert sorted(after, key=repr) == sorted(before, key=repr)
    assert [rollups.totals(measures=MEASURES, where=Q(organization=org), since=s, until=u) for s, u in windows] == mine
    assert rollups.discrepancies() == []

    # A level row that is off, one missing and one too many are each named.
    off = UserDayRollup.objects.order_by("pk").first()
    UserDayRollup.objects.filter(pk=off.pk).update(charge=off.charge + 3)
    gone = UserMonthRollup.objects.order_by("pk").first()
    gone.delete()
    ModelDayRollup.objects.create(day=rollups.floor_day(END), model="m/none", requests=2)
    found = {(m.level, m.differences.get("charge"), m.differences.get("requests")) for m in rollups.discrepancies()}
    assert ("user day", 3, None) in found and ("model day", None, 2) in found
    assert ("month", -gone.charge or None, -gone.requests) in found


@pytest.mark.django_db
def test_the_top_spenders_search_finds_exactly_what_summing_everyone_gives(monkeypatch):
    rounds: list[tuple[int, int]] = []  # (per month, bound of the payers not read) of each round
    read = rollups.spender_candidates

    def counted(**kwargs):
        bounds, rest = read(**kwargs)
        rounds.append((kwargs["per_month"], rest))
        return bounds, rest

    monkeypatch.setattr(rollups, "spender_candidates", counted)
    rng = random.Random(7)
    now = timezone.now()
    User = get_user_model()
    users = [User.objects.create_user(email=f"spender{n}@example.com") for n in range(150)]
    owner = make_user("owner@example.com")
    orgs = [organization_create(user=owner, name=f"Org {n}") for n in range(3)]
    records = []
    for n in range(2000):
        # Skewed: a few spend most, like a real crowd; some months busier than others.
        user = users[min(int(rng.paretovariate(1.2)) - 1, len(users) - 1) if rng.random() < 0.5 else rng.randrange(150)]
        at = now - timedelta(minutes=rng.randrange(0, 100 * 24 * 60))
        records.append(
            UsageRecord(
                request_id=f"s{n}",
                user=user,
                organization=rng.choice([None] * 6 + orgs),
                model="m/a",
                status=UsageStatus.OK,
                charge=rng.randrange(1, 10**7),
                created_at=at,
            )
        )
    UsageRecord.objects.bulk_create(records)
    # Tool charges (ledger entries, now), for users and an organization.
    for n, payer in enumerate([users[5], users[40], users[149]]):
        wallet = wallet_get_or_create(user=payer)
        wallet_credit(wallet=wallet, amount=10**9, kind=EntryKind.TOP_UP, idempotency_key=f"t{n}")
        wallet_charge(wallet=wallet, amount=(n + 1) * 3 * 10**7, idempotency_key=f"c{n}")
    wallet_credit(wallet=orgs[2].wallet, amount=10**9, kind=EntryKind.TOP_UP, idempotency_key="org")
    wallet_charge(wallet=orgs[2].wallet, amount=5 * 10**6, idempotency_key="org-c")

    def brute(kind, since, until):
        spent: dict[int, list[int]] = {}
        for r in records:
            if r.created_at < since or (until is not None and r.created_at >= until):
                continue
            if (kind == "user") != (r.organization_id is None):
                continue
            payer = r.user_id if kind == "user" else r.organization_id
            spent.setdefault(payer, [0, 0])[0] += r.charge
        tools = Entry.objects.filter(kind=EntryKind.CHARGE, created_at__gte=since)
        if until is not None:
            tools = tools.filter(created_at__lt=until)
        for entry in tools.select_related("wallet"):
            payer = entry.wallet.user_id if kind == "user" else entry.wallet.organization_id
            if payer is not None:
                spent.setdefault(payer, [0, 0])[1] += -entry.amount
        rows = sorted(((u + t, p, u, t) for p, (u, t) in spent.items() if u + t > 0), key=lambda x: (-x[0], x[1]))
        return [(p, u, t, s) for s, p, u, t in rows]

    for days in (3, 7, 30, 45, 90, 120):
        since = now - timedelta(days=days, minutes=rng.randrange(0, 600))
        until = rng.choice([None, None, now - timedelta(days=rng.randrange(0, days))])
        for kind, limit in (("user", 3), ("user", 10), ("organization", 2)):
            found = business.top_spenders(kind=kind, since=since, until=until, limit=limit)
            got = [(row[kind], row["usage"], row["tools"], row["spent"]) for row in found]
            assert got == brute(kind, since, until)[:limit], (days, kind, limit)
            if kind == "user":
                assert all(row["email"] == User.objects.get(pk=row["user"]).email for row in found)
    # The searches stopped early (payers left unread) and read deeper (a second round) too.
    assert any(rest > 0 for _, rest in rounds) and any(per_month > 40 for per_month, _ in rounds)


# --- PostgreSQL: folds racing settlements ------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_folds_racing_parallel_settlements_never_count_a_delta_twice_or_miss_one():
    """Writers settle pending records (the trigger appends journal rows) and correct settled ones
    in parallel transactions while folds run back to back; a reader checks, in single snapshots
    (REPEATABLE READ), that the operator-wide totals equal the raw aggregates at that instant."""
    if connection.vendor != "postgresql":
        pytest.skip("the race is PostgreSQL's")
    rng = random.Random(11)
    alice, bob = make_user("alice@example.com"), make_user("bob@example.com")
    org = organization_create(user=alice, name="Acme")
    now = timezone.now()
    pending = [
        UsageRecord(
            request_id=f"p{n}",
            user=rng.choice([alice, bob]),
            organization=rng.choice([None, org]),
            model=rng.choice(["m/a", "m/b", "m/c", "m/d"]),
            status=UsageStatus.PENDING,
            hold_amount=1000,
            # Across the last 3 days: whole days, edge hours and raw edges all in play.
            created_at=now - timedelta(minutes=rng.randrange(0, 3 * 24 * 60)),
        )
        for n in range(240)
    ]
    UsageRecord.objects.bulk_create(pending)
    ids = list(UsageRecord.objects.values_list("id", flat=True))
    rng.shuffle(ids)
    shares = [ids[n::4] for n in range(4)]
    stop = threading.Event()
    errors: list[BaseException] = []
    folded: list[int] = []
    checks: list[int] = []

    def settle(share, seed):
        local = random.Random(seed)
        try:
            for pk in share:
                with transaction.atomic():
                    UsageRecord.objects.filter(pk=pk).update(
                        status=UsageStatus.OK,
                        charge=local.randrange(1, 10**6),
                        upstream_cost="0.000002",
                        prompt_tokens=9,
                    )
                if local.random() < 0.3:  # a correction: the old figures out, the new in
                    with transaction.atomic():
                        found = UsageRecord.objects.select_for_update().get(pk=local.choice(share))
                        if found.status == UsageStatus.OK:
                            found.charge += 5
                            found.save(update_fields=["charge"])
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    def fold_meanwhile():
        try:
            while not stop.is_set():
                folded.append(rollups.fold(batch=5))  # many small transactions
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    def check_meanwhile():
        since = now - timedelta(days=2, minutes=17)
        try:
            while not stop.is_set():
                with transaction.atomic():
                    with connection.cursor() as cursor:
                        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    for window in ({}, {"since": since}):
                        found = rollups.totals(
                            measures=["requests", "charge", "pending"], keys={"model": "model"}, **window
                        )
                        raw = UsageRecord.objects.filter(created_at__gte=window.get("since", now - timedelta(days=9)))
                        want = {
                            row["model"]: (row["n"], int(row["c"]))
                            for row in raw.values("model").annotate(n=Count("id"), c=Sum("charge"))
                        }
                        got = {row["model"]: (row["requests"], row["charge"]) for row in found}
                        assert got == want, (window, got, want)
                checks.append(1)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    writers = [threading.Thread(target=settle, args=(share, n)) for n, share in enumerate(shares)]
    helpers = [threading.Thread(target=fold_meanwhile), threading.Thread(target=check_meanwhile)]
    for thread in [*helpers, *writers]:
        thread.start()
    for writer in writers:
        writer.join()
    stop.set()
    for helper in helpers:
        helper.join()
    assert not errors, errors
    assert sum(folded) > 0 and len(folded) > 3 and checks
    rollups.fold()
    assert not ModelRollupJournal.objects.exists()
    assert not UsageRecord.objects.filter(status=UsageStatus.PENDING).exists()
    assert rollups.discrepancies() == []
    records = list(UsageRecord.objects.all())
    for key_map, key_of in (
        ({"model": "model"}, lambda r: r.model),
        ({"day": TruncDate}, lambda r: r.created_at.date()),
    ):
        for since in (None, now - timedelta(days=1, hours=3, minutes=5)):
            found = rollups.totals(measures=MEASURES, keys=key_map, since=since)
            got = {tuple(row[k] for k in key_map): {m: row[m] for m in MEASURES} for row in found}
            assert got == expected(records, [key_of], since, None)
    # The folded levels hold exactly what the hourly rows do (a rebuild changes nothing).
    kept = level_rows()
    rollups.rebuild_levels()
    assert level_rows() == kept


@pytest.mark.django_db
def test_the_dashboard_warns_when_nothing_folds_the_journal_and_reconcile_holds_folds_it():
    from django.core.management import call_command
    from django.test import Client

    staff = make_user("staff@example.com", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(staff)
    alice = make_user("alice@example.com")
    UsageRecord.objects.create(request_id="r1", user=alice, model="m/a", status=UsageStatus.OK, charge=5)
    assert 'data-attention="rollup-fold"' not in client.get("/admin/").content.decode()  # just written
    ModelRollupJournal.objects.update(created_at=timezone.now() - timedelta(hours=1))
    assert 'data-attention="rollup-fold"' in client.get("/admin/").content.decode()
    out = io.StringIO()
    call_command("reconcile_holds", stdout=out)
    assert "folded 1 usage journal row(s)" in out.getvalue()
    assert not ModelRollupJournal.objects.exists()
    assert 'data-attention="rollup-fold"' not in client.get("/admin/").content.decode()
    (total,) = rollups.totals(measures=["requests", "charge"])
    assert total == {"requests": 1, "charge": 5}
