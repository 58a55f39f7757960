"""``manage.py rebuild_usage_rollups [--since …] [--until …]``: recompute the hourly usage rollups
from the raw usage records (``proxy.rollups.rebuild``), a day at a time; then the coarser levels
(days, the operator's hours and days, the spenders' months) of those days from the hourly rows
(``proxy.rollups.rebuild_levels``), a month at a time; then folds the journal.

The triggers keep the rollups exact as records change; this is the repair and backfill tool
(after restoring raw rows, or loading them with triggers off). Each day is one transaction that
locks the rollup table against writes, so requests settling meanwhile are counted exactly once —
they wait for that day's rebuild, not for the whole run. Never give a ``--since`` before rows you
pruned: their rollups are all that is left of them (the default starts at the oldest raw record).
"""

from datetime import UTC, datetime, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_date, parse_datetime

from proxy.models import UsageRecord
from proxy.rollups import ceil_hour, floor_hour, fold, next_month, rebuild, rebuild_levels

STEP = timedelta(days=1)


def _moment(raw: str) -> datetime:
    moment = parse_datetime(raw)
    if moment is None:
        day = parse_date(raw)
        if day is None:
            raise CommandError(f"{raw!r} is neither a date (YYYY-MM-DD) nor an ISO 8601 instant")
        moment = datetime(day.year, day.month, day.day)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = "Recompute the hourly usage rollups from the raw usage records (default: every hour they remain for)."

    def add_arguments(self, parser):
        parser.add_argument("--since", type=_moment, help="from the hour of this date or instant (UTC if no offset)")
        parser.add_argument("--until", type=_moment, help="to the end of the hour of this instant (exclusive)")

    def handle(self, *args, since=None, until=None, **options):
        if since is None:
            since = UsageRecord.objects.order_by("created_at").values_list("created_at", flat=True).first()
            if since is None:
                self.stdout.write("No usage records: nothing to rebuild.")
                return
        if until is None:
            latest = UsageRecord.objects.order_by("-created_at").values_list("created_at", flat=True).first()
            until = (latest or since) + timedelta(microseconds=1)
        if since >= until:
            raise CommandError("--since must be before --until")
        start, written, deleted = floor_hour(since), 0, 0
        while start < until:
            end = min(start + STEP, until)
            gone, made = rebuild(since=start, until=end, levels=False)
            deleted, written = deleted + gone, written + made
            self.stdout.write(f"  {start:%Y-%m-%d %H}:00 → {end:%Y-%m-%d %H:%M}: {made} rollup rows")
            start = ceil_hour(end)
        # The coarser levels from the rebuilt hours, a month at a time (each derives whole days,
        # and the spenders whole months, from the hourly rows).
        start = floor_hour(since)
        while start < until:
            end = min(next_month(start), until)
            made = rebuild_levels(since=start, until=end)
            self.stdout.write(f"  levels {start:%Y-%m-%d} → {end:%Y-%m-%d %H:%M}: {made} rows")
            start = end
        self.stdout.write(f"Folded {fold()} journal row(s) into the operator rollups.")
        self.stdout.write(self.style.SUCCESS(f"Rebuilt usage rollups: {written} rows written, {deleted} replaced."))
