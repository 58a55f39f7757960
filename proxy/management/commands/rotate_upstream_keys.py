"""``manage.py rotate_upstream_keys``: re-encrypt every stored upstream API key with the newest
``UPSTREAM_KEY_ENCRYPTION_KEY``.

Rotation, step by step: put the new key first in ``UPSTREAM_KEY_ENCRYPTION_KEY`` (comma-separated,
the old one after it) and restart, run this command, then remove the old key and restart again.
All or nothing: if any stored key cannot be decrypted with the keys given, nothing changes.
"""

from django.core.management.base import BaseCommand, CommandError

from proxy.keyvault import KeyVaultError
from proxy.upstreams import upstream_keys_rotate


class Command(BaseCommand):
    help = "Re-encrypt every stored upstream API key with the first key in UPSTREAM_KEY_ENCRYPTION_KEY."

    def handle(self, *args, **options):
        try:
            count = upstream_keys_rotate()
        except KeyVaultError as exc:
            raise CommandError(f"nothing changed: {exc}") from None
        self.stdout.write(self.style.SUCCESS(f"re-encrypted {count} upstream key(s) with the newest key"))
