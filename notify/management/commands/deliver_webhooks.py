"""Deliver the outbox: webhooks to the operator's endpoints and emails to users.

Long-running by default (run one or several beside the server); ``--once`` does one round and
exits (tests, cron). SIGTERM or Ctrl-C finishes the attempts in hand, records them, and exits; a
worker killed harder loses nothing either: its claims run out and another worker retries them.
"""

from __future__ import annotations

import signal

from django.core.management.base import BaseCommand, CommandError

from notify import sender
from notify.worker import Worker


class Command(BaseCommand):
    help = "Deliver outbound webhooks and notification emails from the outbox."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="one round, then exit")
        parser.add_argument("--interval", type=float, default=2.0, help="seconds to sleep when idle (default 2)")
        parser.add_argument("--concurrency", type=int, default=4, help="deliveries sent at once (default 4)")
        parser.add_argument(
            "--timeout",
            type=float,
            default=sender.TIMEOUT,
            help=f"seconds per phase of a request (default {sender.TIMEOUT:g})",
        )

    def handle(self, *args, once: bool, interval: float, concurrency: int, timeout: float, **options):
        if concurrency < 1 or interval <= 0:
            raise CommandError("--concurrency must be at least 1 and --interval positive")
        if not 0 < timeout <= sender.TIMEOUT:
            # The claim's lease is sized for the default; a longer timeout could outlive it.
            raise CommandError(f"--timeout must be positive and at most {sender.TIMEOUT:g} seconds")
        worker = Worker(concurrency=concurrency, timeout=timeout)
        try:
            if once:
                done = worker.run_once()
                self.stdout.write(f"{done} event(s) dispatched or deliveries attempted")
                return
            for name in ("SIGTERM", "SIGINT"):
                signal.signal(getattr(signal, name), lambda *_: worker.stop.set())
            self.stdout.write(f"delivering webhooks and emails (idle poll every {interval:g} s); Ctrl-C stops")
            worker.run_forever(interval)
        finally:
            worker.close()
