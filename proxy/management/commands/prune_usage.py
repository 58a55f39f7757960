"""``manage.py prune_usage --older-than 180d [--batch-size N] [--dry-run]``: delete raw usage
records older than the window, in batches, printing progress. Ledger entries (every charge),
usage rollups and records still pending are never touched: see ``proxy.retention``."""

import re
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from proxy.retention import usage_prune

UNITS = {"h": "hours", "d": "days", "w": "weeks"}
SHORTEST = timedelta(days=1)  # a typo such as "180h" for "180d" still keeps a day of detail


def parse_window(raw: str) -> timedelta:
    """``180d``, ``26w``, ``48h`` (a bare number is days)."""
    found = re.fullmatch(r"\s*(\d{1,6})\s*([hdw]?)\s*", raw or "")
    if found is None:
        raise ValueError(f"{raw!r} is not a window such as 180d, 26w or 48h")
    return timedelta(**{UNITS[found.group(2) or "d"]: int(found.group(1))})


class Command(BaseCommand):
    help = "Delete usage records older than a window (never ledger entries, rollups or pending records)."

    def add_arguments(self, parser):
        parser.add_argument("--older-than", required=True, help="the window to keep, e.g. 180d, 26w, 48h")
        parser.add_argument("--batch-size", type=int, default=5000, help="records per transaction (default 5000)")
        parser.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")

    def handle(self, *args, older_than, batch_size, dry_run, verbosity=1, **options):
        try:
            window = parse_window(older_than)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if window < SHORTEST:
            raise CommandError(f"--older-than must keep at least {SHORTEST.days} day")
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        before = timezone.now() - window
        stamp = before.isoformat(timespec="seconds")

        def progress(batch: int, deleted: int) -> None:
            if verbosity >= 1:
                self.stdout.write(f"… batch {batch}: {deleted:,} deleted")

        result = usage_prune(before=before, batch_size=batch_size, dry_run=dry_run, progress=progress)
        if dry_run:
            self.stdout.write(f"Would delete {result.deleted:,} usage records created before {stamp} (dry run).")
        else:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Deleted {result.deleted:,} usage records created before {stamp} in {result.batches} batch(es)."
                )
            )
