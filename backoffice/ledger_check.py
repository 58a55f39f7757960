"""The run behind ``manage.py verify_ledger``: every check of ``backoffice.reports`` over the whole
ledger, or (``incremental``) over the entries added since the checkpoint, in one snapshot.

A run reads everything in one REPEATABLE READ transaction on PostgreSQL, so the wallets, holds
and entries it compares are one instant's. The entries are walked in id ranges of
``ENTRY_RANGE`` (progress is reported after each), each range checked for its links and summed
per kind, so no query holds ten million rows at once. The transaction gets its own ``work_mem``
(``WORK_MEM``, ``--work-mem``) and no JIT. A full run checks the usage rollups (``EXTRA_CHECKS``)
against their raw records a UTC day at a time and the coarser levels of the last ``LEVEL_WINDOW``
(every month's with ``all_levels``) a month at a time, on PostgreSQL on a second connection that
imports the run's snapshot, while the ledger is walked on the first (``_InSnapshot``).

The checkpoint (``LedgerCheckpoint``) moves only after a clean run, and only to an id below
which no entry can still appear: see its docstring for how a late-committing smaller id is
caught. Entries above it are checked again by the next run — a few minutes' worth when cron runs
it every few minutes.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db import connection, transaction
from django.db.models import Max, Min
from django.utils import timezone

from core.money import format_usd
from proxy import rollups
from proxy.models import UsageRecord, UsageRollup
from wallet.models import Entry, EntryKind

from .models import LedgerCheckpoint
from .reports import (
    LedgerTotals,
    entry_link_discrepancies,
    entry_totals_by_kind,
    ledger_totals,
    rollup_problems,
    usage_discrepancies,
    wallet_discrepancies,
)

Progress = Callable[[str], None]

ENTRY_RANGE = 1_000_000  # entry ids per range read
PROGRESS_EVERY = 5.0  # s: a check done a chunk at a time says how far it is at most this often
# PostgreSQL's memory per sort or hash for the run's statements (``SET LOCAL``, this transaction
# only): the full run's usage check hashes every record and every debit, which at the stock 4 MB
# spill to disk in hundreds of batches. Ten million debits grouped take about 2 GB, so 256 MB
# still spills them, but in a handful of partitions, each read once.
WORK_MEM = "256MB"
_WORK_MEM_FORMAT = re.compile(r"^[1-9][0-9]*\s*(kB|MB|GB)$")


@dataclass
class LedgerRun:
    """What one run found: the totals it printed from and every problem, as sentences."""

    incremental: bool
    checked_from: int  # entries with a larger id were read; 0: all of them
    totals: LedgerTotals | None = None
    problems: list[str] = field(default_factory=list)
    entries_read: int = 0
    all_levels: bool = False  # the coarser rollup levels of every month, not the last LEVEL_WINDOW's
    say: Progress = field(default=lambda line: None, repr=False, compare=False)  # progress, timed


def verify_ledger_run(
    *,
    incremental: bool = False,
    progress: Progress | None = None,
    work_mem: str = WORK_MEM,
    all_levels: bool = False,
) -> LedgerRun:
    """Check the ledger; on a clean run, move the checkpoint. See the module docstring.

    ``work_mem`` (PostgreSQL's syntax: ``256MB``) is set for the run's transaction only;
    ``all_levels`` checks the coarser rollup levels of every month (``rollup_check``)."""
    if not _WORK_MEM_FORMAT.match(work_mem):
        raise ValueError(f"work_mem must look like 256MB or 1GB, not {work_mem!r}")
    say = _timed(progress)
    postgres = connection.vendor == "postgresql"
    # Inside a caller's transaction (a test) the snapshot is the caller's business.
    own_snapshot = postgres and not connection.in_atomic_block
    alongside: _InSnapshot | None = None
    with transaction.atomic(), ExitStack() as finishing:
        if postgres:
            with connection.cursor() as cursor:
                if own_snapshot:
                    # The transaction's first statement: every read below sees one snapshot.
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                # With the snapshot, the run's settings (SET LOCAL: this transaction only). Its
                # few big statements read millions of rows each: JIT compiling them costs seconds
                # (for every parallel worker) and saves less.
                cursor.execute(
                    "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint,"
                    " set_config('work_mem', %s, true), set_config('jit', 'off', true)",
                    [work_mem],
                )
                xmax = cursor.fetchone()[0]
                if own_snapshot and not incremental:
                    cursor.execute("SELECT pg_export_snapshot()")
                    alongside = _InSnapshot(cursor.fetchone()[0], work_mem)
            say(f"work_mem {work_mem} for this run")
        else:
            xmax = None  # SQLite: one writer at a time, whatever is visible is final
        checkpoint = LedgerCheckpoint.objects.first() or LedgerCheckpoint()
        start = checkpoint.verified_through if incremental else 0
        newest = Entry.objects.aggregate(newest=Max("id"))["newest"] or 0
        run = LedgerRun(incremental=incremental, checked_from=start, all_levels=all_levels, say=say)
        if alongside is not None:
            alongside.start(lambda: _extra_checks(run))
            finishing.callback(alongside.join)  # however the run ends, its queries end first
            say("usage rollups: checking alongside, on a second connection in the same snapshot")

        by_kind = dict.fromkeys(EntryKind.values, 0)
        if incremental:
            by_kind.update({kind: int(total) for kind, total in checkpoint.totals.items()})
        # The new checkpoint: the highest id now when nothing was running at this run's snapshot
        # (a transaction that drew a smaller id had its xid before newest was drawn, so it would
        # be running in it, or be done); else the previous run's highest id, once nothing below
        # it can still commit; on SQLite, the highest id now. (The first rule needs the highest
        # id and the xmax from one snapshot: the run's own.)
        if not postgres:
            final = newest
        elif own_snapshot and _all_ended_before(xmax):
            final = newest
        elif checkpoint.candidate_id is not None and _all_ended_before(checkpoint.candidate_xmax):
            final = max(start, min(checkpoint.candidate_id, newest))
        else:
            final = start
        final_by_kind = dict(by_kind)

        low = start
        while low < newest:
            high = min(low + ENTRY_RANGE, newest)
            run.problems += _wallet_lines(entry_link_discrepancies(after_id=low, through_id=high))
            for kind, total in entry_totals_by_kind(after_id=low, through_id=high).items():
                by_kind[kind] += total
            if high <= final:
                final_by_kind = dict(by_kind)
            elif low < final:  # the range straddles the new checkpoint: sum its lower part apart
                for kind, total in entry_totals_by_kind(after_id=low, through_id=final).items():
                    final_by_kind[kind] += total
            run.entries_read = high - start
            say(f"entries {start + 1:,}–{high:,} of {newest:,}: links and sums checked")
            low = high

        run.problems += _wallet_lines(wallet_discrepancies(sums=not incremental))
        say("wallets: balances and holds checked")
        run.totals = totals = ledger_totals(by_kind=by_kind)
        run.problems += _identity_lines(totals)
        run.problems += [
            f"usage record {request_id}: charged {format_usd(charge)} but the ledger debited {format_usd(debited)}"
            for request_id, charge, debited in (
                usage_discrepancies(after_id=start, through_id=newest) if incremental else usage_discrepancies()
            )
        ]
        say("usage records: charges checked against their debits")
        run.problems += alongside.result() if alongside is not None else _extra_checks(run)

        if not run.problems:
            checkpoint.verified_through = final
            checkpoint.totals = {kind: str(total) for kind, total in final_by_kind.items()}
            checkpoint.candidate_id, checkpoint.candidate_xmax = (newest, xmax) if postgres else (None, None)
        # The verdict is kept whatever it was (the dashboard shows it); the checkpoint above
        # moves only after a clean run.
        checkpoint.last_run_at = timezone.now()
        checkpoint.last_run_incremental = incremental
        checkpoint.last_run_problem_count = len(run.problems)
        checkpoint.last_run_problems = run.problems[: LedgerCheckpoint.PROBLEMS_KEPT]
        checkpoint.last_run_totals = _stored_totals(totals)
        checkpoint.save()
    return run


def _stored_totals(totals: LedgerTotals) -> dict:
    return {
        "by_kind": {kind: str(total) for kind, total in totals.by_kind.items()},
        **{name: str(getattr(totals, name)) for name in _TOTAL_FIELDS},
    }


_TOTAL_FIELDS = ("entries_total", "balances_total", "held_total", "active_holds_total")


# The dashboard calls the last run stale after this: a daily full run (or incremental runs from
# cron every few minutes) with a couple of hours' slack for a slow one.
STALE_AFTER = timedelta(hours=26)


@dataclass(frozen=True)
class LedgerVerdict:
    """The last ``verify_ledger`` run as the staff dashboard shows it, read from the checkpoint
    row and the highest entry id (one index seek): no pass over the ledger."""

    ran_at: datetime | None  # None: never run
    incremental: bool = False
    problem_count: int = 0
    problems: tuple[str, ...] = ()
    totals: LedgerTotals | None = None
    verified_through: int = 0  # the checkpoint: entries up to this id are proved
    newest_id: int = 0
    stale: bool = False

    @property
    def clean(self) -> bool:
        return self.ran_at is not None and self.problem_count == 0

    @property
    def problems_not_shown(self) -> int:
        return self.problem_count - len(self.problems)

    @property
    def unverified(self) -> int:
        """Entry ids above the checkpoint: what the next incremental run will read."""
        return max(self.newest_id - self.verified_through, 0)


def last_verdict(*, now: datetime | None = None) -> LedgerVerdict:
    """The verdict of the last ``verify_ledger`` run and how far its checkpoint is."""
    checkpoint = LedgerCheckpoint.objects.first()
    newest = Entry.objects.aggregate(newest=Max("id"))["newest"] or 0
    if checkpoint is None or checkpoint.last_run_at is None:
        return LedgerVerdict(ran_at=None, newest_id=newest, stale=True)
    stored = checkpoint.last_run_totals or {}
    totals = None
    if stored:
        totals = LedgerTotals(
            by_kind={kind: int(total) for kind, total in stored["by_kind"].items()},
            **{name: int(stored[name]) for name in _TOTAL_FIELDS},
        )
    now = now or timezone.now()
    return LedgerVerdict(
        ran_at=checkpoint.last_run_at,
        incremental=checkpoint.last_run_incremental,
        problem_count=checkpoint.last_run_problem_count,
        problems=tuple(checkpoint.last_run_problems),
        totals=totals,
        verified_through=checkpoint.verified_through,
        newest_id=newest,
        stale=now - checkpoint.last_run_at > STALE_AFTER,
    )


# An incremental run checks the usage rollups of this recent window only: records settle within
# HOLD_TTL and estimates are corrected within minutes, so older hours no longer change.
ROLLUP_WINDOW = timedelta(days=1)


# A full run compares the rollups with their raw records a UTC day at a time: each day's two
# sides are grouped and sorted in memory (a day of ten million records over 90 days is ~110,000),
# where the whole range at once spilled two sorts of every record to disk.
ROLLUP_CHUNK = timedelta(days=1)
ROLLUP_PROBLEMS = 100  # at most this many mismatches named
# A full run checks the coarser rollup levels (days, months, the operator's hours and days,
# spenders' months) against the hourly rows for the days from this long ago (and the months those
# touch), unless asked for all of them (``--all-levels``). Every level is written by the same
# trigger statement as its hourly row, and what a level row can be off by its hourly rows show —
# but comparing every one re-groups ~every hourly row five ways: 171 s at ten million records on
# the 2-vCPU VM, more than the rest of the run together. Run ``--all-levels`` weekly, say.
LEVEL_WINDOW = timedelta(days=7)


def rollup_check(run: LedgerRun) -> list[str]:
    """The usage rollups every period total is read from equal their raw records' sums (all the
    hours raw records remain for; the last ``ROLLUP_WINDOW`` in an incremental run).

    The full run checks the same hours as ``rollup_problems()`` with no bounds does — those after
    the oldest raw record's, whose raw rows may be partly pruned — as consecutive days: the hours
    of ``[since, until)`` for each, and everything from the last day's start on; then the coarser
    levels against the hourly rows (never pruned) a UTC month at a time, so a month-level row is
    compared once, not once per day of it: those of the last ``LEVEL_WINDOW`` (every month's with
    ``run.all_levels``)."""
    if run.incremental:
        return rollup_problems(since=timezone.now() - ROLLUP_WINDOW, limit=ROLLUP_PROBLEMS)
    problems = _hours_by_day(run)
    if len(problems) < ROLLUP_PROBLEMS:
        problems += _levels_by_month(run, limit=ROLLUP_PROBLEMS - len(problems))
    return problems


def _hours_by_day(run: LedgerRun) -> list[str]:
    span = UsageRecord.objects.aggregate(oldest=Min("created_at"), newest=Max("created_at"))
    if span["oldest"] is None:
        return []  # no raw records: every rollup hour is a pruned one
    # From the hour after the oldest record's to the next UTC midnight, then whole UTC days (a
    # coarser rollup row is never cut in two), the last one open-ended.
    since = rollups.floor_hour(span["oldest"]) + rollups.HOUR
    starts = [since]
    midnight = since.astimezone(UTC).replace(hour=0) + ROLLUP_CHUNK
    while midnight <= span["newest"]:
        starts.append(midnight)
        midnight += ROLLUP_CHUNK
    days = len(starts)
    problems: list[str] = []
    reported = time.monotonic()
    for day, start in enumerate(starts):
        until = starts[day + 1] if day + 1 < days else None
        problems += rollup_problems(since=start, until=until, limit=ROLLUP_PROBLEMS - len(problems), levels=False)
        if len(problems) >= ROLLUP_PROBLEMS:
            break
        if until is not None and time.monotonic() - reported >= PROGRESS_EVERY:
            run.say(f"usage rollups: {day + 1} of {days} days checked against their raw records")
            reported = time.monotonic()
    run.say(f"usage rollups: {days} days checked against their raw records")
    return problems


def _levels_by_month(run: LedgerRun, *, limit: int) -> list[str]:
    span = UsageRollup.objects.aggregate(oldest=Min("hour"), newest=Max("hour"))
    if span["oldest"] is None:
        return []
    since = rollups.floor_month(span["oldest"])
    if not run.all_levels:
        since = max(since, rollups.floor_day(timezone.now() - LEVEL_WINDOW))
    starts = [since]
    while (following := rollups.next_month(starts[-1])) <= span["newest"]:
        starts.append(following)
    problems: list[str] = []
    for month, start in enumerate(starts):
        until = starts[month + 1] if month + 1 < len(starts) else None  # the last one open-ended
        problems += rollup_problems(since=start, until=until, limit=limit - len(problems), hourly=False)
        if len(problems) >= limit:
            break
    scope = "" if run.all_levels else f" from {since:%Y-%m-%d} (--all-levels: every month)"
    run.say(f"usage rollup levels: {len(starts)} months checked against the hourly rows{scope}")
    return problems


# More checks (``(run) -> [problem, …]``) run after the ledger's own, inside the same snapshot.
EXTRA_CHECKS: list[Callable[[LedgerRun], list[str]]] = [rollup_check]


def _extra_checks(run: LedgerRun) -> list[str]:
    return [problem for check in EXTRA_CHECKS for problem in check(run)]


class _InSnapshot:
    """Work done on a thread and a connection of their own, inside the run's snapshot (exported
    by the run's transaction, imported by this one): PostgreSQL runs a statement on one core
    unless it plans it parallel, so a full run checks the usage rollups — most of its time —
    on the second core while the first walks the ledger, and both see the same instant."""

    _SNAPSHOT_ID = re.compile(r"^[0-9A-F]+-[0-9A-F]+(-[0-9]+)?$")

    def __init__(self, snapshot_id: str, work_mem: str):
        if not self._SNAPSHOT_ID.match(snapshot_id):
            raise ValueError(f"unexpected snapshot id {snapshot_id!r}")
        self.snapshot_id, self.work_mem = snapshot_id, work_mem
        self._thread: threading.Thread | None = None
        self._result: list[str] = []
        self._error: BaseException | None = None

    def start(self, work: Callable[[], list[str]]) -> None:
        self._thread = threading.Thread(target=self._run, args=(work,), name="verify_ledger-alongside", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], list[str]]) -> None:
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    # Before the transaction's first query: it then sees exactly the run's snapshot.
                    cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    cursor.execute(f"SET TRANSACTION SNAPSHOT '{self.snapshot_id}'")
                    cursor.execute(
                        "SELECT set_config('work_mem', %s, true), set_config('jit', 'off', true)", [self.work_mem]
                    )
                self._result = work()
        except BaseException as exc:  # handed to the run's thread, raised there
            self._error = exc
        finally:
            connection.close()  # this thread's own connection

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def result(self) -> list[str]:
        self.join()
        if self._error is not None:
            raise self._error
        return self._result


# True when no transaction that was running at our snapshot started before the xid ``%s`` (the
# candidate's snapshot's xmax), leaving out those pg_stat_activity places in another database
# (they cannot write our entries, and a long one there must not hold the checkpoint back). A
# transaction that has ended since our snapshot still counts as running: its entries are
# invisible to this run, so it must not pass them.
_ALL_ENDED_SQL = """
    SELECT NOT EXISTS (
        SELECT 1 FROM pg_snapshot_xip(pg_current_snapshot()) AS running(xid)
        WHERE running.xid < %s::text::xid8
          AND running.xid::text::bigint %% 4294967296 NOT IN (
              SELECT backend_xid::text::bigint FROM pg_stat_activity
              WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database()
          )
    )
