"""``manage.py reconcile_holds``: close every hold whose request never settled (its server process
died, or the settlement failed) once it is past ``expires_at``.

With OpenRouter, a hold whose usage record carries a generation id is charged what OpenRouter
says the generation cost; otherwise the record's prompt estimate is charged and marked
``estimated``; a hold without a usage record is released. Nothing is dropped silently: every
hold handled is printed.
"""

from django.conf import settings
from django.core.management.base import BaseCommand
from django.utils import timezone

from proxy import upstream
from proxy.models import UsageRecord
from proxy.services import hold_reconcile
from wallet.models import Hold, HoldStatus


class Command(BaseCommand):
    help = "Settle or release active holds past their expiry (generation lookup where the upstream has one)."

    def add_arguments(self, parser):
        parser.add_argument("--attempts", type=int, default=4, help="generation lookups per hold (404 = not yet)")
        parser.add_argument("--backoff", type=float, default=0.5, help="seconds before the first retry (doubles)")

    def handle(self, *args, attempts, backoff, **options):
        expired = Hold.objects.filter(status=HoldStatus.ACTIVE, expires_at__lte=timezone.now()).select_related("wallet")
        handled = 0
        for hold in expired.order_by("expires_at", "pk"):
            generation = None
            generation_id = (
                UsageRecord.objects.filter(request_id=hold.request_id).values_list("generation_id", flat=True).first()
            )
            if generation_id and settings.UPSTREAM_KIND == "openrouter" and settings.UPSTREAM_API_KEY:
                generation = upstream.generation_lookup(generation_id, attempts=attempts, backoff=backoff)
                if generation is None:
                    self.stdout.write(f"{hold.request_id}: generation {generation_id} not found upstream")
            self.stdout.write(hold_reconcile(hold=hold, generation=generation))
            handled += 1
        self.stdout.write(f"reconciled {handled} expired hold(s)")
