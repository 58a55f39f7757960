"""``manage.py verify_ledger``: prove the wallets agree with the ledger, or name every one that does not.

Checks each wallet (balance = Σ entries, held = Σ active holds, the latest entry's balance_after),
every entry's link to the one before it in its wallet (balance_after = previous + amount), the
accounting identity over the whole ledger, and that every settled usage record's charge is what
the ledger debited for it, printing the totals per entry kind. Exits 0 when everything holds,
non-zero otherwise — suitable for cron or a deploy check.

A full run checks the coarser usage rollup levels of the last week (``--all-levels``: of every
month; see ``backoffice.ledger_check.LEVEL_WINDOW``). ``--incremental`` checks only the entries
added since the last clean run's checkpoint (and every wallet's balance against its latest
entry, which those links prove): seconds, for cron. Progress
goes to stdout as it goes (``-v 0`` silences it). ``--work-mem`` sets PostgreSQL's memory per sort
or hash for the run's transaction (default 256MB, reported in the progress). Every run's verdict
is kept on the checkpoint row for the staff dashboard, which shows it instead of checking the
ledger on each view. See ``backoffice.ledger_check``.
"""

from django.core.management.base import BaseCommand, CommandError

from backoffice.ledger_check import WORK_MEM, verify_ledger_run
from core.money import format_usd
from wallet.models import EntryKind


class Command(BaseCommand):
    help = "Check every wallet against its ledger entries and the ledger's accounting identity."

    def add_arguments(self, parser):
        parser.add_argument(
            "--incremental",
            action="store_true",
            help="check only the entries added since the last clean run (its checkpoint); for cron",
        )
        parser.add_argument(
            "--all-levels",
            action="store_true",
            help="check the coarser usage rollup levels of every month, not only the last week's (minutes at"
            " ten million records; weekly, say)",
        )
        parser.add_argument(
            "--work-mem",
            default=WORK_MEM,
            help=f"PostgreSQL work_mem for this run's transaction only (default {WORK_MEM}): memory per sort"
            " or hash before it spills to disk",
        )

    def handle(self, *args, incremental=False, all_levels=False, work_mem=WORK_MEM, verbosity=1, **options):
        progress = (lambda line: self.stdout.write(f"… {line}")) if verbosity >= 1 else None
        try:
            run = verify_ledger_run(
                incremental=incremental, progress=progress, work_mem=work_mem, all_levels=all_levels
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        totals = run.totals
        assert totals is not None
        width = max(len(label) for label in EntryKind.labels)
        self.stdout.write("Ledger totals by kind (USD):")
        for kind, label in EntryKind.choices:
            self.stdout.write(f"  {label:<{width}}  {format_usd(totals.by_kind[kind]):>22}")
        self.stdout.write(f"  {'Σ entries':<{width}}  {format_usd(totals.entries_total):>22}")
        self.stdout.write(f"  {'Σ wallet balances':<{width}}  {format_usd(totals.balances_total):>22}")
        self.stdout.write(f"  {'Σ held':<{width}}  {format_usd(totals.held_total):>22}")
        self.stdout.write(f"  {'Σ active holds':<{width}}  {format_usd(totals.active_holds_total):>22}")
        if run.problems:
            for problem in run.problems:
                self.stderr.write(problem)
            raise CommandError(f"ledger verification failed: {len(run.problems)} problem(s)")
        scope = f"entries after id {run.checked_from:,}" if run.incremental else "every entry"
        self.stdout.write(self.style.SUCCESS(f"Ledger verified ({scope}): every wallet matches its entries and holds."))