"""


def _all_ended_before(xid: int | None) -> bool:
    """Whether every transaction that might have drawn an entry id while the candidate's run
    looked has ended, as our snapshot sees it. Every service locks or updates the wallet row
    before it inserts the entry, so a transaction has its xid before it draws an entry id: one
    that drew an id below the candidate's had its xid before that run's snapshot, below its xmax.
    """
    if xid is None:
        return False
    with connection.cursor() as cursor:
        cursor.execute(_ALL_ENDED_SQL, [xid])
        return bool(cursor.fetchone()[0])


def _wallet_lines(discrepancies) -> list[str]:
    return [f"wallet {d.wallet_id} ({d.user_email}): {d.problem}" for d in discrepancies]


def _identity_lines(totals: LedgerTotals) -> list[str]:
    problems = []
    if totals.entries_total != totals.balances_total:
        problems.append(
            f"accounting identity broken: Σ entries {format_usd(totals.entries_total)} ≠ "
            f"Σ wallet balances {format_usd(totals.balances_total)}"
        )
    if totals.held_total != totals.active_holds_total:
        problems.append(
            f"Σ held {format_usd(totals.held_total)} ≠ Σ active holds {format_usd(totals.active_holds_total)}"
        )
    return problems


def _timed(progress: Progress | None) -> Progress:
    started = time.monotonic()

    def say(message: str) -> None:
        if progress is not None:
            progress(f"{message} ({time.monotonic() - started:.1f} s)")

    return say
