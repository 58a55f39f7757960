"""What the usage rollup triggers cost a settlement, on PostgreSQL.

Inserts pending usage records, then settles them one statement each — the record's UPDATE out
of ``pending``, as the proxy's settlement statement makes it, timed without its commit — alternating
rounds with the rollup triggers enabled and disabled, and prints the p50 and mean per statement
of each, and the difference. (Disabling a trigger takes the table's owner: run it against a
database of your own, never production.) The records and their rollups are deleted afterwards.

    DATABASE_URL=postgres://…/tt_bench .venv/bin/python bench/usage_rollup_cost.py [records per round]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import django

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup()

from django.db import connection, transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from accounts.models import User  # noqa: E402
from proxy.models import UsageRecord, UsageRollup, UsageStatus  # noqa: E402

TRIGGERS = ("proxy_usage_rollup_insert", "proxy_usage_rollup_update")
SETTLE = (
    f"UPDATE {UsageRecord._meta.db_table} SET status = %s, prompt_tokens = %s, completion_tokens = %s, "
    "upstream_cost = %s, charge = %s, settled_at = %s WHERE id = %s AND status = 'pending'"
)


def round_of(user: User, count: int, *, triggers: bool) -> list[float]:
    state = "ENABLE" if triggers else "DISABLE"
    with connection.cursor() as cursor:
        for name in TRIGGERS:
            cursor.execute(f"ALTER TABLE {UsageRecord._meta.db_table} {state} TRIGGER {name}")
    tag = uuid.uuid4().hex[:8]
    ids = [
        UsageRecord.objects.create(request_id=f"bench-{tag}-{n}", user=user, model=f"bench/model-{n % 4}").pk
        for n in range(count)
    ]
    timings = []
    # One transaction per round: what is timed is the statement's own work (the trigger's
    # included), not the commit's flush to disk, which is the same with and without it.
    with transaction.atomic(), connection.cursor() as cursor:
        for pk in ids:
            started = time.perf_counter()
            cursor.execute(SETTLE, [UsageStatus.OK, 400, 37, "0.0000597", 71640, timezone.now(), pk])
            timings.append(time.perf_counter() - started)
    return timings


def main() -> None:
    if connection.vendor != "postgresql":
        sys.exit("PostgreSQL only (set DATABASE_URL)")
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    user, _ = User.objects.get_or_create(email="rollup-bench@example.invalid")
    with_triggers: list[float] = []
    without: list[float] = []
    try:
        for _ in range(4):
            with_triggers += round_of(user, count, triggers=True)
            without += round_of(user, count, triggers=False)
    finally:
        with connection.cursor() as cursor:
            for name in TRIGGERS:
                cursor.execute(f"ALTER TABLE {UsageRecord._meta.db_table} ENABLE TRIGGER {name}")
        UsageRecord.objects.filter(user=user).delete()
        UsageRollup.objects.filter(user=user).delete()
    load = os.getloadavg()[0]
    for label, timings in (("with the rollup triggers", with_triggers), ("without", without)):
        p50, mean = statistics.median(timings) * 1e6, statistics.fmean(timings) * 1e6
        print(f"settlement UPDATE {label:<25} p50 {p50:7.1f} µs   mean {mean:7.1f} µs   ({len(timings)} statements)")
    added = (statistics.median(with_triggers) - statistics.median(without)) * 1e6
    print(f"the triggers add {added:.1f} µs per settlement (p50); load average {load:.1f}")


if __name__ == "__main__":
    main()
