"""``manage.py verify_ledger``: prove the wallets agree with the ledger, or name every one that does not.

Checks each wallet (balance = Σ entries, held = Σ active holds, the entries' running balances),
the accounting identity over the whole ledger, and that every settled usage record's charge is
what the ledger debited for it, and that the hourly usage rollups every period total is read
from are the sums of their usage records, printing the totals per entry kind. Exits 0 when everything
holds, non-zero otherwise — suitable for cron or a deploy check.
"""

from django.core.management.base import BaseCommand, CommandError

from backoffice.reports import ledger_discrepancies, ledger_totals, rollup_problems, usage_discrepancies
from core.money import format_usd
from wallet.models import EntryKind


class Command(BaseCommand):
    help = "Check every wallet against its ledger entries and the ledger's accounting identity."

    def handle(self, *args, **options):
        totals = ledger_totals()
        width = max(len(label) for label in EntryKind.labels)
        self.stdout.write("Ledger totals by kind (USD):")
        for kind, label in EntryKind.choices:
            self.stdout.write(f"  {label:<{width}}  {format_usd(totals.by_kind[kind]):>22}")
        self.stdout.write(f"  {'Σ entries':<{width}}  {format_usd(totals.entries_total):>22}")
        self.stdout.write(f"  {'Σ wallet balances':<{width}}  {format_usd(totals.balances_total):>22}")
        self.stdout.write(f"  {'Σ held':<{width}}  {format_usd(totals.held_total):>22}")
        self.stdout.write(f"  {'Σ active holds':<{width}}  {format_usd(totals.active_holds_total):>22}")

        problems = [f"wallet {d.wallet_id} ({d.user_email}): {d.problem}" for d in ledger_discrepancies()]
        problems += [
            f"usage record {request_id}: charged {format_usd(charge)} but the ledger debited {format_usd(debited)}"
            for request_id, charge, debited in usage_discrepancies()
        ]
        problems += rollup_problems()
        if totals.entries_total != totals.balances_total:
            problems.append(
                f"accounting identity broken: Σ entries {format_usd(totals.entries_total)} ≠ "
                f"Σ wallet balances {format_usd(totals.balances_total)}"
            )
        if totals.held_total != totals.active_holds_total:
            problems.append(
                f"Σ held {format_usd(totals.held_total)} ≠ Σ active holds {format_usd(totals.active_holds_total)}"
            )
        if problems:
            for problem in problems:
                self.stderr.write(problem)
            raise CommandError(f"ledger verification failed: {len(problems)} problem(s)")
        self.stdout.write(self.style.SUCCESS("Ledger verified: every wallet matches its entries and holds."))
