from django.core.management.base import BaseCommand

from payments.models import CreditPack
from payments.seed import seed_packs


class Command(BaseCommand):
    help = "Create the default credit packs and fill empty Lemon Squeezy / Stripe ids from the environment."

    def handle(self, *args, **options):
        changes = seed_packs(CreditPack)
        for change in changes:
            self.stdout.write(change)
        if not changes:
            self.stdout.write("credit packs already up to date")
