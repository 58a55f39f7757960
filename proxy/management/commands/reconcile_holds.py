"""``manage.py reconcile_holds``: close every hold whose request never settled (its server process
died, or the settlement failed) once it is past ``expires_at``.

With OpenRouter, a hold whose usage record carries a generation id is charged what OpenRouter
says the generation cost; otherwise the record's prompt estimate is charged and marked
``estimated``; a hold without a usage record is released. Nothing is dropped silently: every
hold handled is printed.

Then, where the upstream offers a generation lookup (OpenRouter), requests that settled at an
*estimate* (the client disconnected, or the stream was cut before usage arrived) are corrected
to the upstream's own cost: only the difference moves, once per request. Records settled in the
last ``--settle-delay`` seconds are left for the next run, since the lookup lags completion.

Each record is looked up at the upstream that served it (its ``upstream``; records from before
there were several upstreams name none and belong to the default upstream), with that
upstream's key and certificates; upstreams of other kinds have no lookup.

Each run also folds the usage rollups' journal into the operator-wide levels the staff dashboard
reads (``proxy.rollups.fold``); the dashboard warns when the journal holds rows no run folded.
"""

from datetime import timedelta

from django.core.management.base import BaseCommand
from django.utils import timezone

from proxy import rollups, upstream
from proxy.models import DEFAULT_UPSTREAM, Upstream, UpstreamKind, UsageRecord
from proxy.reconcile import estimate_reconcile, estimates_to_reconcile, hold_reconcile
from wallet.models import Hold, HoldStatus


def lookup_targets() -> dict[str, upstream.UpstreamConfig]:
    """The upstreams with a generation lookup (OpenRouter, with a usable key), by the name usage
    records give them ("" too for the default upstream: records older than that column)."""
    configs = [upstream.default()]
    configs += [upstream.config_of(row) for row in Upstream.objects.filter(kind=UpstreamKind.OPENROUTER)]
    targets = {c.name: c for c in configs if c.is_openrouter and c.api_key and not c.unusable}
    if DEFAULT_UPSTREAM in targets:
        targets[""] = targets[DEFAULT_UPSTREAM]
    return targets


class Command(BaseCommand):
    help = "Settle or release active holds past their expiry (generation lookup where the upstream has one)."

    def add_arguments(self, parser):
        parser.add_argument("--attempts", type=int, default=4, help="generation lookups per hold (404 = not yet)")
        parser.add_argument("--backoff", type=float, default=0.5, help="seconds before the first retry (doubles)")
        parser.add_argument("--settle-delay", type=float, default=10.0, help="leave estimates younger than this")
        parser.add_argument("--limit", type=int, default=500, help="estimates corrected per run at most")

    def handle(self, *args, attempts, backoff, settle_delay, limit, **options):
        targets = lookup_targets()
        expired = Hold.objects.filter(status=HoldStatus.ACTIVE, expires_at__lte=timezone.now()).select_related("wallet")
        handled = 0
        for hold in expired.order_by("expires_at", "pk"):
            generation = None
            generation_id, served_by = (
                UsageRecord.objects.filter(request_id=hold.request_id).values_list("generation_id", "upstream").first()
            ) or ("", "")
            target = targets.get(served_by)
            if generation_id and target is not None:
                generation = upstream.generation_lookup(
                    generation_id, attempts=attempts, backoff=backoff, target=target
                )
                if generation is None:
                    self.stdout.write(f"{hold.request_id}: generation {generation_id} not found upstream")
            self.stdout.write(hold_reconcile(hold=hold, generation=generation))
            handled += 1
        self.stdout.write(f"reconciled {handled} expired hold(s)")
        # The operator-wide usage rollups' journal, folded in (``proxy.rollups.fold``): this
        # command is the one operators already run every few minutes.
        self.stdout.write(f"folded {rollups.fold()} usage journal row(s) into the operator rollups")
        if not targets:
            return  # no generation lookup upstream: an estimate is the final word, as API.md says
        checked = 0
        settled_before = timezone.now() - timedelta(seconds=settle_delay)
        for record in estimates_to_reconcile(settled_before=settled_before, limit=limit, upstreams=list(targets)):
            generation = upstream.generation_lookup(
                record.generation_id, attempts=attempts, backoff=backoff, target=targets[record.upstream]
            )
            self.stdout.write(estimate_reconcile(record=record, generation=generation))
            checked += 1
        self.stdout.write(f"checked {checked} estimated charge(s) against the upstream")
