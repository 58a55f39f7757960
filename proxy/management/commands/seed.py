"""``manage.py seed`` (run by ``scripts/run`` on every start): the demo model's price, once."""

from django.conf import settings
from django.core.management.base import BaseCommand

from proxy.services import demo_price_ensure


class Command(BaseCommand):
    help = "Create the built-in demo model's price if it does not exist (idempotent)."

    def handle(self, *args, **options):
        price, created = demo_price_ensure()
        state = "created" if created else "present"
        served = "served (no UPSTREAM_API_KEY)" if not settings.UPSTREAM_API_KEY else "hidden (an upstream is set)"
        self.stdout.write(f"demo model {price.model}: {state}, {served}")
        self.stdout.write("staff login: create one with `manage.py createsuperuser`, then open /admin/")
